"""The README's exploration at the issue's size (length 256, vocabulary 512): the delta family on MQAR
(16-64 pairs), a TPE sample of a slice of the Miras space there, and the delta family on
forgetting-MQAR (16 and 32 pairs, half of them re-assigned); each run is followed by `nlc report`.
Rerunning resumes.

    .venv/bin/python examples/explore_mqar.py [--out runs/explore_mqar] [--workers 2]
                                              [--only delta_mqar] [--seed 0]

Vocabulary 512, not Zoology's 8192: at 8192 neither Gated DeltaNet nor linear attention left chance
in 400 steps on this machine (the README has the pilots and the runs' results).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--batch", "32", "--threads", "1", "--lrs", "1e-2"]
SIZE = ["--task-arg", "seq_len=256", "--task-arg", "vocab=512", "--train-examples", "20000",
        "--test-examples", "1000"]
MQAR = ["--task", "mqar", "--task-arg", "kv_pairs=16,32,64", *SIZE]
RUNS = {  # name: spec, arguments (each run stops starting trials after its budget)
    "delta_mqar": ("specs/delta_space.nl", [*MQAR, "--steps", "1500", "--budget", "30m"]),
    "miras_tpe": ("specs/miras_space.nl",
                  [*MQAR, "--steps", "1000", "--budget", "20m", "--space", "miras_slice",
                   "--sampler", "tpe", "--trials", "8", "--set", "max_lr=1"]),
    "delta_forgetting": ("specs/delta_space.nl",
                         ["--task", "forgetting_mqar", "--task-arg", "kv_pairs=16,32", *SIZE,
                          "--steps", "1500", "--budget", "20m"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/explore_mqar")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--only", choices=sorted(RUNS), help="run one of the three")
    parser.add_argument("--seed", default="0", help="task, initialization and sampler seed")
    args = parser.parse_args()
    for name, (spec, extra) in RUNS.items():
        if args.only and name != args.only:
            continue
        out = str(Path(args.out) / (name if args.seed == "0" else f"{name}_seed{args.seed}"))
        nlc = [sys.executable, "-m", "nlc"]
        subprocess.run([*nlc, "explore", spec, *COMMON, *extra, "--out", out,
                        "--workers", args.workers, "--seed", args.seed],
                       cwd=ROOT, check=True)
        subprocess.run([*nlc, "report", out], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
