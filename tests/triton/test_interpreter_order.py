"""TRITON_INTERPRET only takes effect for `@triton.jit` functions decorated after it is set, triton's
own library included: set after `import triton.language` (torch.compile imports it), interpreted
kernels would call compiled `tl.sum` and fail deep inside the kernel. nlc says so up front."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

PROBE = """
import os, sys
{before}
os.environ["TRITON_INTERPRET"] = "1"
import torch
from nlc.runtime import triton_support
print(triton_support.unavailable(torch.device("cpu")))
"""


def probe(before: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_interpreter_set_before_triton_is_imported():
    assert probe("") == "None"


def test_interpreter_set_after_triton_language_is_imported_is_refused():
    why = probe("import triton.language")
    assert "TRITON_INTERPRET=1 was set after triton.language was imported" in why
