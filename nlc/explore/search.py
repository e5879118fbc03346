"""The search: Optuna over a spec's design space. `grid` runs every valid point once (and measures
each to the end), `tpe` learns where the accuracy is and prunes trials whose accuracy falls below the
median at the same checkpoint, `nsga2` trades accuracy against tokens/s and state size (three
objectives).

A run is one Optuna study in the run's storage; running the same command again resumes it: finished
trials stay, dead ones are re-queued (storage.py), and the run stops when `trials` trials have
finished (ok, failed or pruned), the grid is done, or the time budget is over (a trial already
started is finished first). Workers are processes on this machine; more machines join by running the
same command against the same --storage URL."""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..space import parse_range
from . import points, storage, tasks, trial
from .trial import Settings

SAMPLERS = ("grid", "tpe", "nsga2")
OBJECTIVES = {"grid": ["maximize"], "tpe": ["maximize"],
              "nsga2": ["maximize", "maximize", "minimize"]}  # accuracy, tokens/s, state size


class TrialFailed(Exception):
    """A point that could not be trained (invalid, compile error, every rate diverged, a crash)."""


@dataclass(frozen=True)
class Run:
    spec: str                    # path of the spec with the space
    out: Path
    settings: Settings
    sampler: str = "grid"
    space: str | None = None     # which space (default: the first)
    storage: str | None = None   # URL; default SQLite under out
    workers: int = 1
    trials: int | None = None    # stop after this many finished trials (all runs together)
    budget_s: float | None = None
    seed: int = 0
    threads: int | None = None   # torch threads per worker (default: cores / workers)


def parse_budget(text: str) -> float:
    """'2h', '30m', '90s', '1h30m' or plain seconds -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                         text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"budget {text!r}: expected e.g. 2h, 45m, 90s or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    return 3600 * h + 60 * m + s


def _program(run: Run):
    import nlc
    program = nlc.compile(Path(run.spec), **run.settings.overrides)
    spaces = program.spaces
    if not spaces:
        raise ValueError(f"{run.spec} declares no space to explore")
    if run.space is None:
        return program, spaces[0]
    found = [s for s in spaces if s.name == run.space]
    if not found:
        raise ValueError(f"no space {run.space!r} in {run.spec}; spaces: "
                         f"{', '.join(s.name for s in spaces)}")
    return program, found[0]


def study_name(program, space, settings: Settings) -> str:
    return f"{program.name}.{space.name}.{settings.task}"


def _sampler(run: Run, space, worker: int):
    import optuna
    seed = run.seed + worker
    if run.sampler == "grid":
        return optuna.samplers.GridSampler({points.GRID_AXIS: points.grid(space)}, seed=seed)
    if run.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if run.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"unknown sampler {run.sampler!r}; samplers: {', '.join(SAMPLERS)}")


def open_study(run: Run, worker: int = 0):
    """Create the study, or load it and check it was made by the same command."""
    import optuna
    program, space = _program(run)
    url = storage.url(run.out, run.storage)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=run.settings.train.evals)
              if run.sampler == "tpe" else optuna.pruners.NopPruner())  # a grid measures every point
    study = optuna.create_study(storage=storage.open_storage(url),
                                study_name=study_name(program, space, run.settings),
                                directions=OBJECTIVES[run.sampler], load_if_exists=True,
                                sampler=_sampler(run, space, worker), pruner=pruner)
    made = {"settings": run.settings.to_json(), "sampler": run.sampler, "spec": program.source}
    if not study.user_attrs:
        for key, value in made.items():
            study.set_user_attr(key, value)
        study.set_user_attr("spec_file", str(run.spec))
        if run.sampler == "grid":  # queued once: workers claim queued trials atomically
            for label in points.grid(space):
                study.enqueue_trial({points.GRID_AXIS: label})
    else:
        changed = [k for k, v in made.items() if study.user_attrs.get(k) != v]
        if changed:
            raise ValueError(f"{url} holds study {study.study_name!r} made with a different "
                             f"{' and '.join(changed)}; use another --out (or --storage)")
    return study, program, space


def counted(t) -> bool:
    """A trial that counts toward the run's goal: it ran to an end and recorded a point of its own (a
    sampler's return to a recorded point is kept as a copy of that record and not counted)."""
    return storage.recorded(t) and "copy_of" not in t.user_attrs.get("record", {})


def finished(study) -> int:
    """Points recorded (ok, failed or pruned); killed trials are re-queued, copies not counted."""
    return sum(1 for t in study.get_trials(deepcopy=False) if counted(t))


def target(run: Run, space) -> int | None:
    """How many recorded points end the run: --trials, and at most the points there are (a grid's
    valid points; every point of the product for a sampler, when no axis is a continuous range)."""
    if run.sampler == "grid":
        return min(run.trials or len(space.valid), len(space.valid))
    if run.trials is None or any(parse_range(c) for _, choices in space.axes for c in choices):
        return run.trials
    return min(run.trials, math.prod(len(choices) for _, choices in space.axes))


def _claimed(study) -> tuple[int, int]:
    """(recorded points, running trials)."""
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    return (sum(1 for t in trials if counted(t)),
            sum(1 for t in trials if t.state == TrialState.RUNNING))


