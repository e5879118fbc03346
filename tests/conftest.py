"""Test-wide settings: one CPU thread (the reference ops are short per-token loops, where a second
thread only adds contention on CI's two cores), a private nlc cache per session, and Triton's
interpreter on machines without CUDA.

TRITON_INTERPRET is set here, before any test module is imported: triton decides at decoration time
whether a `@triton.jit` function is interpreted, and that includes its own library (`tl.sum`,
`tl.sigmoid`), so a test module that imports triton.language early (`import torch._dynamo` does)
would otherwise leave every later interpreted kernel calling compiled helpers ("Cannot call
@triton.jit'd outside of the scope of a kernel")."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NLC_TRITON_AUTOTUNE", "0")  # one launch configuration: tests check results, not speed

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="run 10x the fuzz cases of tests/reliability/test_fuzz_frontend.py")


@pytest.fixture(scope="session", autouse=True)
def nlc_cache(tmp_path_factory):
    """Point NLC_CACHE_DIR at a session temp dir so tests never write to the user's cache."""
    path = tmp_path_factory.mktemp("nlc-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("NLC_CACHE_DIR", str(path))
    yield path
    patch.undo()
