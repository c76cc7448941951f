"""The torch reference backend: the definition of correct for every kernel.

fused_update(out, bufs[K], coef[K] or [B, K], noise_coef or [B], seeds[B], step,
             aux_out=None, aux_coef=None)

    out = sum_k coef_k * bufs_k + noise_coef * z       aux_out = sum_k aux_coef_k * bufs_k

computed in float32 (float64 for float64 inputs, or ``compute_dtype``) and stored in the
output's dtype. z is the Philox noise of :mod:`pyengine.noise` for draw number ``step``, or
the user-supplied tensor ``noise``. Everything is computed before anything is written, so
``out`` and ``aux_out`` may alias inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..noise import philox_normal

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
                 aux_coef=None, *, noise=None, compute_dtype=None):
    validate(out, bufs, coef, aux_out, aux_coef)
    ref = bufs[0]
    B, K = ref.shape[0], len(bufs)
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

    res = combine(c, per_sample)
    nc = noise_coef
    has_noise = (isinstance(nc, torch.Tensor) or nc != 0.0)
    if has_noise:
        if noise is None:
            if seeds is None or step < 0:
                raise ValueError("a noisy update needs seeds and step >= 0 (or noise=)")
            z = philox_normal(seeds, step, ref[0].numel(), device=ref.device,
                              dtype=torch.float32).view(ref.shape).to(cdt)
        else:
            if noise.shape != ref.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(ref.shape)}")
            z = noise.to(cdt)
        if isinstance(nc, torch.Tensor):
            nc = nc.to(device=ref.device, dtype=cdt).view(view)
        res = res + nc * z
    aux_res = None
    if aux_out is not None:
        ac, aps = _coef_tensor(aux_coef, B, K, ref.device, cdt, "aux_coef")
        aux_res = combine(ac, aps)
    out.copy_(res)
    if aux_out is not None:
        aux_out.copy_(aux_res)
    return out
