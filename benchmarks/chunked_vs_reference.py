"""Speed of each shipped spec's layer: the chunk-parallel form (mode='auto') against the reference
per-token loop, forward and forward+backward, in one run on this machine. Prints a table and writes
JSON. The peers (titans-pytorch, nested-learning, fla) are in `peers.py`. A call slower than
`--budget` seconds is timed once, its warm-up being the measurement.

    python benchmarks/chunked_vs_reference.py --length 1024 --json benchmarks/chunked_vs_reference.json

Each (spec, form) runs in a fresh Python process (`--worker`) under the address-space cap, so a
form that runs out of memory, or leaves the heap fragmented, cannot fail the forms timed after it
(in one shared process, oneDNN's "could not create a primitive" followed the atlas loop's failure).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import nlc

SPECS = Path(__file__).resolve().parent.parent / "specs"
HEAD_PARAMS = ("d_key", "d_value", "d_head")


def overrides(program_params: dict, args) -> dict:
    out = {"d_model": args.d_model, "heads": args.heads}
    out.update({p: args.head_dim for p in HEAD_PARAMS if p in program_params})
    if "chunk" in program_params:
        out["chunk"] = args.chunk
    return out


def timed(fn, repeats: int, budget: float) -> float:
    """Best wall time of `repeats` runs after one warm-up (best-of: the machine is shared). A
    warm-up slower than `budget` seconds is the measurement: such a call is not repeated."""
    start = time.perf_counter()
    fn()
    warm_up = time.perf_counter() - start
    if warm_up >= budget:
        return warm_up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(layer, x, repeats: int, budget: float) -> dict:
    """tokens/s forward (no_grad) and forward+backward; a mode that fails (out of memory under the
    address-space cap, mostly) is None, with the error under "errors"."""
    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        layer(x).pow(2).mean().backward()

    tokens, out = x.shape[0] * x.shape[1], {}
    for key, fn in (("forward_tok_s", forward), ("train_tok_s", forward_backward)):
        out[key] = None
        try:
            out[key] = tokens / timed(fn, repeats, budget)
        except (MemoryError, RuntimeError) as error:  # under the cap, allocations fail this way
            out.setdefault("errors", {})[key] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        layer.zero_grad(set_to_none=True)
        gc.collect()  # outside the handler: the traceback's frames hold the failed call's tensors
    if out["forward_tok_s"] is not None:  # a layer that diverges on these inputs times NaN arithmetic
        try:
            with torch.no_grad():
                out["output_finite"] = bool(torch.isfinite(layer(x)).all())
        except (MemoryError, RuntimeError) as error:  # the heap the failed training call left behind
            out.setdefault("errors", {})["output_finite"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return out


def ratio(a, b):
    return None if a is None or b is None else a / b


def cell(value, fmt: str) -> str:
    """A table cell; "-" where the form failed (its error is in the JSON)."""
    return "-".rjust(len(format(1.0, fmt))) if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="*", default=sorted(p.stem for p in SPECS.glob("*.nl")))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="a warm-up slower than this many seconds is the measurement")
    parser.add_argument("--memory-limit-gib", type=float, default=round(0.75 * physical_gib(), 1),
                        help="address-space cap: a form that needs more is reported out of memory")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    rows = []
    for name in args.specs:
        plans = layer_plans(name, args)
        why = ("no memory level" if not plans else
               "no chunk-parallel level" if set(plans.values()) == {"reference"} else None)
        if why:
            print(f"{name:18s} {why}: skipped", flush=True)
            rows.append({"spec": name, "plans": plans, "skipped": why})
            continue
        row = {"spec": name, "plans": plans,
               "chunked": run_worker(name, "chunked", args),
               "reference": run_worker(name, "reference", args)}
        row["speedup_forward"] = ratio(row["chunked"]["forward_tok_s"], row["reference"]["forward_tok_s"])
        row["speedup_train"] = ratio(row["chunked"]["train_tok_s"], row["reference"]["train_tok_s"])
        rows.append(row)
        c, r = row["chunked"], row["reference"]
        print(f"{name:18s} {','.join(sorted(set(plans.values()))):18s} "
              f"fwd {cell(c['forward_tok_s'], '9.0f')} tok/s ({cell(row['speedup_forward'], '5.1f')}x)  "
              f"fwd+bwd {cell(c['train_tok_s'], '9.0f')} tok/s ({cell(row['speedup_train'], '5.1f')}x)  "
              f"reference fwd+bwd {cell(r['train_tok_s'], '7.0f')} tok/s"
              + ("" if c.get("output_finite", True) else "  (output not finite: timed on NaN)"), flush=True)
        write(args, rows)
    write(args, rows, done=True)


def program_at(name: str, args):
    """The spec compiled at the benchmark's shape."""
    base = nlc.compile(SPECS / f"{name}.nl")
    return nlc.compile(SPECS / f"{name}.nl", **overrides(base.params, args))


def layer_plans(name: str, args) -> dict:
    """{level: family} of the spec at the benchmark's shape."""
    return {p.level: p.family for p in program_at(name, args).plans.values()}


def worker(name: str, form: str, args) -> dict:
    """One form's measurement, in this (fresh) process: the layer's weights from seed 0 (the same
    in both forms), x [B, T, d_model] from seed 0 after them."""
    torch.set_num_threads(args.threads)
    cap = int(args.memory_limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    program = program_at(name, args)
    torch.manual_seed(0)
    layer = program.layer(mode="auto" if form == "chunked" else "reference")
    x = torch.randn(args.batch, args.length, program.d_model)
    return measure(layer, x, args.repeats if form == "chunked" else 1, args.budget)


def run_worker(name: str, form: str, args) -> dict:
    """`worker` in a fresh process; a crashed worker counts as failed in both modes."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, form,
               "--batch", str(args.batch), "--length", str(args.length),
               "--d-model", str(args.d_model), "--heads", str(args.heads),
               "--head-dim", str(args.head_dim), "--chunk", str(args.chunk),
               "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--budget", str(args.budget), "--memory-limit-gib", str(args.memory_limit_gib)]
    result, why = run_json(command)
    if why is None:
        return result
    return {"forward_tok_s": None, "train_tok_s": None,
            "errors": {"forward_tok_s": f"worker {why}", "train_tok_s": f"worker {why}"}}


def run_json(command: list[str]) -> tuple[dict | None, str | None]:
    """Run a worker process: (the JSON of its last output line, None), or (None, why it failed)."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1]), None
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"exit {done.returncode}: {tail}"


def physical_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def write(args, rows: list, done: bool = False) -> None:
    """The JSON so far (after every spec, so a killed run keeps what it measured)."""
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.platform(), "processor": platform.processor(),
              "torch": torch.__version__, "threads": args.threads, "budget_s": args.budget,
              "memory_limit_gib": args.memory_limit_gib, "complete": done,
              "shape": {"batch": args.batch, "length": args.length, "d_model": args.d_model,
                        "heads": args.heads, "head_dim": args.head_dim, "chunk": args.chunk},
              "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        if done:
            print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
