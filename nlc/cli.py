"""The `nlc` command line: check, graph, compile and run a spec. Each subcommand mirrors the Python API
(`nlc.compile(path, **overrides)` and the returned Program). Bad specs exit 2 with a rendered
diagnostic and no traceback; anything else that goes wrong is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

DUMP_STAGES = ("ast", "graph", "rules", "plans", "sources")
GRAPH_FORMATS = {".dot": None, ".svg": "svg", ".png": "png"}


class UsageError(Exception):
    """A command-line problem outside the spec itself (missing file, no graphviz): exit 2."""


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _override(text: str) -> tuple[str, int | float]:
    """Parse `--set k=v`; v is an int if it reads as one, else a float."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}")
    try:
        return key.strip(), _number(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key.strip()}: {value!r} is not a number") from None


def _compile(args: argparse.Namespace):
    import nlc

    path = Path(args.spec)
    if not path.is_file():
        raise UsageError(f"no such spec file: {args.spec}")
    return nlc.compile(path, **dict(args.set))


def cmd_check(args: argparse.Namespace) -> int:
    from .plan import per_token_note
    program = _compile(args)
    for diagnostic in program.diagnostics:
        print(diagnostic.render(program.source), file=sys.stderr)
    names = ", ".join(level.name for level in program.levels)
    n, g = len(program.levels), len(program.gates)
    print(f"{args.spec}: ok — {n} level{'s' * (n != 1)} ({names}), {g} gate{'s' * (g != 1)}")
    for p in program.plans.values():
        form = {"reference": "reference loop", "sequential": "sequential (tokens in order)"}.get(
            p.family, f"chunk-parallel ({p.family}, chunk {p.chunk})")
        print(f"  level {p.level}: {form}: {p.reason}")
        note = per_token_note(program.rules[p.level], p)
        if note:
            print(f"  note: {note}")
        print(f"    triton: {program.triton_summary(p.level)}")
    if program.checked.optimizer is not None:
        fields = program.checked.optimizer.describe()
        print("  optimizer (outer level): " + "  ".join(f"{k} {v}" for k, v in fields.items()))
    for space in program.spaces:
        valid = space.valid if isinstance(space.valid, int) else len(space.valid)
        print(f"  space {space.name}: {space.size} points, {valid} valid")
        for point, reason in space.invalid[:5]:
            print(f"    invalid: {point}: {reason}")
        if len(space.invalid) > 5:
            print(f"    ... and {len(space.invalid) - 5} more invalid")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from nlc import graph

    out = Path(args.output) if args.output else None
    if out is not None and out.suffix not in GRAPH_FORMATS:
        raise UsageError(f"unknown graph format {out.suffix!r}: use one of {', '.join(GRAPH_FORMATS)}")
    fmt = GRAPH_FORMATS[out.suffix] if out is not None else None
    if fmt and shutil.which("dot") is None:
        raise UsageError(f"writing {out} needs graphviz's `dot`: install graphviz, or write a .dot file")
    program = _compile(args)
    if args.text:
        print(graph.to_text(program.graph))
        return 0
    dot = graph.to_dot(program.graph)
    if out is None:
        print(dot)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt is None:
        out.write_text(dot)
    else:
        done = subprocess.run(["dot", f"-T{fmt}", "-o", str(out)], input=dot, text=True,
                              capture_output=True)
        if done.returncode != 0:
            print(f"nlc: dot failed on the generated graph:\n{done.stderr}", file=sys.stderr)
            return 1
    print(f"wrote {out}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    program = _compile(args)
    if args.dump:
        print(program.dump(args.dump))
        return 0
    outdir = Path(args.output) if args.output else Path("build") / program.name
    for name, text in program.sources.items():
        target = outdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(target)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    start = time.perf_counter()
    program = _compile(args)
    torch.manual_seed(args.seed)
    layer = program.layer()
    built = time.perf_counter()
    x = torch.randn(args.batch, args.length, layer.d_model)
    y = layer(x)
    y.pow(2).sum().backward()
    done = time.perf_counter()
    params = sum(p.numel() for p in layer.parameters())
    print(f"{program.name}: output shape {list(y.shape)}, {params:,} parameters")
    print(f"generated module: {program.cache_dir}")
    print(f"time: {done - built:.2f} s forward+backward, {built - start:.2f} s compile")
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    if bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all()) for g in grads):
        return 0
    from .runtime.finite import NonFiniteError, watch
    try:  # the same inputs again, stopping at the first non-finite tensor to name it
        watch(layer)(x)
        where = "in the backward pass (the forward pass is finite)"
    except NonFiniteError as err:
        where = str(err)
    print(f"nlc: error: the layer's results are not finite on unit-variance random inputs: {where}. "
          "A memory whose steps are too large for its keys diverges: see `nlc check` for the rules, "
          "and try smaller learning-rate parameters with --set", file=sys.stderr)
    return 1


