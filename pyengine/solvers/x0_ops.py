"""The executor's tensor code of :class:`~pyengine.solvers.diffusers_compat.ProcessX0`
(registered with :func:`pyengine.runtime.custom.register`; kept next to the op until it
moves into ``runtime/custom.py`` with the other custom ops' code)."""

from __future__ import annotations

import math

import torch

from ..runtime.custom import register
from .diffusers_compat import ProcessX0

__all__ = ["process_x0"]


@register(ProcessX0)
def process_x0(op: ProcessX0, w) -> None:
    """x0 = sum_k c_k buf_k (one fused update into a tensor of the walk), then clamped to
    [-clip_range, clip_range] or dynamically thresholded per sample (quantile of |x0| over
    the non-batch elements, clamped to [1, max_value]; x0 <- clamp(x0, -q, q) / q), computed
    in float32 at least as diffusers' ``_threshold_sample`` does."""
    d = w.take()
    w.backend.fused_update(d, [w.slots[b] for b in op.bufs], [float(c) for c in op.coefs],
                           0.0, None, -1, **w.kw)
    if op.threshold_ratio is not None:
        B = d.shape[0]
        flat = d.reshape(B, -1)
        src = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        q = torch.quantile(src.abs(), op.threshold_ratio, dim=1)
        q = torch.clamp(q, min=1.0, max=op.max_value).unsqueeze(1)
        d.copy_((torch.clamp(src, -q, q) / q).to(d.dtype).reshape(d.shape))
    elif math.isfinite(op.clip_range):
        d.clamp_(-op.clip_range, op.clip_range)
    w.bind(op.dst, d)
