"""nlc against its peers in one run on this machine: tokens/s forward and forward+backward, and peak
memory, on CPU. Prints a table and writes JSON.

    pip install -e .[bench]        # titans-pytorch, nested-learning, fla-core (optional)
    nice python benchmarks/peers.py --json benchmarks/results/peers.json
    python benchmarks/peers.py --length 128 --only deltanet nlc-hope

Rows and what exactly each one runs are in `peer_adapters.py` (ROWS; `--list` prints them). A
row whose peer is not installed is skipped with a one-line message; with no peer installed only
the nlc rows run. Rows marked slow (nlc's reference loop over a whole titans or hope layer, many
minutes at T = 1024) run only with `--slow` or when named in `--only`.

Method. Every (row, mode) runs in a fresh Python process (`--worker`), with
`torch.set_num_threads(threads)`, so one row's allocations and caches never touch another's.
There: one warm-up call, then up to `--repeats` timed calls (fewer once `--budget` seconds are
spent); tokens/s = B * T / the best call. The timed calls run back to back, as the steps of a
training loop do: the allocator keeps what earlier calls freed. A call slower than the budget is
not repeated: its warm-up is the measurement (`warm_up_only` in the JSON). forward runs under
no_grad; forward+backward ("train") runs the forward and the backward of mean(out^2), gradients
of every parameter (layers) or every input (ops).
Peak memory is measured on one more call, after the timed ones (on the warm-up where that is the
only call): the worker collects garbage, returns freed heap to the OS (glibc `malloc_trim`), and
resets the kernel's resident-set high-water mark (VmHWM, by writing 5 to /proc/self/clear_refs);
the call's peak is VmHWM after it minus VmRSS before it: everything the call made resident
(tensors, autograd graph, Python objects), not what was there before (weights, inputs). That call
is not timed: after the trim it pays a page fault for every page it touches again, which the
steps of a training loop do not (on this machine that was up to a third of a call's time). Where
/proc/self/clear_refs is not writable the worker falls back to the growth of ru_maxrss over the
process (an upper bound for the first call, blind to later ones), and says so in the JSON.
Each worker runs under an address-space cap (`--memory-limit-gib`, RLIMIT_AS): a row that needs
more memory than the machine has is reported out of memory rather than swapping or waking the
OOM killer on a shared machine.
Targets compare forward+backward tokens/s (and, for titans, peak memory) between rows of one run.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chunked_vs_reference import physical_gib, run_json
from peer_adapters import ROWS, PeerMissing, Shape

MODES = ("forward", "train")
PEERS = {"titans-pytorch": "titans_pytorch", "nested-learning": "nested_learning",
         "fla-core": "fla"}


@dataclass(frozen=True)
class Target:
    row: str
    baseline: str
    min_ratio: float  # on forward+backward tokens/s
    no_more_memory: bool = False  # also: row's forward+backward peak <= baseline's


TARGETS = (
    Target("nlc-titans-d2", "titans-pytorch-d2", 3.0, no_more_memory=True),
    Target("nlc-titans-d1", "titans-pytorch-d1", 3.0, no_more_memory=True),
    Target("nlc-deltanet", "fla-deltanet", 2.0),
    Target("nlc-deltanet", "nlc-deltanet-ref", 15.0),
    Target("nlc-gated-deltanet", "fla-gated-deltanet", 2.0),
    Target("nlc-gated-deltanet", "nlc-gated-deltanet-ref", 15.0),
    Target("nlc-hope", "nested-learning-hope", 20.0),
)


# ---- the worker: one (row, mode) in its own process --------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMeter:
    """Peak resident memory of one call above the resident memory before it (see the module
    docstring)."""

    def __init__(self):
        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self.trim = None
        self.method = "VmHWM - VmRSS, reset via /proc/self/clear_refs"
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.trim is not None:
            self.trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS")
        except OSError:
            self.method = "ru_maxrss growth (clear_refs not writable)"
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_mib(self) -> float:
        if self.method.startswith("ru_maxrss"):
            top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            top = _status_kib("VmHWM")
        return max(top - self.base, 0) / 1024


def worker(name: str, mode: str, shape: Shape, repeats: int, budget: float,
           memory_gib: float) -> dict:
    row = next(r for r in ROWS if r.name == name)
    cap = int(memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        return measure(row.build(shape), mode, shape, repeats, budget)
    except PeerMissing as missing:
        return {"skipped": str(missing)}
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "allocate" not in str(error):
            raise
        return {"error": f"out of memory under the {memory_gib:g} GiB address-space cap"}


def measure(case, mode: str, shape: Shape, repeats: int, budget: float) -> dict:
    fn = case.forward if mode == "forward" else case.train
    meter = PeakMeter()

    def timed() -> float:
        gc.collect()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def metered() -> float:
        meter.start()
        fn()
        return meter.peak_mib()

    meter.start()
    warm_seconds = timed()
    warm_up_only = warm_seconds >= budget
    if warm_up_only:  # too slow to repeat: the warm-up is the measurement
        times, peak = [warm_seconds], meter.peak_mib()
    else:
        times = []
        while len(times) < repeats and sum(times) < budget:
            times.append(timed())
        peak = metered()
    return {"tok_s": shape.batch * shape.length / min(times), "seconds": min(times),
            "timed_calls": len(times), "warm_up_only": warm_up_only,
            "peak_mib": peak, "memory_method": meter.method, "config": case.config}


# ---- the driver --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def peer_versions() -> dict:
    out = {}
    for dist, module in PEERS.items():
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
        if out[dist] is not None and importlib.util.find_spec(module) is None:
            out[dist] = None
    return out


def run_row(name: str, args, shape: Shape) -> dict:
    """Both modes of one row, each in a fresh process: {mode: result or {"error": why}}, or
    {"skipped": why} when the row's peer cannot be imported."""
    out = {}
    for mode in MODES:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--mode", mode,
                   "--repeats", str(args.repeats), "--budget", str(args.budget),
                   "--threads", str(args.threads),
                   "--memory-limit-gib", str(args.memory_limit_gib)] + shape_flags(shape)
        result, why = run_json(command)
        if why is not None:
            out[mode] = {"error": why}
            continue
        if "skipped" in result:
            return result
        out[mode] = result
    return out


