"""Whether generated Triton kernels can run here, and why not."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch


def unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on tensors of `device` in this process, or None when they can:
    CUDA tensors with triton installed, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1,
    set before the kernels are imported)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'nlc[triton]')"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1"
    if device.type == "cpu" and not _library_interpreted():
        return ("TRITON_INTERPRET=1 was set after triton.language was imported (torch.compile and "
                "torch._dynamo import it), so triton's own functions are compiled, not interpreted: "
                "set it before anything imports triton")
    return None


def _library_interpreted() -> bool:
    """Whether triton's library functions (tl.sum and the rest, decorated when triton.language is
    first imported) run under the interpreter; True while triton.language is not imported yet."""
    language = sys.modules.get("triton.language")
    if language is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(language.sum, InterpretedFunction)
