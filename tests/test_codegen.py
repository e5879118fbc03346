"""The generated sources: well-formed, traceable to the spec, importable without the compiler,
deterministic, safe against hostile spec names and file names, and shaped as documented."""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import torch

import nlc
from nlc.codegen.triton_chunk_decay import unsupported as triton_decay_unsupported
from nlc.codegen.triton_chunk_delta import unsupported as triton_delta_unsupported
from nlc.codegen.triton_chunk_frozen import unsupported as triton_frozen_unsupported
from nlc.codegen.triton_chunk_mapped import unsupported as triton_mapped_unsupported
from nlc.codegen.triton_chunk_period import unsupported as triton_period_unsupported
from nlc.codegen.triton_chunk_sequential import unsupported as triton_sequential_unsupported
from nlc.codegen.triton_recurrent import unsupported

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
SPECS = sorted(SPECS_DIR.glob("*.nl"))
ROLE_PREFIXES = ("level", "g", "gs", "go", "gc", "s", "init", "gate", "let", "b_g", "dg", "b_dg",
                 "kernels")

# Every top-level name a level module may define besides `level_<name>`.
LEVEL_TOP = {"math", "torch", "HEADS", "K", "V", "HIDDEN", "GATES", "STATE", "N_PARAMS",
             "memory_forward", "memory_grads", "initial_state", "default_state", "output_grad", "retain",
             "implicit_lr", "accumulate", "psi", "newton_schulz", "_per_tensor", "_record", "_pack"}
LAYER_TOP = {"torch", "nn", "blocks", "dispatch", "recompute", "Layer"}
TRITON_TOP = {"torch", "triton", "tl", "_pack", "default_state", "BV_MAX", "WARP_TILE", "MAX_WARPS",
              "CHUNK", "fused_recurrent_fwd_kernel", "fused_recurrent_bwd_kernel", "_config",
              "fused_recurrent_fwd", "fused_recurrent_bwd", "FusedRecurrentFunction", "autocast_forward",
              "autocast_backward"}
# ... and a chunk-parallel module (the hostile table's base level is a delta-family level)
CHUNK_TOP = {"torch", "CHUNK", "_chunks", "_cumulative", "_pack", "_remaining", "_segments",
             "_unit_lower_inverse", "default_state"}
# ... and chunked Triton kernels (decay and delta families)
TRITON_CHUNK_TOP = {"os", "torch", "triton", "tl", "_pack", "default_state", "CHUNK", "BV_MAX", "INTERPRET", "TUNE",
                    "CONFIGS", "MATMUL_TYPES", "chunk_gate_fwd_kernel", "chunk_wy_fwd_kernel",
                    "chunk_state_fwd_kernel", "chunk_output_fwd_kernel", "chunk_state_bwd_kernel",
                    "chunk_grads_bwd_kernel", "chunk_gate_bwd_kernel", "_sizes", "chunk_gate_fwd",
                    "chunk_states", "chunk_output", "chunk_bwd", "chunk_gate_bwd", "ChunkFunction",
                    "autocast_forward", "autocast_backward",
                    # a per-key-channel decay's: the reads within a chunk by sub-chunks
                    "SUB", "AUTO", "chunk_intra_fwd_kernel", "chunk_intra_bwd_kernel", "chunk_intra"}
INIT_TOP = {"Layer"}


# ---- helpers ----------------------------------------------------------------------------------
def top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names.add((alias.asname or alias.name).split(".")[0])
    return names