def shape_flags(shape: Shape) -> list[str]:
    return ["--batch", str(shape.batch), "--length", str(shape.length),
            "--d-model", str(shape.d_model), "--heads", str(shape.heads),
            "--head-dim", str(shape.head_dim), "--chunk", str(shape.chunk)]


def evaluate(targets, rows: dict) -> list[dict]:
    """The targets whose row or baseline ran, each with its ratio and pass/fail."""
    out = []
    for t in (t for t in targets if t.row in rows or t.baseline in rows):
        a, b = rows.get(t.row, {}), rows.get(t.baseline, {})
        entry = {"row": t.row, "baseline": t.baseline, "metric": "forward+backward tokens/s",
                 "min_ratio": t.min_ratio, "no_more_memory": t.no_more_memory}
        if "tok_s" not in a.get("train", {}) or "tok_s" not in b.get("train", {}):
            entry.update(ratio=None, passed=None, why="a row did not run or failed")
            out.append(entry)
            continue
        ratio = a["train"]["tok_s"] / b["train"]["tok_s"]
        passed = ratio >= t.min_ratio
        if t.no_more_memory:
            entry["peak_mib"] = {t.row: a["train"]["peak_mib"], t.baseline: b["train"]["peak_mib"]}
            entry["memory_ok"] = a["train"]["peak_mib"] <= b["train"]["peak_mib"]
            passed = passed and entry["memory_ok"]
        entry.update(ratio=ratio, passed=passed)
        out.append(entry)
    return out


