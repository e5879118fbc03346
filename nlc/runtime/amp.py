"""Autocast for hand-written `torch.autograd.Function`s: the backward runs in the autocast state the
forward ran in, so that its replay of the forward computes in the forward's dtypes. As
torch.amp.custom_fwd / custom_bwd, but with the device type read at run time from the forward's
first tensor argument (nlc runs on cpu and cuda). Both go under @staticmethod."""
from __future__ import annotations

import functools

import torch


def autocast_forward(forward):
    """Records on ctx whether autocast is on for the device of forward's first tensor argument, and
    its dtype."""
    @functools.wraps(forward)
    def recorded(ctx, *args):
        device = next(a.device.type for a in args if torch.is_tensor(a))
        ctx.autocast_state = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return forward(ctx, *args)
    return recorded


def autocast_backward(backward):
    """Runs backward in the autocast state autocast_forward recorded."""
    @functools.wraps(backward)
    def replayed(ctx, *grads):
        device, dtype, enabled = ctx.autocast_state
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return backward(ctx, *grads)
    return replayed