def imports(tree: ast.Module) -> list[str]:
    """Absolute modules imported anywhere in a module ('.' for relative imports)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append(".")
            else:
                out += [f"{node.module}.{alias.name}" for alias in node.names]
    return out


def location_comments(source: str) -> list[tuple[str, int, int, str]]:
    """(file, line, col, rest of comment) for every `# file:line:col` comment (tokenize, so string
    contents never count)."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            m = re.match(r"#\s*(.+?):(\d+):(\d+)\b(.*)", tok.string)
            if m:
                found.append((m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return found


def run_layer(program, T=16):
    torch.manual_seed(0)
    layer = program.layer()
    x = torch.randn(2, T, layer.d_model)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    return y


@pytest.fixture(scope="module")
def shipped():
    return {path.stem: (path, nlc.compile(path)) for path in SPECS}


def level_files(program):
    return {lv.name: f"level_{lv.name}.py" for lv in program.levels}


# ---- every shipped spec -----------------------------------------------------------------------
def test_there_are_shipped_specs():
    assert len(SPECS) >= 16


@pytest.mark.parametrize("stem", [p.stem for p in SPECS])
def test_sources_parse_and_have_docstrings(shipped, stem):
    path, program = shipped[stem]
    expected = {"layer.py", "__init__.py"} | set(level_files(program).values())
    expected |= {f"level_{name}_triton.py" for name, r in program.rules.items()
                 if unsupported(r) is None}
    expected |= {f"level_{name}_chunk.py" for name, p in program.plans.items()
                 if p.family != "reference"}
    expected |= {f"level_{name}_triton_chunk.py" for name, p in program.plans.items()
                 if (p.family == "decay" and triton_decay_unsupported(program.rules[name], p) is None)
                 or (p.family == "delta" and triton_delta_unsupported(program.rules[name], p) is None)
                 or (p.family == "frozen" and triton_frozen_unsupported(program.rules[name], p) is None)
                 or (p.family == "period" and triton_period_unsupported(program.rules[name], p) is None)
                 or (p.family == "mapped" and triton_mapped_unsupported(program.rules[name], p) is None)
                 or (p.family == "sequential" and triton_sequential_unsupported(program.rules[name], p) is None)}
    assert set(program.sources) == expected
    for file, text in program.sources.items():
        tree = ast.parse(text, filename=file)
        doc = ast.get_docstring(tree)
        assert doc, f"{stem}/{file} has no module docstring"
        assert str(path) in doc, f"{stem}/{file}: docstring does not name the spec file"


@pytest.mark.parametrize("stem", [p.stem for p in SPECS])
def test_location_comments_point_at_real_spec_text(shipped, stem):
    path, program = shipped[stem]
    lines = path.read_text().splitlines()
    for file, text in program.sources.items():
        comments = location_comments(text)
        if file != "__init__.py":
            assert comments, f"{stem}/{file} has no '# spec:line:col' comment"
        for where, line, col, rest in comments:
            assert where == str(path), f"{stem}/{file}: comment names {where!r}"
            assert 1 <= line <= len(lines), f"{stem}/{file}: line {line} outside the spec"
            src = lines[line - 1]
            assert 1 <= col <= len(src), f"{stem}/{file}: {line}:{col} beyond the line {src!r}"
            assert not src[col - 1].isspace(), f"{stem}/{file}: {line}:{col} points at blank space"
            assert not src.lstrip().startswith("#"), f"{stem}/{file}: {line}:{col} is a spec comment"
            if rest.startswith("level "):      # the per-token step names its level
                name = rest.split()[1].rstrip(",:;")
                assert src[col - 1:].startswith(f"level {name}"), (stem, file, line, col, src)


def test_defaulted_fields_leave_no_bare_comment_text():
    """A level that leaves `retention` to its default has no span to point at: the generated lines
    that would cite it still carry their comment marker (the fuzzer found `b_h = (b_s + b_h)  S_t =
    ...` in the fused recurrent Triton kernels)."""
    program = nlc.compile("""model m
param d_model = 16
param heads = 2
gate beta[heads] = sigmoid(linear(x))
let q[heads, 8] = l2norm(linear(x))
let k[heads, 8] = l2norm(linear(x))
let v[heads, 8] = linear(x)
level memory {
  memory matrix
  bias l2
  algorithm gd(lr = beta)
}
output = x + linear(memory)
""")
    assert "level_memory_triton.py" in program.sources
    for file, text in program.sources.items():
        ast.parse(text, filename=file)
        for line in text.splitlines():
            assert "S_t = R(" not in line or "#" in line or line.startswith("  "), (file, line)


@pytest.mark.parametrize("stem", [p.stem for p in SPECS])
def test_level_modules_define_the_runtime_interface(shipped, stem):
    _, program = shipped[stem]
    for lv in program.levels:
        tree = ast.parse(program.sources[f"level_{lv.name}.py"])
        top = top_level_names(tree)
        required = {"memory_forward", "initial_state", "STATE", "GATES", f"level_{lv.name}"}
        assert required <= top, f"{stem}: level {lv.name} lacks {required - top}"
        assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        assert ast.literal_eval(assigned["GATES"]) == tuple(lv.gates)
        state = ast.literal_eval(assigned["STATE"])
        assert isinstance(state, tuple) and state and all(isinstance(s, str) for s in state)
        module = program.module(f"level_{lv.name}")
        assert module.GATES == tuple(lv.gates) and module.STATE == state
        assert callable(getattr(module, f"level_{lv.name}"))


@pytest.mark.parametrize("stem", [p.stem for p in SPECS])
def test_generated_imports_are_torch_and_the_runtime_only(shipped, stem):
    _, program = shipped[stem]
    for file, text in program.sources.items():
        for module in imports(ast.parse(text)):
            runtime = ("nlc.runtime.blocks", "nlc.runtime.dispatch", "nlc.runtime.attention",
                       "nlc.runtime.mlp", "nlc.runtime.recompute", "nlc.runtime.teach", "nlc.runtime.vjp.vjp",
                       "nlc.runtime.vjp.tapped_vjp",
                       "nlc.runtime.frozen_linear.frozen_linear", "nlc.runtime.amp.autocast_forward",
                       "nlc.runtime.amp.autocast_backward")
            kernels = ("triton", "triton.language", "os") if file.endswith(("_triton.py", "_triton_chunk.py")) \
                else ()  # os: whether Triton's interpreter runs them
            ok = module in (".", "torch", "math", *runtime, *kernels) or module.startswith("torch.")
            assert ok, f"{stem}/{file} imports {module}"  # math: the stdlib, no dependency
        assert "importlib" not in text and "__import__" not in text, (stem, file)


# ---- importable without the spec and without the compiler --------------------------------------
IMPORT_PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    import torch
    folder = Path(sys.argv[1])
    spec = importlib.util.spec_from_file_location(
        "renamed_model", folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["renamed_model"] = package
    spec.loader.exec_module(package)
    torch.manual_seed(0)
    layer = package.Layer()
    y = layer(torch.randn(2, 16, layer.d_model))
    print(json.dumps({
        "shape": list(y.shape), "d_model": layer.d_model,
        "finite": bool(torch.isfinite(y).all()),
        "modules": sorted(m for m in sys.modules
                          if m.split(".")[0] in ("nlc", "sympy", "lark", "networkx")),
    }))
""")


@pytest.fixture(scope="module")
def imported_elsewhere(shipped, tmp_path_factory):
    """Copy gated_deltanet's cache folder (a matrix memory: torch.func, which pulls in sympy by
    itself, is not involved) under another name and import it in a fresh interpreter."""
    import shutil
    _, program = shipped["gated_deltanet"]
    folder = tmp_path_factory.mktemp("elsewhere") / "some_other_name"
    shutil.copytree(program.cache_dir, folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(folder)], cwd=folder.parent,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_copied_sources_import_and_run_forward(imported_elsewhere):
    r = imported_elsewhere
    assert r["shape"] == [2, 16, r["d_model"]] and r["finite"]


@pytest.mark.parametrize("module", ["nlc.lower", "nlc.parse", "sympy", "lark"])
def test_copied_sources_do_not_load_the_compiler(imported_elsewhere, module):
    loaded = imported_elsewhere["modules"]
    assert module not in loaded, (
        f"importing generated code loaded {module}; nlc modules loaded: "
        f"{[m for m in loaded if m.startswith('nlc')]}")


# ---- determinism ------------------------------------------------------------------------------
def digest(sources: dict[str, str]) -> dict[str, str]:
    return {f: hashlib.sha256(t.encode()).hexdigest() for f, t in sorted(sources.items())}


DETERMINISM_PROBE = textwrap.dedent("""
    import json, sys, hashlib
    from pathlib import Path
    import nlc
    out = {}
    for path in sys.argv[1:]:
        p = nlc.compile(Path(path))
        out[Path(path).stem] = {f: hashlib.sha256(t.encode()).hexdigest()
                                for f, t in sorted(p.sources.items())}
    print(json.dumps(out))
""")


def test_compiling_twice_gives_identical_sources(shipped):
    for stem, (path, program) in shipped.items():
        again = nlc.compile(path)
        assert again.sources == program.sources, stem
        assert again.cache_dir == program.cache_dir, stem


def test_sources_do_not_depend_on_the_hash_seed(shipped, tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="12345", NLC_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", DETERMINISM_PROBE, *map(str, SPECS)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    other = json.loads(out.stdout.strip().splitlines()[-1])
    for stem, (_, program) in shipped.items():
        assert other[stem] == digest(program.sources), stem


def test_overrides_give_a_different_cache_folder(shipped):
    path, program = shipped["gated_deltanet"]
    a = nlc.compile(path, chunk=8)
    b = nlc.compile(path, chunk=32)
    assert len({program.cache_dir, a.cache_dir, b.cache_dir}) == 3
    assert nlc.compile(path, chunk=8).cache_dir == a.cache_dir
    c = nlc.compile(path, d_key=8)
    assert c.cache_dir not in (program.cache_dir, a.cache_dir, b.cache_dir)
    assert c.sources != program.sources


# ---- hostile names ----------------------------------------------------------------------------
TEMPLATE = """\
model m
param d_model = 8
param heads = 1
param {P} = 4
gate {A}[heads] = sigmoid(linear(x))
gate {B}[heads] = sigmoid(linear(x))
let q[heads, 4] = l2norm(linear(x))
let {K}[heads, 4] = l2norm(linear(x))
let v[heads, 4] = linear(x)
level {L} {{
  memory matrix
  bias l2
  retention decay({A})
  algorithm gd(lr = {B})
  key {K}
}}
output = x + linear({L}) * {P}
"""
BASE_NAMES = dict(P="dk", A="alpha", B="beta", K="k", L="memory")

# (case id, names replacing BASE_NAMES)
HOSTILE = [
    ("level_class", dict(L="class")),
    ("gate___import__", dict(A="__import__")),
    ("let_torch", dict(K="torch")),
    ("gate_self", dict(B="self")),
    ("level_print", dict(L="print")),
    ("param_lambda", dict(P="lambda")),
    ("level_os", dict(L="os")),
    ("gate_g_alpha_beside_alpha", dict(A="alpha", B="g_alpha")),
    # a gate whose name ends like a per-token view of another gate's name
    ("gate_alpha_state_beside_alpha", dict(A="alpha", B="alpha_state")),
    ("gate_initial_state", dict(B="initial_state")),
    ("let_self", dict(K="self")),
    ("level_Layer", dict(L="Layer")),
    ("level_level_memory", dict(L="level_memory")),
    ("gate_B_and_let_T", dict(A="B", K="T")),
    ("param_torch", dict(P="torch")),
    ("let_x", dict(K="x")),  # a built-in: a SpecError is the right answer
]


def spec_text(**names):
    return TEMPLATE.format(**{**BASE_NAMES, **names})


def _strip_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body and \
                isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body[0] = ast.Pass()
    return tree


class _Rename(ast.NodeTransformer):
    """Map role-prefixed identifiers of the hostile names back to the base names, e.g. `g_self` ->
    `g_beta`, `gate_self_linear_1` -> `gate_beta_linear_1`. The longest matching name wins."""

    def __init__(self, mapping):
        self.pairs = sorted(mapping.items(), key=lambda kv: -len(kv[0]))
        self.mapping = mapping

    def ident(self, name):
        if name is None:
            return None
        for new, old in self.pairs:
            for role in ROLE_PREFIXES:
                head = f"{role}_{new}"
                if name == head or name.startswith(head + "_"):
                    return f"{role}_{old}" + name[len(head):]
        return name

    def visit_Name(self, node):
        node.id = self.ident(node.id)
        return node

    def visit_arg(self, node):
        node.arg = self.ident(node.arg)
        return node

    def visit_keyword(self, node):
        node.arg = self.ident(node.arg)
        self.generic_visit(node)
        return node

    def visit_Attribute(self, node):
        node.attr = self.ident(node.attr)
        self.generic_visit(node)
        return node

    def visit_FunctionDef(self, node):
        node.name = self.ident(node.name)
        self.generic_visit(node)
        return node

    def visit_ImportFrom(self, node):
        node.module = self.ident(node.module)  # from .level_<name> import ...
        self.generic_visit(node)
        return node

    def visit_alias(self, node):
        node.name = self.ident(node.name)
        node.asname = self.ident(node.asname)
        return node

    def visit_Call(self, node):
        self.generic_visit(node)
        if ast.unparse(node.func) == "recompute.segmented":  # the level's name, as text
            node.args[2].value = self.mapping.get(node.args[2].value, node.args[2].value)
        return node

    def visit_Assign(self, node):
        self.generic_visit(node)
        if [getattr(t, "id", None) for t in node.targets] == ["GATES"]:  # the gate names, as text
            for elt in getattr(node.value, "elts", []):
                elt.value = self.mapping.get(elt.value, elt.value)
        return node


def normalised(text, mapping):
    return ast.dump(_Rename(mapping).visit(_strip_docstrings(ast.parse(text))))


@pytest.fixture(scope="module")
def base_program():
    return nlc.compile(spec_text())


@pytest.mark.parametrize("case,names", HOSTILE, ids=[c for c, _ in HOSTILE])
def test_hostile_names(base_program, case, names):
    text = spec_text(**names)
    try:
        program = nlc.compile(text)
    except nlc.SpecError:
        return  # a diagnostic is an acceptable answer; anything else is not
    spec_names = {v for k, v in names.items() if v != BASE_NAMES[k]}
    level = names.get("L", BASE_NAMES["L"])
    level_file = f"level_{level}.py"
    triton_file = f"level_{level}_triton.py"
    chunk_file = f"level_{level}_chunk.py"
    triton_chunk_file = f"level_{level}_triton_chunk.py"
    assert set(program.sources) == {level_file, chunk_file, triton_file, triton_chunk_file, "layer.py",
                                    "__init__.py"}
    expected_top = {level_file: LEVEL_TOP | {f"level_{level}"},
                    chunk_file: CHUNK_TOP | {f"level_{level}"},
                    triton_file: TRITON_TOP | {f"level_{level}"},
                    triton_chunk_file: TRITON_CHUNK_TOP | {f"level_{level}"},
                    "layer.py": LAYER_TOP | {f"level_{level}", f"level_{level}_chunk"},
                    "__init__.py": INIT_TOP}
    for file, source in program.sources.items():
        tree = ast.parse(source, filename=file)
        extra = top_level_names(tree) - expected_top[file]
        assert not extra, f"{case}: {file} defines unexpected top-level names {extra}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in spec_names, f"{case}: {file} calls spec name {node.func.id}"
            if isinstance(node, ast.FunctionDef):
                # a gate argument is never rebound inside the function that receives it
                args = {a.arg for a in node.args.args + node.args.kwonlyargs}
                stores = {n.id for n in ast.walk(node)
                          if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                clash = {a for a in args & stores if a.startswith("g_")}
                assert not clash, f"{case}: {file}:{node.name} rebinds its gate argument(s) {clash}"
    # Up to the role-prefixed renaming, the code is exactly the base spec's code.
    mapping = {names.get(k, v): v for k, v in BASE_NAMES.items()}
    for file, source in program.sources.items():
        base_file = {level_file: "level_memory.py", chunk_file: "level_memory_chunk.py",
                     triton_file: "level_memory_triton.py",
                     triton_chunk_file: "level_memory_triton_chunk.py"}.get(file, file)
        assert normalised(source, mapping) == normalised(base_program.sources[base_file], {}), \
            f"{case}: {file} differs from the base spec's {base_file} beyond renaming"
    run_layer(program)


# ... and the kernels of a per-key-channel decay (triton_chunk_decay.ChannelKernels): gate A over key
# channels times the scalar B as the decay, B the step size; names like the kernels' own (A sorts before B,
# as in the base, so the gates' order is the same)
CHANNEL_TEMPLATE = TEMPLATE.replace("gate {A}[heads]", "gate {A}[heads, 4]").replace(
    "bias l2", "bias dot").replace("retention decay({A})", "retention decay({A} * {B})")
CHANNEL_HOSTILE = [("gates_dA_and_g", dict(A="dA", B="g")), ("gate_gb", dict(B="gb")),
                   ("gate_SUB_level_chunk_intra", dict(A="SUB", L="chunk_intra")), ("gate_b_gp", dict(A="b_gp")),
                   ("gate_j_let_o_c", dict(B="j", K="o_c"))]


@pytest.mark.parametrize("case,names", CHANNEL_HOSTILE, ids=[c for c, _ in CHANNEL_HOSTILE])
def test_hostile_names_in_per_channel_kernels(case, names):
    base = nlc.compile(CHANNEL_TEMPLATE.format(**BASE_NAMES)).sources["level_memory_triton_chunk.py"]
    assert "chunk_intra_fwd_kernel" in base  # the per-channel kernels, not the scalar ones
    level = names.get("L", BASE_NAMES["L"])
    source = nlc.compile(CHANNEL_TEMPLATE.format(**{**BASE_NAMES, **names})).sources[
        f"level_{level}_triton_chunk.py"]
    tree = ast.parse(source)
    extra = top_level_names(tree) - TRITON_CHUNK_TOP - {f"level_{level}"}
    assert not extra, f"{case}: unexpected top-level names {extra}"
    mapping = {names.get(k, v): v for k, v in BASE_NAMES.items()}
    assert normalised(source, mapping) == normalised(base, {}), f"{case}: differs from the base beyond renaming"


def test_base_of_the_hostile_table_runs(base_program):
    run_layer(base_program)


def test_hostile_spec_file_name(base_program, tmp_path):
    """A file name with a double quote, a backslash, a triple quote and a newline reaches the
    generated sources only as sanitised comment/docstring text."""
    name = 'we"ird\\na\nme"""x\'\'\'.nl'
    path = tmp_path / name
    try:
        path.write_text(spec_text())
    except OSError:
        pytest.skip("the filesystem refuses the name")
    program = nlc.compile(path)
    for file, source in program.sources.items():
        tree = ast.parse(source, filename=file)
        assert ast.get_docstring(tree)
        base = base_program.sources[file]
        assert len(source.splitlines()) == len(base.splitlines()), f"{file}: the name added lines"
        assert normalised(source, {}) == normalised(base, {}), f"{file}: code changed with the name"
        for where, line, col, _ in location_comments(source):
            assert "\n" not in where and '"' not in where and "\\" not in where
            assert 1 <= line <= len(spec_text().splitlines())
    run_layer(program)


# ---- golden lines -----------------------------------------------------------------------------
GOLDEN_SPEC = """\
model golden
param d_model = 8
param heads = 1
param d_key = 4
param d_value = 4
gate alpha[heads] = sigmoid(linear(x))
gate beta[heads] = sigmoid(linear(x))
let q[heads, d_key] = l2norm(linear(x))
let k[heads, d_key] = l2norm(linear(x))
let v[heads, d_value] = linear(x)
level memory {
  memory matrix
  bias l2
  retention decay(alpha)
  algorithm gd(lr = beta)
  gradient retained
  read after
}
output = x + linear(memory)
"""

GOLDEN_LINES = [
    "GATES = ('alpha', 'beta')",
    "STATE = ('S',)",
    "def retain(w0, s, g_alpha):  # <spec>:14:13",
    "return (s + g_alpha * w0)",
    "def level_memory(q, k, v, *, g_alpha, g_beta, initial_state=None, output_final_state=False):",
    "gs_alpha = g_alpha[:, t, :, None, None]  # gate alpha at t, shaped for the state",
    "at = tuple(retain(w, torch.zeros_like(w), gs_alpha) for w in weights)  # after the decay",
    "dy = output_grad(memory_forward(at, k_t), v_t)",
    "steps = tuple(-gs_beta * g for g in u)  # <spec>:15:13",
    "params = tuple(retain(w, s, gs_alpha) for w, s in zip(params, steps))  # <spec>:14:13",
]


@pytest.mark.parametrize("line", GOLDEN_LINES)
def test_golden_level_lines(line):
    source = nlc.compile(GOLDEN_SPEC).sources["level_memory.py"]
    assert line in [l.strip() for l in source.splitlines()], f"missing: {line}"


def test_golden_layer_calls_the_level_with_prefixed_names():
    source = nlc.compile(GOLDEN_SPEC).sources["layer.py"]
    lines = [l.strip() for l in source.splitlines()]
    assert "from . import level_memory" in lines
    call = next(i for i, l in enumerate(lines) if l.startswith("s_memory, _ = recompute.segmented("))
    assert lines[call + 1].startswith("dispatch.pick(level_memory.level_memory, ")
    assert lines[call + 1].endswith(", self.mode, T, self.kernels_memory, x.device),")
    assert lines[call + 2].startswith("self.recompute, 'memory', 1)(")
    assert lines[call + 3] == "s_q, s_k, s_v, g_alpha=g_alpha, g_beta=g_beta)"


def test_mlp_rate_printed_in_exponent_form():
    """A constant rate that prints as '3.90625e-05' is a literal, not a per-head gate: the MLP
    reference loop scales by it directly (it used to call `.reshape` on the float) and matches the
    chunked form."""
    program = nlc.compile(SPECS_DIR / "cms.nl", d_model=8, chunk=4, chunk_slow=8, lr_mid=3.90625e-05)
    torch.manual_seed(0)
    chunked = program.layer(mode="chunk").double()
    reference = program.layer(mode="reference").double()
    reference.load_state_dict(chunked.state_dict())
    x = torch.randn(1, 11, 8, dtype=torch.float64)
    torch.testing.assert_close(reference(x), chunked(x), rtol=1e-10, atol=1e-12)