def table(rows: dict, targets: list[dict]) -> str:
    vs = {}
    for t in targets:
        if t["ratio"] is not None:
            vs.setdefault(t["row"], []).append(
                f"{t['ratio']:.2f}x {t['baseline']} (>= {t['min_ratio']:g}: "
                f"{'pass' if t['passed'] else 'FAIL'})")
    head = (f"{'row':24s} {'fwd tok/s':>10s} {'fwd+bwd tok/s':>14s} {'fwd MiB':>8s} "
            f"{'fwd+bwd MiB':>11s}  fwd+bwd ratio vs target peer")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"{name:24s} skipped: {r['skipped']}")
            continue
        f, t = r["forward"], r["train"]
        cells = [(f"{m['tok_s']:{w}.0f}" if "tok_s" in m else f"{'error':>{w}s}") for m, w in
                 ((f, 10), (t, 14))]
        cells += [(f"{m['peak_mib']:{w}.1f}" if "tok_s" in m else f"{'-':>{w}s}") for m, w in
                  ((f, 8), (t, 11))]
        errors = [f"{mode}: {r[mode]['error']}" for mode in MODES if "error" in r[mode]]
        lines.append(f"{name:24s} {' '.join(cells)}  {'; '.join(vs.get(name, []) + errors)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="stop repeating a row's mode once its timed calls took this long (s)")
    parser.add_argument("--memory-limit-gib", type=float, default=round(0.75 * physical_gib(), 1),
                        help="address-space cap of each worker: a row that needs more is "
                             "reported out of memory instead of taking the machine down "
                             "(default: 3/4 of this machine's memory)")
    parser.add_argument("--only", nargs="*", default=None,
                        help="row names or groups (titans-d2, deltanet, hope, ...)")
    parser.add_argument("--slow", action="store_true", help="also run the rows marked slow")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = Shape(args.batch, args.length, args.d_model, args.heads, args.head_dim, args.chunk)
    torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(worker(args.worker, args.mode, shape, args.repeats, args.budget,
                                args.memory_limit_gib)))
        return
    if args.list:
        for r in ROWS:
            print(f"{r.name:24s} {r.group:15s} {'(slow) ' * r.slow}{r.label}")
        return
    selected = [r for r in ROWS if r.name in (args.only or ())
                or (not r.slow or args.slow) and (args.only is None or r.group in args.only)]
    unknown = set(args.only or ()) - {r.name for r in ROWS} - {r.group for r in ROWS}
    if unknown:
        parser.error(f"unknown rows or groups: {', '.join(sorted(unknown))} (see --list)")

    versions = peer_versions()
    began = time.perf_counter()
    rows = {}
    for r in selected:
        if r.peer is not None and versions[r.peer] is None:
            rows[r.name] = {"skipped": f"{r.peer} is not installed (pip install -e .[bench])"}
        else:
            rows[r.name] = run_row(r.name, args, shape)
        got = rows[r.name]
        print(f"{r.name}: " + (got["skipped"] if "skipped" in got else ", ".join(
            f"{mode} " + (f"{got[mode]['tok_s']:.0f} tok/s" if "tok_s" in got[mode]
                          else got[mode]["error"]) for mode in MODES)), flush=True)
        if args.json:  # after every row, so that a long run stopped midway keeps what it measured
            write_report(args, shape, versions, selected, rows, time.perf_counter() - began)
    print()
    print(table(rows, evaluate(TARGETS, rows)))
    if args.json:
        print(f"wrote {args.json}")


def write_report(args, shape: Shape, versions: dict, selected, rows: dict, wall_s: float) -> None:
    done = [r for r in selected if r.name in rows]
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.platform(), "processor": cpu_model(),
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "threads": args.threads, "peers": versions,
              "shape": asdict(shape), "dtype": "float32", "repeats": args.repeats,
              "budget_s": args.budget, "memory_limit_gib": args.memory_limit_gib,
              "method": __doc__.split("Method. ", 1)[1].strip(), "wall_s": wall_s,
              "complete": len(done) == len(selected),
              "rows": [{"name": r.name, "group": r.group, "peer": r.peer, "label": r.label,
                        "math_differences": r.math or None, **rows[r.name]} for r in done],
              "targets": evaluate(TARGETS, rows)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")

if __name__ == "__main__":
    main()
