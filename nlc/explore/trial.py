"""One trial: compile a point of the space, train it at each learning rate of a small sweep (MAD's
protocol: the best rate counts), evaluate, and return a JSON-ready record of everything measured."""
from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace

from . import points, tasks
from .trainer import Diverged, TrainConfig, train


@dataclass(frozen=True)
class Settings:
    """What every trial of a run shares (stored with the study, so a resumed run can check it)."""
    task: str = "mqar"
    task_args: dict = field(default_factory=dict)
    train_examples: int = 2000
    test_examples: int = 500
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    train: TrainConfig = TrainConfig()
    overrides: dict = field(default_factory=dict)  # spec parameters (--set)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        d = json.loads(text)
        return cls(**{**d, "lrs": tuple(d["lrs"]), "train": TrainConfig(**d["train"])})


@functools.lru_cache(maxsize=4)
def _task(settings_json: str) -> tasks.Task:
    s = Settings.from_json(settings_json)
    return tasks.make(s.task, seed=s.train.seed, train=s.train_examples, test=s.test_examples,
                      **s.task_args)


def versions() -> dict[str, str]:
    import optuna
    import torch

    import nlc
    return {"nlc": nlc.__version__, "torch": torch.__version__, "optuna": optuna.__version__,
            "python": platform.python_version()}


def state_size(program, layers: int) -> int:
    """Numbers in the recurrent state of one sequence: every level's state tensors, times layers."""
    total = 0
    for level in program.levels:
        total += sum(t[0].numel() for t in program.module(f"level_{level.name}").initial_state(1))
    return total * layers


def run(spec_source: str, file: str, space, point: dict[str, str], settings: Settings,
        checkpoint=None) -> dict:
    """Train one point at every rate in the sweep. Returns the record (status 'ok', or 'failed' with
    the reason when the point does not compile or every rate diverges). checkpoint(step, best accuracy
    so far) is called at each evaluation (steps numbered across the sweep); it may raise to prune."""
    import nlc

    text = points.source(spec_source, file, space, point)
    record = {"point": point, "spec": text, "seed": settings.train.seed, "versions": versions(),
              "task": settings.task, "task_args": _task(settings.to_json()).settings}
    start = time.perf_counter()
    try:
        program = nlc.compile(text, **settings.overrides)
    except nlc.SpecError as err:
        return {**record, "status": "failed", "error": f"compile: {err.render()}"}
    record["plans"] = {p.level: p.family for p in program.plans.values()}
    record["state_size"] = state_size(program, settings.train.layers or
                                      int(program.params.get("layers", 2)))
    task = _task(settings.to_json())
    sweep, best = [], None
    evals = settings.train.evals
    for i, lr in enumerate(settings.lrs):
        cfg = replace(settings.train, lr=lr)

        def report(index, accuracy, i=i):
            if checkpoint is not None:
                top = max([accuracy] + [r["accuracy"] for r in sweep if "accuracy" in r])
                checkpoint(i * evals + index, top)

        try:
            result = {"lr": lr, **train(program, task, cfg, report)}
        except Diverged as err:
            result = {"lr": lr, "error": f"diverged: {err}"}
        sweep.append(result)
        if "accuracy" in result and (best is None or result["accuracy"] > best["accuracy"]):
            best = result
    record["sweep"] = sweep
    record["seconds"] = time.perf_counter() - start
    if best is None:
        return {**record, "status": "failed", "error": "; ".join(r["error"] for r in sweep)}
    return {**record, "status": "ok", "lr": best["lr"], "accuracy": best["accuracy"],
            "slices": best["slices"], "test_bits": best["test_bits"], "tokens_per_s": best["tokens_per_s"],
            "params": best["params"]}
