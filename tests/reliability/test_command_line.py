"""The installed `nlc` command answers --version and --help (as .ci/run checks from the wheel too)."""
import subprocess
import sys
from pathlib import Path

import nlc

NLC = Path(sys.executable).parent / "nlc"


def run(*args):
    return subprocess.run([str(NLC), *args], capture_output=True, text=True, timeout=120)


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"nlc {nlc.__version__}", done


def test_help_lists_the_commands():
    done = run("--help")
    assert done.returncode == 0, done
    for command in ("check", "graph", "compile", "run"):
        assert command in done.stdout
    for command in ("check", "compile"):
        sub = run(command, "--help")
        assert sub.returncode == 0 and "SPEC" in sub.stdout, sub
