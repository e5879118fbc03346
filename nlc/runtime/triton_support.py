"""Whether generated Triton kernels can run here, and why not."""
from __future__ import annotations

import importlib.util
import os

import torch


def unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on tensors of `device` in this process, or None when they can:
    CUDA tensors with triton installed, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
    set before the kernels are imported)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'nlc[triton]')"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1"
    return None
