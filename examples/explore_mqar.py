"""The README's exploration: the delta family on MQAR and on forgetting-MQAR (every point), and a TPE
sample of a slice of the Miras space on MQAR, each followed by `nlc report`. Rerunning resumes.

    .venv/bin/python examples/explore_mqar.py [--out runs/explore_mqar] [--budget 40m] [--workers 1]
                                              [--only delta_mqar] [--seed 0]

The task size is what this example's machine (2 shared CPU cores) can train in the budget; the issue's
size is `--task-arg seq_len=256 --task-arg kv_pairs=16,32,64 --task-arg vocab=8192`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "500", "--batch", "32", "--train-examples", "4000", "--test-examples", "500",
         "--threads", "1", "--task-arg", "vocab=128", "--task-arg", "seq_len=64"]
RUNS = {  # name: spec, task, extra arguments (a two-rate sweep where the time allowed it)
    "delta_mqar": ("specs/delta_space.nl", "mqar", ["--task-arg", "kv_pairs=4,8,16",
                                                    "--lrs", "3e-3,1e-2"]),
    "delta_forgetting": ("specs/delta_space.nl", "forgetting_mqar", ["--task-arg", "kv_pairs=4,8",
                                                                     "--lrs", "1e-2"]),
    "miras_tpe": ("specs/miras_space.nl", "mqar",
                  ["--task-arg", "kv_pairs=4,8,16", "--lrs", "1e-2", "--space", "miras_slice",
                   "--sampler", "tpe", "--trials", "6"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/explore_mqar")
    parser.add_argument("--budget", default="40m", help="per run: no trial starts after this")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--only", choices=sorted(RUNS), help="run one of the three")
    parser.add_argument("--seed", default="0", help="task, initialization and sampler seed")
    args = parser.parse_args()
    for name, (spec, task, extra) in RUNS.items():
        if args.only and name != args.only:
            continue
        out = str(Path(args.out) / (name if args.seed == "0" else f"{name}_seed{args.seed}"))
        nlc = [sys.executable, "-m", "nlc"]
        subprocess.run([*nlc, "explore", spec, "--task", task, *TRAIN, *extra, "--out", out,
                        "--budget", args.budget, "--workers", args.workers, "--seed", args.seed],
                       cwd=ROOT, check=True)
        subprocess.run([*nlc, "report", out], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