def _surplus(study, t, goal: int | None) -> bool:
    """Whether the run already has enough trials without this one: those finished and those started
    before it (lower numbers) reach the goal. Workers that start at once agree on which one goes."""
    from optuna.trial import TrialState
    if goal is None:
        return False
    trials = study.get_trials(deepcopy=False)
    ahead = sum(1 for o in trials if counted(o) or
                (o.state == TrialState.RUNNING and o.number < t.number))
    return ahead >= goal


def _recorded_point(study, point: dict):
    """An earlier trial that recorded this very point to the end (ok, failed or invalid), if any."""
    return next((t for t in study.get_trials(deepcopy=False) if counted(t)
                 and t.user_attrs["status"] != "pruned" and t.user_attrs.get("point") == point), None)


def _objective(run: Run, program, space, goal: int | None):
    import optuna

    def objective(t):
        if _surplus(t.study, t, goal):  # not counted or reported (no status)
            t.study.stop()
            raise optuna.TrialPruned("surplus: the run already has enough trials")
        point = points.suggest(t, space, by_point=run.sampler == "grid")
        t.set_user_attr("point", point)
        why = points.invalid_reason(space, point)
        earlier = _recorded_point(t.study, point)
        if earlier is not None:  # a sampler came back to a point: checks and training are deterministic
            record = {**earlier.user_attrs["record"], "copy_of": earlier.number}
        elif why is not None:
            record = {"point": point, "status": "failed", "error": f"invalid point: {why}"}
        else:
            def checkpoint(step, accuracy):
                if run.sampler == "tpe":
                    t.report(accuracy, step)
                    if t.should_prune():
                        raise optuna.TrialPruned(f"accuracy {accuracy:.3f} at checkpoint {step}")
            try:
                record = trial.run(program.source, run.spec, space, point, run.settings, checkpoint)
            except optuna.TrialPruned:
                t.set_user_attr("status", "pruned")
                raise
            except Exception as err:  # a failed trial is a result, not a crash of the run
                record = {"point": point, "status": "failed",
                          "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc(limit=8)}
        t.set_user_attr("record", json.loads(json.dumps(record, default=str)))
        t.set_user_attr("status", record["status"])
        if record["status"] != "ok":
            raise TrialFailed(record["error"])
        if run.sampler == "nsga2":
            return record["accuracy"], record["tokens_per_s"], record["state_size"]
        return record["accuracy"]

    return objective


def work(run: Run, worker: int = 0, deadline: float | None = None) -> None:
    """One worker: run trials until the study has enough, the grid is done or the deadline passes.
    When the only trials left are running elsewhere, wait: they finish, or their worker is dead and
    they are re-queued here."""
    import optuna
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    torch.set_num_threads(run.threads or max(1, (os.cpu_count() or 1) // run.workers))
    study, program, space = open_study(run, worker)
    if storage.url(run.out, run.storage).startswith("sqlite"):
        storage.serialize_claims(study, run.out / "claims.lock")
    goal = target(run, space)

    def enough(study, _trial):
        if goal is not None and sum(_claimed(study)) >= goal:
            study.stop()

    def optimize():
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        study.optimize(_objective(run, program, space, goal), timeout=timeout, callbacks=[enough],
                       catch=(TrialFailed,), gc_after_trial=True)

    if goal is None:
        optimize()
    while goal is not None:  # until the goal: trials still running may belong to dead workers
        optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed and re-queued
        storage.fail_unstarted_trials(study)  # and those whose worker died before its first heartbeat
        done, running = _claimed(study)
        if done >= goal or (deadline is not None and time.time() >= deadline):
            return
        if done + running < goal:
            optimize()
        else:
            time.sleep(storage.heartbeat()[0])


def _worker_main(run: Run, worker: int, deadline: float | None) -> None:
    _die_with_parent()
    work(run, worker, deadline)


def _die_with_parent() -> None:
    """Linux: a worker process is killed when the `nlc explore` that started it dies (even by SIGKILL),
    so its trial is left to the heartbeat and re-queued instead of running on unattended."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def explore(run: Run, progress: bool = True) -> None:
    """Run (or resume) the search with `run.workers` processes, showing progress with an ETA."""
    s = run.settings  # one example of each split: a bad task setting stops the run here, not every trial
    tasks.make(s.task, seed=s.train.seed, train=1, test=1, **s.task_args)
    study, _, space = open_study(run)  # create the study (and queue the grid) before any worker
    deadline = None if run.budget_s is None else time.time() + run.budget_s
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(study, target(run, space), stop), daemon=True)
    if progress:
        watcher.start()
    try:
        if run.workers == 1:
            work(run, 0, deadline)
        else:
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=_worker_main, args=(run, i, deadline))
                     for i in range(run.workers)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                raise RuntimeError(f"{len(bad)} worker(s) exited with codes {bad}")
    finally:
        stop.set()
        if progress:
            watcher.join()


def _watch(study, target: int | None, stop: threading.Event) -> None:
    """A progress bar over finished trials (ETA from the pace so far), with the running count."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from optuna.trial import TrialState

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[running]} running"), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        job = bar.add_task("trials", total=target, completed=finished(study), running=0)
        while True:
            trials = study.get_trials(deepcopy=False)
            done = sum(1 for t in trials if storage.recorded(t))
            running = sum(1 for t in trials if t.state == TrialState.RUNNING)
            bar.update(job, completed=done, running=running)
            if stop.wait(2.0):
                bar.update(job, completed=finished(study))
                return
