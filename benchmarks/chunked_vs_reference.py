"""Speed of each shipped spec's layer: the chunk-parallel form (mode='auto') against the reference
per-token loop, forward and forward+backward, in one run on this machine. Prints a table and writes
JSON. Peers (titans-pytorch, nested-learning, fla) are not compared here yet.

    python benchmarks/chunked_vs_reference.py --length 1024 --json benchmarks/chunked_vs_reference.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
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


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs after one warm-up (best-of: the machine is shared)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(layer, x, repeats: int) -> dict:
    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        layer(x).pow(2).mean().backward()

    tokens = x.shape[0] * x.shape[1]
    return {"forward_tok_s": tokens / timed(forward, repeats),
            "train_tok_s": tokens / timed(forward_backward, repeats)}


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
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.specs:
        base = nlc.compile(SPECS / f"{name}.nl")
        program = nlc.compile(SPECS / f"{name}.nl", **overrides(base.params, args))
        plans = {p.level: p.family for p in program.plans.values()}
        if set(plans.values()) == {"reference"}:
            print(f"{name:18s} no chunk-parallel level: skipped ({program.dump('plans')})", flush=True)
            rows.append({"spec": name, "plans": plans, "skipped": "no chunk-parallel level"})
            continue
        torch.manual_seed(0)
        chunked = program.layer(mode="auto")
        reference = program.layer(mode="reference")
        reference.load_state_dict(chunked.state_dict())
        x = torch.randn(args.batch, args.length, program.d_model)
        row = {"spec": name, "plans": plans,
               "chunked": measure(chunked, x, args.repeats),
               "reference": measure(reference, x, 1)}
        row["speedup_forward"] = row["chunked"]["forward_tok_s"] / row["reference"]["forward_tok_s"]
        row["speedup_train"] = row["chunked"]["train_tok_s"] / row["reference"]["train_tok_s"]
        rows.append(row)
        print(f"{name:18s} {','.join(sorted(set(plans.values()))):18s} "
              f"fwd {row['chunked']['forward_tok_s']:9.0f} tok/s ({row['speedup_forward']:5.1f}x)  "
              f"fwd+bwd {row['chunked']['train_tok_s']:9.0f} tok/s ({row['speedup_train']:5.1f}x)",
              flush=True)

    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": platform.platform(), "processor": platform.processor(),
              "torch": torch.__version__, "threads": args.threads,
              "shape": {"batch": args.batch, "length": args.length, "d_model": args.d_model,
                        "heads": args.heads, "head_dim": args.head_dim, "chunk": args.chunk},
              "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
