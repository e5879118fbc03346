"""The Triton lane: kernels run on a CUDA device when there is one, else on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set here before any kernel module is imported), with one launch
configuration instead of an autotuning sweep (NLC_TRITON_AUTOTUNE=0). `torch.empty` is
poisoned with NaN so a kernel that misses a write fails."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NLC_TRITON_AUTOTUNE", "0")  # one launch configuration: tests check results, not speed


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """torch.empty / torch.empty_like return NaN-filled floating tensors."""
    for name in ("empty", "empty_like"):
        original = getattr(torch, name)

        def poisoned(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        monkeypatch.setattr(torch, name, poisoned)
