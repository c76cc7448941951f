"""Plain-torch float64 references shared by tests and benchmarks."""

from __future__ import annotations

import torch

from pyengine.noise import philox_normal


def fused_update_reference(bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_coef=None,
                           noise=None, mask=None, mask_coef=None):
    """float64: sum_k coef_k buf_k + noise_coef z (and the aux combination); with a mask m,
    m * that + (1 - m) * sum_k mask_coef_k buf_k. ``step`` may be an int64 [B] tensor."""
    B = bufs[0].shape[0]
    view = (B,) + (1,) * (bufs[0].dim() - 1)
    xs = [b.to(torch.float64) for b in bufs]

    def comb(c):
        c = torch.as_tensor(c, dtype=torch.float64)
        if c.dim() == 1:
            return sum(float(c[k]) * xs[k] for k in range(len(xs)))
        return sum(c[:, k].view(view) * xs[k] for k in range(len(xs)))

    out = comb(coef)
    if isinstance(noise_coef, torch.Tensor) or noise_coef != 0.0:
        if noise is None:
            noise = philox_normal(seeds, step, bufs[0][0].numel()).view(bufs[0].shape)
        nc = noise_coef.to(torch.float64).view(view) if isinstance(noise_coef, torch.Tensor) \
            else noise_coef
        out = out + nc * noise.to(torch.float64)
    if mask is not None:
        m = mask.to(torch.float64)
        out = m * out + (1 - m) * comb(mask_coef)
    aux = comb(aux_coef) if aux_coef is not None else None
    return out, aux
