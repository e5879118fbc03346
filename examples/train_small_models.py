"""Train small Transformer++, Titans-MAC, Gated DeltaNet, ATLAS and Hope models on the Python standard
library's own source (bytes, found on every machine) for the same token budget on CPU, then print
and plot validation bits per byte and passkey recall side by side.

    .venv/bin/python examples/train_small_models.py                 # ~40 min on a loaded 2-core machine
    .venv/bin/python examples/train_small_models.py --tokens 400000 --models transformer hope

Each model is trained by `nlc.train.train` (AdamW, cosine schedule, checkpoints) into OUT/<name>/;
the comparison is printed and drawn to OUT/comparison.png. A spec missing from specs/ is skipped
(`titans`, the memory alone, stands in for `titans_mac` when that is absent).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
from pathlib import Path

import torch
from matplotlib.figure import Figure

from nlc.train import RunError, TrainConfig, needle_recall, train

SPECS = Path(__file__).resolve().parent.parent / "specs"
WIDTH = {"d_model": 256, "heads": 4}  # 1.1M-2.8M parameters at 2 layers (vocabulary 256)
# name -> (spec, overrides, learning rate): one width for all; ATLAS and Hope get narrow heads (their
# MLP memories keep per-token weights, which dominate CPU time and memory at wider heads); Hope
# diverges at 3e-3 (NaN by step 10), so it trains at 1e-3
MODELS = {
    "transformer": ("transformer", {}, 3e-3),
    "titans_mac": ("titans_mac", {}, 3e-3),
    "gated_deltanet": ("gated_deltanet", {"d_key": 64, "d_value": 128}, 3e-3),
    "atlas": ("atlas", {"d_head": 16, "d_phi": 4}, 3e-3),
    "hope": ("hope", {"d_head": 16}, 1e-3),
}
FALLBACK = {"titans_mac": "titans"}


def stdlib_corpus(path: Path) -> Path:
    """The standard library's top-level .py files, sorted by name, joined into one file."""
    if not path.exists():
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        path.write_bytes(b"".join(f.read_bytes() for f in files))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128 * 8 * 128, help="training bytes per model")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default="build/small_models")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--threads", type=int, default=1, help="1 is faster on a busy machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(out / "stdlib.py.txt")
    steps = max(1, args.tokens // (args.batch * args.seq_len))
    print(f"corpus: {corpus} ({corpus.stat().st_size:,} bytes); {steps} steps of {args.batch} x "
          f"{args.seq_len} bytes per model")

    rows = []
    for name in args.models:
        spec, overrides, lr = MODELS[name]
        if not (SPECS / f"{spec}.nl").is_file():
            spec = FALLBACK.get(name, spec)
        if not (SPECS / f"{spec}.nl").is_file():
            print(f"{name}: no specs/{spec}.nl, skipped")
            continue
        config = TrainConfig(spec=str(SPECS / f"{spec}.nl"), data=str(corpus), out=str(out / name),
                             steps=steps, overrides={**WIDTH, **overrides}, layers=args.layers,
                             batch=args.batch, seq_len=args.seq_len, lr=lr,
                             checkpoint_every=steps, val_tokens=16384)
        shutil.rmtree(out / name, ignore_errors=True)  # a fresh run every time
        try:
            model, summary = train(config, progress=True)
        except RunError as err:  # diverged: say so and go on with the others
            print(f"{name}: {err}")
            continue
        needle = needle_recall(model, args.needle_lengths, depths=(0.0, 0.5, 1.0), trials=2)
        recall = {n: sum(r["digits"] for r in needle if r["length"] == n) / 3 for n in args.needle_lengths}
        rows.append({"model": name, "spec": spec, "lr": lr, **summary, "needle_digits": recall})
        print(f"{name}: {summary['val_bpb']:.3f} bits/byte after {summary['elapsed_s']:.0f} s")

    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    head = ["model", "params", "lr", "tokens", "train s", "val bpb"]
    head += [f"needle@{n}" for n in args.needle_lengths]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["model"], f"{r['parameters']:,}", f"{r['lr']:g}", f"{r['tokens']:,}",
                 f"{r['elapsed_s']:.0f}",
                 f"{r['val_bpb']:.3f}"] + [f"{r['needle_digits'][n]:.2f}" for n in args.needle_lengths]
        print("| " + " | ".join(cells) + " |")
    print("needle@N: passkey digit accuracy at prompt length N, 3 depths x 2 keys (0.10 for a model "
          "that guesses digits; exact-key recall needs all 5)")
    plot(rows, args.needle_lengths, out / "comparison.png")
    print(f"wrote {out / 'comparison.png'} and {out / 'comparison.json'}")


def plot(rows: list[dict], lengths: list[int], path: Path) -> None:
    """Validation bits per byte and needle digit accuracy per model, side by side."""
    fig = Figure(figsize=(10, 4))
    bpb, recall = fig.subplots(1, 2)
    names = [r["model"] for r in rows]
    bpb.bar(names, [r["val_bpb"] for r in rows], color="tab:blue")
    bpb.set(ylabel="validation bits / byte", title="language modelling (lower is better)")
    width = 0.8 / len(lengths)
    for i, n in enumerate(lengths):
        recall.bar([j + i * width for j in range(len(rows))], [r["needle_digits"][n] for r in rows],
                   width, label=f"{n} bytes")
    recall.axhline(0.1, color="gray", ls="--", lw=1, label="chance")
    recall.set_xticks([j + width * (len(lengths) - 1) / 2 for j in range(len(rows))], names)
    recall.set(ylabel="passkey digit accuracy", title="needle recall beyond training length", ylim=(0, 1))
    recall.legend()
    for ax in (bpb, recall):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
