"""The torch reference backend: the definition of correct for every kernel.

fused_update(out, bufs[K], coef[K] or [B, K], noise_coef or [B], seeds[B], step or step[B],
             aux_out=None, aux_coef=None, *, noise=None, compute_dtype=None,
             mask=None, mask_coef=None)

    res     = sum_k coef_k * bufs_k + noise_coef * z       aux_out = sum_k aux_coef_k * bufs_k
    out     = res                                           (no mask)
    out     = m * res + (1 - m) * base,   base = sum_k mask_coef_k * bufs_k   (with a mask)

computed in float32 (float64 for float64 inputs, or ``compute_dtype``) and stored in the
output's dtype. z is the Philox noise of :mod:`pyengine.noise` for draw number ``step``, or
the user-supplied tensor ``noise``. ``step`` is an int, or an int64 [B] tensor of per-sample
draw numbers: sample b then gets the noise it would get updated alone with ``step[b]`` (a
batch mixing requests at different steps of their plans runs one update); only the low 32
bits count, and a [1] tensor is one draw number for the batch. Everything is computed before
anything is written, so ``out`` and ``aux_out`` may alias inputs.

The inpainting blend: ``mask`` is a tensor of bufs[0]'s shape in any float dtype, 1 where
the solver's result is kept (the generated region) and 0 where ``base`` is taken (the known
region, e.g. mask_coef picking s * (x0 + sigma * eps) from a known image x0 and a fixed noise
eps among the buffers); ``mask_coef`` is [K] or [B, K] like ``coef``. aux_out is not masked.
The mask must share no memory with out or aux_out. The exact order every backend follows (so
that they agree to rounding; one that fuses a multiply and an add agrees to rounding only):
with c the compute dtype and every operation rounded to c,

    res  = ((c_0 x_0 + c_1 x_1) + c_2 x_2) + ... + c_{K-1} x_{K-1},  then res = res + c_z z
    base = ((b_0 x_0 + b_1 x_1) + b_2 x_2) + ... + b_{K-1} x_{K-1}
    m    = c(mask);   out = m * res + (1 - m) * base,   stored once in out's dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from ..noise import philox_normal
from ._native import check_mask, per_sample_steps

name = "torch"
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coef_tensor(coef, B, K, device, cdt, argname):
    c = coef if isinstance(coef, torch.Tensor) else torch.as_tensor(np.asarray(coef, np.float64))
    if c.dim() == 1:
        if c.shape[0] != K:
            raise ValueError(f"{argname} has {c.shape[0]} entries for {K} buffers")
        return [c[k].item() if not c.is_cuda else c[k] for k in range(K)], False
    if c.dim() == 2 and c.shape == (B, K):
        return c.to(device=device, dtype=cdt), True
    raise ValueError(f"{argname} must be [K]={K} or [B, K]=({B}, {K}), got {tuple(c.shape)}")


def validate(out, bufs, coef, aux_out=None, aux_coef=None):
    """Shape/dtype/device checks of the fused-update contract; raises ValueError."""
    if not isinstance(bufs, (list, tuple)) or not bufs:
        raise ValueError("bufs must be a non-empty list of tensors")
    ref = bufs[0]
    for i, b in enumerate(bufs):
        if not isinstance(b, torch.Tensor):
            raise ValueError(f"bufs[{i}] must be a tensor, got {type(b).__name__}")
        if b.shape != ref.shape:
            raise ValueError(f"bufs[{i}] has shape {tuple(b.shape)}, bufs[0] has {tuple(ref.shape)}")
        if b.device != ref.device:
            raise ValueError(f"bufs[{i}] is on {b.device}, bufs[0] on {ref.device}")
        if b.dtype not in FLOAT_DTYPES:
            raise ValueError(f"bufs[{i}] has unsupported dtype {b.dtype}")
    for nm, o in (("out", out), ("aux_out", aux_out)):
        if o is None:
            continue
        if not isinstance(o, torch.Tensor) or o.shape != ref.shape or o.device != ref.device:
            raise ValueError(f"{nm} must be a tensor of shape {tuple(ref.shape)} on {ref.device}")
        if o.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{nm} has unsupported dtype {o.dtype}")
    if (aux_out is None) != (aux_coef is None):
        raise ValueError("aux_out and aux_coef must be given together")


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None):
    validate(out, bufs, coef, aux_out, aux_coef)
    ref = bufs[0]
    B, K = ref.shape[0], len(bufs)
    has_mask = check_mask(mask, mask_coef, out, aux_out, ref.shape, ref.device)
    steps = per_sample_steps(step, B)
    cdt = compute_dtype or compute_dtype_for(out.dtype)
    c, per_sample = _coef_tensor(coef, B, K, ref.device, cdt, "coef")
    view = (B,) + (1,) * (ref.dim() - 1)
    xs = [b.to(cdt) for b in bufs]

    def combine(cs, ps):
        acc = None
        for k in range(K):
            ck = cs[:, k].view(view) if ps else cs[k]
            term = xs[k] * ck
            acc = term if acc is None else acc + term
        return acc

    if has_mask:
        mc, mps = _coef_tensor(mask_coef, B, K, ref.device, cdt, "mask_coef")
    res = combine(c, per_sample)
    nc = noise_coef
    has_noise = (isinstance(nc, torch.Tensor) or nc != 0.0)
    if has_noise:
        if noise is None:
            if seeds is None or (steps is None and step < 0):
                raise ValueError("a noisy update needs seeds and step >= 0 or an int64 [B] "
                                 "step tensor (or noise=)")
            z = philox_normal(seeds, step if steps is None else steps, ref[0].numel(),
                              device=ref.device, dtype=torch.float32).view(ref.shape).to(cdt)
        else:
            if noise.shape != ref.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(ref.shape)}")
            z = noise.to(cdt)
        if isinstance(nc, torch.Tensor):
            nc = nc.to(device=ref.device, dtype=cdt).view(view)
        res = res + nc * z
    if has_mask:
        m = mask.to(cdt)
        res = m * res + (1 - m) * combine(mc, mps)
    aux_res = None
    if aux_out is not None:
        ac, aps = _coef_tensor(aux_coef, B, K, ref.device, cdt, "aux_coef")
        aux_res = combine(ac, aps)
    out.copy_(res)
    if aux_out is not None:
        aux_out.copy_(aux_res)
    return out
