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
        form = "reference loop" if p.family == "reference" else f"chunk-parallel ({p.family}, chunk {p.chunk})"
        print(f"  level {p.level}: {form}: {p.reason}")
        note = per_token_note(program.rules[p.level], p)
        if note:
            print(f"  note: {note}")
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