def _task_arg(text: str) -> tuple[str, object]:
    """Parse `--task-arg k=v`: v a number, a comma list of numbers (`kv_pairs=16,32,64`), or else a
    string (`path=corpus.txt`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        items = [_number(x.strip()) for x in value.split(",")]
    except ValueError:
        return key.strip(), value
    return key.strip(), items[0] if len(items) == 1 else tuple(items)


def cmd_explore(args: argparse.Namespace) -> int:
    from .explore import search
    from .explore.trainer import TrainConfig
    from .explore.trial import Settings

    if not Path(args.spec).is_file():
        raise UsageError(f"no such spec file: {args.spec}")
    try:
        budget = search.parse_budget(args.budget) if args.budget else None
        lrs = tuple(float(x) for x in args.lrs.split(","))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.workers < 1 or (args.trials is not None and args.trials < 1):
        raise UsageError("--workers and --trials must be >= 1")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: this machine has no CUDA device")
    train = TrainConfig(steps=args.steps, batch=args.batch, layers=args.layers, seed=args.seed,
                        device=args.device, mode=args.mode)
    settings = Settings(task=args.task, task_args=dict(args.task_arg), lrs=lrs, train=train,
                        train_examples=args.train_examples, test_examples=args.test_examples,
                        overrides=dict(args.set))
    run = search.Run(args.spec, Path(args.out), settings, sampler=args.sampler, space=args.space,
                     storage=args.storage, workers=args.workers, trials=args.trials,
                     budget_s=budget, seed=args.seed, threads=args.threads)
    try:
        search.explore(run, progress=not args.quiet)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"nlc: trials stored in {args.storage or Path(args.out) / 'study.db'}; "
          f"`nlc report {args.out}` ranks them")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .explore.report import report

    out = Path(args.out)
    if args.storage is None and not (out / "study.db").is_file():
        raise UsageError(f"no study.db in {out} (pass --storage URL for a server)")
    try:
        for folder in report(out, args.storage):
            print(f"wrote {folder}/: results.csv, results.json, pareto.png|svg, effects.png|svg, best/")
    except ValueError as err:
        raise UsageError(str(err)) from None
    return 0


def _training():
    """`nlc.train`, or a usage error naming the missing `train` extra."""
    try:
        from . import train
    except ImportError as err:
        raise UsageError(f"nlc train and nlc eval need the `train` extra ({err.name} is missing): "
                         "pip install 'nlc[train]'") from None
    return train


def cmd_train(args: argparse.Namespace) -> int:
    import os

    import torch.distributed as dist

    training = _training()
    config = training.TrainConfig(
        spec=args.spec, data=args.data, out=args.out, steps=args.steps, overrides=dict(args.set),
        layers=args.layers, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
        checkpoint_every=args.checkpoint_every, seed=args.seed, mode=args.mode, optimizer=args.optimizer,
        recompute=args.recompute)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one process per rank
        dist.init_process_group()
    try:
        _, summary = training.train(config, resume=args.resume, progress=not args.quiet)
    except training.RunError as err:
        raise UsageError(str(err)) from None
    if not dist.is_initialized() or dist.get_rank() == 0:
        bpb = f", {summary['val_bpb']:.4f} bits/byte" if "val_bpb" in summary else ""
        print(f"{summary['step']} steps, {summary['tokens']:,} tokens, {summary['elapsed_s']:.1f} s: "
              f"train loss {summary['train_loss']:.4f}, validation loss {summary['val_loss']:.4f}{bpb}")
        print(f"wrote {args.out}/: checkpoint.pt, log.jsonl, log.csv, loss.png, summary.json")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    import nlc
    training = _training()
    target = Path(args.target)
    if target.is_dir():
        if args.set or args.layers is not None:
            raise UsageError("--set and --layers apply to a SPEC; a run folder keeps its own")
    elif not target.is_file():
        raise UsageError(f"no run folder or spec file at {target}")
    elif not args.data:
        raise UsageError("evaluating an untrained SPEC needs --data")
    try:
        if target.is_dir():
            model, config, data = training.load_run(target)
            seq_len, split = config.seq_len, {"val_fraction": config.val_fraction, "seed": config.seed}
        else:
            seq_len, split = args.seq_len, {}
        if args.data:
            data = training.data.open_data(args.data, seq_len, **split)
    except (training.RunError, FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    if target.is_file():
        torch.manual_seed(args.seed)
        model = nlc.compile(target, **dict(args.set)).model(data.vocab_size, args.layers).eval()
    result = training.validation(model, data, args.batch, seq_len, args.val_tokens)
    print(f"validation: loss {result['val_loss']:.4f}, accuracy {result['val_accuracy']:.3f}"
          + (f", {result['val_bpb']:.4f} bits/byte" if "val_bpb" in result else "")
          + f" ({result['val_tokens']:,} tokens)")
    if isinstance(data, training.data.ByteText):
        lengths = args.needle_lengths or [seq_len, 2 * seq_len, 4 * seq_len]
        result["needle"] = training.needle_recall(model, lengths, trials=args.trials, batch=args.batch)
        print(training.needle_table(result["needle"]))
    if target.is_dir():
        (target / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nlc", description="Compile nested-optimization sequence models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    spec = argparse.ArgumentParser(add_help=False)
    spec.add_argument("spec", metavar="SPEC", help="path to a .nl spec")
    spec.add_argument("--set", action="append", default=[], type=_override, metavar="K=V",
                      help="override a spec parameter (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", parents=[spec], help="check a spec and derive its rules")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("graph", parents=[spec], help="draw the level graph (DOT, SVG, PNG or text)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="OUT", help="write to OUT (.dot, .svg or .png)")
    out.add_argument("--text", action="store_true", help="print the graph as indented text")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("compile", parents=[spec], help="write the generated sources")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (default build/<model>/)")
    p.add_argument("--dump", choices=DUMP_STAGES, help="print one stage's output instead")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", parents=[spec], help="build the layer and run forward and backward once")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("explore", parents=[spec], help="search a spec's design space on a task")
    p.add_argument("--task", default="mqar", help="mqar, forgetting_mqar, in_context_recall, "
                   "noisy_recall, fuzzy_recall, selective_copying, compression, memorization, or text "
                   "(next-byte prediction on a local file: --task-arg path=FILE)")
    p.add_argument("--task-arg", action="append", default=[], type=_task_arg, metavar="K=V",
                   help="task difficulty, e.g. seq_len=256 or kv_pairs=16,32,64 (repeatable)")
    p.add_argument("--out", required=True, help="run folder (SQLite storage, report)")
    p.add_argument("--storage", help="SQLAlchemy URL of a shared storage (postgresql://...)")
    p.add_argument("--sampler", choices=("grid", "tpe", "nsga2"), default="grid")
    p.add_argument("--space", help="which space of the spec (default: the first)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--trials", type=int, help="stop after this many points are recorded (a sampler's "
                   "return to a recorded point reuses its record and does not count)")
    p.add_argument("--budget", help="start no trial after this long, e.g. 2h, 45m")
    p.add_argument("--steps", type=int, default=400, help="training steps per learning rate")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--layers", type=int, help="layers of the model (default: the spec's `layers`, else 2)")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning-rate sweep, comma-separated")
    p.add_argument("--train-examples", type=int, default=2000)
    p.add_argument("--test-examples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers; "
                   "1 is faster on a busy machine)")
    p.add_argument("--device", default="cpu", help="where trials train: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--mode", default="auto", choices=("auto", "chunk", "reference", "triton"),
                   help="how the layers run (default auto: Triton on CUDA, else chunked on long inputs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("report", help="rank an exploration's trials: table, CSV/JSON, plots, best specs")
    p.add_argument("out", metavar="DIR", help="the run folder given to `nlc explore --out`")
    p.add_argument("--storage", help="SQLAlchemy URL, when the run used one")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", parents=[spec], help="train the spec's language model on text or a task")
    p.add_argument("--data", required=True, metavar="PATH|task:NAME",
                   help="a text file or folder (byte level), or a synthetic task such as task:mqar")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoint, logs, plot)")
    p.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the spec optimizer's `lr`, "
                   "else 1e-3)")
    p.add_argument("--optimizer", choices=("auto", "adamw", "spec"), default="auto",
                   help="auto: the spec's `optimizer { }` if it declares one, else AdamW")
    p.add_argument("--layers", type=int, help="layers (default: the spec's `layers`, else 2)")
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="N")
    p.add_argument("--mode", choices=("auto", "reference", "chunk"), default="auto")
    p.add_argument("--recompute", type=int, metavar="TOKENS",
                   help="train the levels TOKENS tokens at a time, recomputing each segment in the "
                        "backward pass (less memory on long sequences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss, bits/byte and passkey recall of a run or a spec")
    p.add_argument("target", metavar="DIR|SPEC", help="a run folder of `nlc train`, or a spec (untrained)")
    p.add_argument("--data", metavar="PATH|task:NAME", help="default for DIR: the data it trained on")
    p.add_argument("--needle-lengths", type=int, nargs="+", metavar="N",
                   help="prompt lengths in bytes (default: 1, 2 and 4 times the training length)")
    p.add_argument("--trials", type=int, default=4, help="pass keys per length and depth")
    p.add_argument("--val-tokens", type=int, default=65536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--set", action="append", default=[], type=_override, metavar="K=V",
                   help="spec parameter (SPEC only, repeatable)")
    p.add_argument("--layers", type=int, help="SPEC only")
    p.add_argument("--seq-len", type=int, default=256, help="SPEC only: the nominal training length")
    p.add_argument("--seed", type=int, default=0, help="SPEC only: initialisation seed")
    p.set_defaults(func=cmd_eval)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nlc")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run one `nlc` command; returns the exit code (0 ok, 2 bad spec or usage)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help, --version or a usage error
        return stop.code if isinstance(stop.code, int) else 2
    from nlc import SpecError

    try:
        return args.func(args)
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return 2
    except UsageError as err:
        print(f"nlc: error: {err}", file=sys.stderr)
        return 2
