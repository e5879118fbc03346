"""Code injection through a spec: hostile identifiers, strings and numbers in every position a spec
takes a name (model, param, gate, let, level, space) or a number. Each case ends in a SpecError with
a location, or in generated sources whose syntax trees equal the benign spec's once the role-prefixed
names are mapped back (tests/test_codegen.py's `normalised`); the layer then imports and runs, no
sentinel file appears, and the cache folder stays under the cache root. tests/test_codegen.py holds
the first table of hostile level/gate/let/param names and the hostile file name; this one widens it
to every position, to non-names and to numbers."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

import nlc
from tests.test_codegen import _Rename, _strip_docstrings

from .test_fuzz_frontend import assert_located

TEMPLATE = """\
model «M»
param d_model = 8
param heads = 1
param «P» = 4
gate «A»[heads] = sigmoid(linear(x))
gate «B»[heads] = sigmoid(linear(x))
let q[heads, 4] = l2norm(linear(x))
let «K»[heads, 4] = l2norm(linear(x))
let v[heads, 4] = linear(x)
level «L» {
  memory matrix
  bias l2
  retention decay(«A»)
  algorithm gd(lr = «B» * «N»)
  key «K»
}
space «S» over «L» { algorithm in {gd(lr = «B»), gd(lr = 0.5)} }
output = x + linear(«L») * «P»
"""
BENIGN = dict(M="m", P="dk", A="alpha", B="beta", K="k", L="memory", S="s", N="1")
POSITIONS = ("M", "P", "A", "B", "K", "L", "S")  # N is the number position
SENTINEL = "nlc_injection_sentinel"

# Valid NAME tokens that are Python keywords, builtins, dunders, or names generated code uses.
IDENTIFIERS = ["class", "lambda", "None", "return", "match", "__import__", "__builtins__",
               "__class__", "__init__", "eval", "exec", "open", "getattr", "print", "super", "os",
               "sys", "torch", "triton", "tl", "nn", "math", "self", "Layer", "blocks", "dispatch",
               "_pack", "STATE", "initial_state", "level_memory", "B", "T", "_", "x" * 64]
# Text that is no NAME: the lexer must stop it with a located diagnostic.
NON_NAMES = [f"__import__('os').system('touch {SENTINEL}')", "a'b", 'a"b', 'a"""b', "a\nb",
             "a\rb", "../../etc/passwd", "/tmp/x", "a.b", "a b", "a;b", "a)b", "${HOME}", "{b}",
             "é", "a\\b", "`id`", "a\x00b", "1a", "a-b", "x" * 65]
NUMBERS = ["1e308", "1e309", "-0", "1e-400", "0x10", "1_000", "nan", "inf", "1e-5", "0777",
           "9" * 400, "(1)", "__import__('os')"]


def spec(**names) -> str:
    text = TEMPLATE
    for key, value in {**BENIGN, **names}.items():
        text = text.replace(f"«{key}»", value)
    return text


CASES = ([(f"{pos}={name!r}", {pos: name}) for pos in POSITIONS for name in IDENTIFIERS + NON_NAMES]
         + [(f"N={n!r}", {"N": n}) for n in NUMBERS])


@pytest.fixture(scope="module")
def benign():
    """The benign program for a case, and its structure per file: generated code lists gates in
    name order, so a hostile gate name is compared with a benign one that sorts the same way."""
    programs = {}

    def get(names: dict) -> tuple:
        chosen = dict(BENIGN)
        if names.get("A", "") > BENIGN["B"]:
            chosen["A"] = "gamma"  # sorts after beta, as the hostile name does
        if names.get("B", "~") < BENIGN["A"]:
            chosen["B"] = "aardvark"  # sorts before alpha
        key = tuple(sorted(chosen.items()))
        if key not in programs:
            program = nlc.compile(spec(**chosen))
            programs[key] = (program, chosen,
                             {file: structure(text, {}) for file, text in program.sources.items()})
        return programs[key]
    return get


def structure(source: str, mapping: dict) -> str:
    """The syntax tree without docstrings, role-prefixed spec names mapped back (`g_self` ->
    `g_beta`), and each run of adjacent assignments in a fixed order (generated code lists gates by
    name, so a renamed gate may move within its run)."""
    tree = _Rename(mapping).visit(_strip_docstrings(ast.parse(source)))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = _sorted_runs(body)
    return ast.dump(tree)


def _sorted_runs(body: list) -> list:
    out, run = [], []
    for stmt in body + [None]:
        if isinstance(stmt, ast.Assign):
            run.append(stmt)
            continue
        out += sorted(run, key=ast.dump) + ([stmt] if stmt is not None else [])
        run = []
    return out


@pytest.fixture(scope="module", autouse=True)
def in_a_scratch_directory(tmp_path_factory):
    """Run from a scratch folder, so that a relative `touch` would land where we look."""
    here, scratch = os.getcwd(), tmp_path_factory.mktemp("injection")
    os.chdir(scratch)
    yield scratch
    os.chdir(here)
    assert not (scratch / SENTINEL).exists(), "a spec ran a shell command"


def test_there_are_enough_cases():
    assert len(CASES) >= 350


@pytest.mark.parametrize("case,names", CASES, ids=[c for c, _ in CASES])
def test_hostile_text(benign, case, names, in_a_scratch_directory):
    benign, reference, benign_structure = benign(names)
    text = spec(**names)
    try:
        program = nlc.compile(text)
    except nlc.SpecError as exc:
        assert_located(exc, text, "<spec>")
        return
    name = next(iter(names.values()))
    assert name not in NON_NAMES, f"{case}: compiled a non-name"
    root = Path(os.environ["NLC_CACHE_DIR"]).resolve()
    assert program.cache_dir.resolve().parent == root, program.cache_dir
    mapping = {names.get(k, v): v for k, v in reference.items() if k in ("P", "A", "B", "K", "L")}
    level = names.get("L", BENIGN["L"])
    files = {f.replace(f"level_{level}", "level_memory", 1): f for f in program.sources}
    assert set(files) == set(benign.sources), f"{case}: other files than the benign spec's"
    for base_file, file in files.items():
        source = program.sources[file]
        ast.parse(source, filename=file)
        if "N" in names:  # a number changes constants (a zero rate drops a gate), never names
            assert _identifiers(source) <= _identifiers(benign.sources[base_file]), f"{case}: {file}"
        else:
            assert structure(source, mapping) == benign_structure[base_file], \
                f"{case}: {file} differs from the benign spec's {base_file} beyond renaming"
    if not {"L", "N"} & set(names):
        return  # the same code as the benign spec's: running one position per name suffices
    torch.manual_seed(0)
    layer = program.layer()
    y = layer(torch.randn(1, 4, layer.d_model))
    assert y.shape == (1, 4, layer.d_model)
    assert not (in_a_scratch_directory / SENTINEL).exists()


def _identifiers(source: str) -> set[str]:
    """Every name, attribute, argument and definition in a module."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        for field in ("id", "attr", "arg", "name", "module"):
            if isinstance(getattr(node, field, None), str):
                out.add(getattr(node, field))
    return out


def test_huge_literal_in_a_stream_is_a_diagnostic():
    """`x * 1e309` once reached the layer as `(x * inf)`: a NameError when the layer ran."""
    text = spec().replace("output = x + linear(memory) * dk", "output = x * 1e309 + linear(memory)")
    with pytest.raises(nlc.SpecError) as exc:
        nlc.compile(text)
    assert_located(exc.value, text, "<spec>")
    assert "the number 1e309 is too large" in exc.value.render()
