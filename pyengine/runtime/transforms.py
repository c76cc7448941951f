"""Plan rewrites every mode gets: the inpainting blend and the inputs it needs.

img2img needs no rewrite: it is the plan compiled over the truncated grid
(``Sampler.plan_for(start)``) from the initial state s(sigma_0) (x0 + sigma_0 * noise)
(:func:`img2img_state`). Caller-supplied noise is a draws source of the walk
(:class:`pyengine.runtime.walk.SuppliedDraws`), not a rewrite.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..errors import check_tensor
from ..plan import K_MAX, Plan, Update

__all__ = ["KNOWN", "KNOWN_NOISE", "check_state_dtype", "img2img_state", "inpaint",
           "inpaint_inputs"]

#: Buffer names of the inpainting inputs: the known data x0 and the noise it is re-noised with.
KNOWN, KNOWN_NOISE = "inpaint/known", "inpaint/noise"


def inpaint(plan: Plan) -> Plan:
    """``plan`` with every update blended with the known region:

        dst = m * update + (1 - m) * s (known + sigma * known_noise)

    at the level sigma (scale s) of the state the update writes: two more buffers and the
    mask coefficients [0, ..., 0, s, s * sigma] per update, run inside the same fused update
    (no extra pass). Raises ValueError for plans whose custom ops write the state outside the
    fused updates, and for updates that would read more than K_MAX buffers."""
    ops = []
    for op in plan.ops:
        if getattr(op, "writes_state", False):
            raise ValueError(f"inpainting (mask=) is not supported for {plan.solver!r}: its "
                             f"{type(op).__name__} writes the state outside the fused updates")
        if isinstance(op, Update):
            if len(op.bufs) + 2 > K_MAX:
                raise ValueError(f"inpainting needs two more buffers than {plan.solver!r}'s "
                                 f"update reads ({len(op.bufs)}); the kernels read at most "
                                 f"{K_MAX}")
            if not (math.isfinite(op.sigma) and math.isfinite(op.scale)):
                raise ValueError(f"plan {plan.solver!r} has an update without its noise level")
            K = len(op.bufs)
            op = dataclasses.replace(
                op, bufs=list(op.bufs) + [KNOWN, KNOWN_NOISE],
                coefs=np.concatenate([op.coefs, [0.0, 0.0]]),
                aux_coefs=None if op.aux_coefs is None else
                np.concatenate([op.aux_coefs, [0.0, 0.0]]),
                mask_coefs=np.concatenate([np.zeros(K), [op.scale, op.scale * op.sigma]]))
        ops.append(op)
    return dataclasses.replace(plan, ops=ops)


def inpaint_inputs(x: torch.Tensor, mask, known, known_noise):
    """Check inpainting's tensors against the state ``x``: the mask, the known data and its
    noise as contiguous tensors of x's shape and dtype (``mask`` broadcasts: [B, 1, H, W] for
    a latent, say; 1 where the model generates, 0 where ``known`` is kept)."""
    out = []
    for name, t in (("mask", mask), ("init", known), ("noise", known_noise)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor for inpainting, got {type(t).__name__}")
        check_tensor(name, t, batch=False, floating=False)
        try:
            t = torch.broadcast_to(t, x.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the "
                             f"state's {tuple(x.shape)}") from None
        out.append(t.to(device=x.device, dtype=x.dtype).contiguous())
    return tuple(out)


def img2img_state(init: torch.Tensor, noise: torch.Tensor, sigma0: float, s0: float):
    """The initial state of a run started from data: s(sigma_0) (x0 + sigma_0 * noise)."""
    return (init.to(noise.dtype) + sigma0 * noise) * s0


def check_state_dtype(plan: Plan, dtype: torch.dtype) -> None:
    """Refuse a float16 state whose noise levels it cannot hold: the states of a plan reach
    s * sigma * |eps| with |eps| up to about 6, and float16 overflows past 65504 (VE with
    sigma_max 2e4, say, would give inf and then NaN samples with no other sign)."""
    if dtype != torch.float16:
        return
    peak = 0.0
    for op in plan.ops:
        sigma, s = getattr(op, "sigma", math.nan), getattr(op, "s", getattr(op, "scale", 1.0))
        if math.isfinite(sigma) and math.isfinite(s):
            peak = max(peak, abs(s) * sigma)
    if 6.0 * peak > float(torch.finfo(torch.float16).max):
        raise ValueError(f"a float16 state cannot hold this plan's noise levels (s * sigma up "
                         f"to {peak:.4g}; 6 standard deviations of that overflow float16's "
                         f"65504): use bfloat16 or float32 for the state")
