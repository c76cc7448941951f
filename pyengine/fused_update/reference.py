"""The torch reference implementation of the fused update: the definition of correct.

    res  = sum_k coef_k * bufs_k + noise_coef * z        aux_out = sum_k aux_coef_k * bufs_k
    out  = res                                            (no mask)
    out  = m * res + (1 - m) * base,  base = sum_k mask_coef_k * bufs_k   (with a mask m)

computed in float32 (float64 for float64 outputs, or ``compute_dtype``) and stored in the
output's dtype. z is the Philox noise of :mod:`pyengine.noise` for draw number ``step`` (an
int, or an int64 [B] tensor: sample b gets the noise it would get updated alone at step[b];
only the low 32 bits count), or the user-supplied tensor ``noise``. Everything is computed
before anything is written, so ``out`` and ``aux_out`` may alias inputs.

The inpainting blend: ``mask`` has bufs[0]'s shape in any float dtype, 1 where the solver's
result is kept (the generated region) and 0 where ``base`` is taken (the known region, e.g.
mask_coef picking s * (x0 + sigma * eps) from a known image x0 and a fixed noise eps among
the buffers). aux_out is not masked. The exact order every backend follows (so that they
agree to rounding; one that fuses a multiply and an add agrees to rounding only): with c the
compute dtype and every operation rounded to c,

    res  = ((c_0 x_0 + c_1 x_1) + c_2 x_2) + ... + c_{K-1} x_{K-1},  then res = res + c_z z
    base = ((b_0 x_0 + b_1 x_1) + b_2 x_2) + ... + b_{K-1} x_{K-1}
    m    = c(mask);   out = m * res + (1 - m) * base,   stored once in out's dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from ..noise import philox_normal
from .contract import compute_dtype_for, has_noise


def _coefs(coef, device, cdt):
    """(per-step python floats, False) or ([B, K] table in the compute dtype, True)."""
    c = coef if isinstance(coef, torch.Tensor) else torch.as_tensor(np.asarray(coef, np.float64))
    if c.dim() == 1:
        return ([c[k] for k in range(c.shape[0])] if c.is_cuda else c.tolist()), False
    return c.to(device=device, dtype=cdt), True


def fused_update(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                 compute_dtype, mask, mask_coef):
    """The update with torch ops, on validated arguments."""
    ref = bufs[0]
    if ref.numel() == 0:
        return out
    B, K = ref.shape[0], len(bufs)
    cdt = compute_dtype_for(out.dtype, compute_dtype)
    view = (B,) + (1,) * (ref.dim() - 1)
    xs = [b.to(cdt) for b in bufs]

    def combine(c):
        cs, per_sample = _coefs(c, ref.device, cdt)
        acc = None
        for k in range(K):
            term = xs[k] * (cs[:, k].view(view) if per_sample else cs[k])
            acc = term if acc is None else acc + term
        return acc

    res = combine(coef)
    if has_noise(noise_coef):
        if noise is None:
            z = philox_normal(seeds, step, ref[0].numel(), device=ref.device,
                              dtype=torch.float32).view(ref.shape).to(cdt)
        else:
            z = noise.to(cdt)
        nc = noise_coef
        if isinstance(nc, torch.Tensor):
            nc = nc.to(device=ref.device, dtype=cdt).view(view)
        res = res + nc * z
    if mask is not None:
        m = mask.to(cdt)
        res = m * res + (1 - m) * combine(mask_coef)
    aux_res = combine(aux_coef) if aux_out is not None else None
    out.copy_(res)
    if aux_out is not None:
        aux_out.copy_(aux_res)
    return out
