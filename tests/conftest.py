"""Test-wide settings: one CPU thread (the reference ops are short per-token loops, where a second
thread only adds contention on CI's two cores) and a private nlc cache per session."""
import pytest
import torch

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
