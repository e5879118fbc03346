"""The `nlc` command line, in-process through `nlc.cli.main` and once as the installed console script."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import nlc
from nlc import cli

SPECS = Path(__file__).resolve().parents[1] / "specs"
GOOD = SPECS / "gated_deltanet.nl"
BAD = """model broken
param d_model = 64
param heads = 4 +* 2
"""


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_set_values_parse_as_int_then_float():
    assert cli._override("chunk=64") == ("chunk", 64)
    assert cli._override("lr = 1e-3") == ("lr", 1e-3)


@pytest.mark.parametrize("bad", ["chunk=big", "chunk", "=3", "2x=1"])
def test_bad_set_exits_2(capsys, bad):
    code, _, err = run(capsys, "check", GOOD, "--set", bad)
    assert code == 2 and "--set" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "check" in out and "compile" in out


def test_check_good_spec(capsys):
    code, out, err = run(capsys, "check", GOOD)
    assert code == 0, err
    assert f"{GOOD}: ok" in out and "level" in out


PER_TOKEN_MLP = """model per_token
param d_model = 8
param heads = 1
gate eta[heads] = 0.1 * sigmoid(linear(x))
let q[heads, 4] = linear(x)
let k[heads, 4] = linear(x)
let v[heads, 4] = linear(x)
level memory {{
  memory mlp(depth = 2, expand = 2)
  bias l2
  retention none
  algorithm gd(lr = eta)
  {gradient}
}}
output = linear(memory)
"""


def test_check_notes_per_token_gradients_that_cannot_be_chunked(capsys, tmp_path):
    spec = tmp_path / "per_token.nl"
    spec.write_text(PER_TOKEN_MLP.format(gradient=""))
    code, out, _ = run(capsys, "check", spec)
    assert code == 0
    assert "level memory: sequential (tokens in order)" in out
    assert "note: level memory takes each gradient at the state after the previous token" in out
    assert "it runs the sequential form, token by token" in out
    assert "`gradient chunk_start(C)` would chunk it" in out
    spec.write_text(PER_TOKEN_MLP.format(gradient="gradient chunk_start(4)"))
    code, out, _ = run(capsys, "check", spec)
    assert code == 0 and "chunk-parallel" in out and "note:" not in out


def test_check_says_which_triton_kernels_a_level_has(capsys, tmp_path):
    """Per level: the generated kernels, whether mode='auto' may take them, or why there are none."""
    code, out, _ = run(capsys, "check", SPECS / "retnet.nl")
    assert code == 0 and "    triton: fused recurrent, chunked\n" in out
    code, out, _ = run(capsys, "check", SPECS / "gla.nl")
    assert code == 0 and "triton: fused recurrent, chunked (mode='triton' only: not yet run on a GPU)" in out
    spec = tmp_path / "per_token.nl"
    spec.write_text(PER_TOKEN_MLP.format(gradient=""))
    code, out, _ = run(capsys, "check", spec)
    assert code == 0 and ("triton: chunked (mode='triton' only: not yet run on a GPU); no fused recurrent (a mlp "
                          "memory: the fused recurrent kernels hold a matrix state [K, V] or a vector [V])") in out
    code, out, _ = run(capsys, "check", SPECS / "atlas.nl")
    assert code == 0 and "triton: chunked (mode='triton' only: not yet run on a GPU); no fused recurrent" in out
    code, out, _ = run(capsys, "check", SPECS / "cms_teach.nl")
    assert code == 0 and ("triton: none: fused recurrent (a mlp memory: the fused recurrent kernels hold a matrix "
                          "state [K, V] or a vector [V]); chunked (the level has no chunk-parallel form)") in out
    code, out, _ = run(capsys, "check", SPECS / "longhorn.nl")
    assert code == 0 and "triton: fused recurrent, chunked (mode='triton' only: not yet run on a GPU)" in out


def test_check_syntax_error_points_at_the_spec(capsys, tmp_path):
    bad = tmp_path / "bad.nl"
    bad.write_text(BAD)
    code, _, err = run(capsys, "check", bad)
    assert code == 2
    assert "bad.nl:3:18" in err and "^" in err
    assert "Traceback" not in err


def test_missing_file_exits_2(capsys, tmp_path):
    missing = tmp_path / "nowhere.nl"
    code, _, err = run(capsys, "check", missing)
    assert code == 2 and str(missing) in err and "Traceback" not in err


def test_graph_dot_names_every_level(capsys, tmp_path):
    spec, out = SPECS / "hope.nl", tmp_path / "hope.dot"
    code, _, err = run(capsys, "graph", spec, "-o", out)
    assert code == 0, err
    dot = out.read_text()
    assert "digraph" in dot
    for level in nlc.compile(spec).levels:
        assert level.name in dot


def test_graph_text(capsys):
    code, out, err = run(capsys, "graph", GOOD, "--text")
    assert code == 0 and out.strip(), err


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` not installed")
def test_graph_svg(capsys, tmp_path):
    out = tmp_path / "g.svg"
    code, _, err = run(capsys, "graph", GOOD, "-o", out)
    assert code == 0, err
    assert "<svg" in out.read_text()


def test_graph_svg_without_graphviz_exits_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    code, _, err = run(capsys, "graph", GOOD, "-o", tmp_path / "g.svg")
    assert code == 2 and "graphviz" in err and ".dot" in err


def test_compile_writes_valid_python(capsys, tmp_path):
    code, out, err = run(capsys, "compile", GOOD, "-o", tmp_path / "gen")
    assert code == 0, err
    files = sorted((tmp_path / "gen").rglob("*.py"))
    assert files and all(str(f) in out for f in files)
    for f in files:
        compile(f.read_text(), str(f), "exec")


@pytest.mark.parametrize("stage", cli.DUMP_STAGES)
def test_compile_dump(capsys, stage):
    code, out, err = run(capsys, "compile", GOOD, "--dump", stage)
    assert code == 0 and out.strip(), err


def test_run_prints_shape(capsys):
    code, out, err = run(capsys, "run", SPECS / "titans.nl", "--batch", 1, "--length", 16)
    assert code == 0, err
    assert "output shape [1, 16," in out and "parameters" in out


def test_run_reports_a_layer_that_diverges(capsys):
    """Steps too large for the keys: NaN on random inputs is an error naming the level and the step,
    not a run that looks fine."""
    code, out, err = run(capsys, "run", SPECS / "cms_nested.nl", "--set", "lr_fast=0.01", "--set", "lr_mid=0.01",
                         "--set", "lr_slow=0.01")
    assert code == 1 and "output shape" in out
    assert "not finite on unit-variance random inputs" in err and "in output of level 'cms_fast' at time step" in err


def test_console_script():
    script = Path(sys.executable).with_name("nlc")
    exe = str(script) if script.exists() else shutil.which("nlc")
    assert exe, "the nlc console script is not installed"
    done = subprocess.run([exe, "check", str(GOOD)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ": ok" in done.stdout
