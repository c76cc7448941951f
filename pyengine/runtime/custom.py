"""Tensor code of the plan's custom ops (pyengine.plan.Custom): what the executor runs for
ops whose numbers depend on the data. Each implementation is ``fn(op, walker)``; it reads
and writes the walker's slots and issues its fused updates through ``walker.apply``."""

from __future__ import annotations

import torch

from ..noise import philox_normal
from ..plan import Custom, GuidanceRescale

__all__ = ["implementation", "register"]

_IMPLS: dict[type, object] = {}


def register(cls):
    """Decorator: ``fn(op, walker)`` runs ops of class ``cls``."""
    def deco(fn):
        _IMPLS[cls] = fn
        return fn
    return deco


def implementation(op: Custom):
    for cls in type(op).__mro__:
        fn = _IMPLS.get(cls)
        if fn is not None:
            return fn
    raise TypeError(f"no executor implementation for the custom op {type(op).__name__}")


@register(GuidanceRescale)
def guidance_rescale(op: GuidanceRescale, w) -> None:
    """cfg = u + w (c - u); dst = phi cfg std(c)/std(cfg) + (1 - phi) cfg, per sample."""
    u, c = w.slots[op.src + "/u"], w.slots[op.src + "/c"]
    cfg = u + op.w * (c - u)
    dims = list(range(1, c.dim()))
    std_c = c.std(dim=dims, keepdim=True)
    std_cfg = cfg.std(dim=dims, keepdim=True)
    w.bind(op.dst, op.phi * (cfg * (std_c / std_cfg)) + (1.0 - op.phi) * cfg)


def _langevin(op, w) -> None:
    """x <- x + eps_b score + sqrt(2 eps_b) z, eps_b = 2 alpha (snr ||z_b|| / ||score_b||)^2.

    The score goes to a scratch buffer through a fused update, the step sizes are torch
    reductions on the device (no host sync), and the step is a second fused update with a
    per-sample [B, 2] coefficient table and the drawn noise passed in. The score buffer is
    kept in float32 at least (float16 scores at small sigma overflow)."""
    x = w.slots[op.slot]
    B = x.shape[0]
    sdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    score = torch.empty(x.shape, dtype=sdt, device=x.device)
    w.backend.fused_update(score, [w.slots[n] for n in op.score_bufs], op.score_coefs, 0.0,
                           None, -1, **w.kw)
    if isinstance(w.noise, _philox_type()):
        z = philox_normal(w.noise.seeds, op.noise_index, x[0].numel(), device=x.device,
                          dtype=torch.float32).view(x.shape)
    elif w.noise is not None:
        _, _, z = w.noise.draw(op, x)
        if z is None:
            raise ValueError("the Langevin corrector needs noise; the noise source gave none")
    else:
        raise ValueError("the Langevin corrector needs per-sample seeds or a noise source")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = torch.linalg.vector_norm(score.reshape(B, -1), dim=1, dtype=acc).to(torch.float64)
    n = torch.linalg.vector_norm(z.reshape(B, -1), dim=1, dtype=acc).to(torch.float64)
    eps = 2.0 * op.alpha * (op.snr * n / g.clamp_min(torch.finfo(torch.float64).tiny)) ** 2
    coef = torch.stack([torch.ones_like(eps), eps], dim=1)              # [B, 2]
    w.slots["__score"] = score
    seeds = getattr(w.noise, "seeds", None)
    w.apply(op.slot, [op.slot, "__score"], coef, torch.sqrt(2.0 * eps), seeds,
            op.noise_index, noise=z)
    del w.slots["__score"]


def _philox_type():
    from .walk import PhiloxDraws
    return PhiloxDraws


def _process_x0(op, w) -> None:
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
        # a bound beyond the dtype's range clamps nothing (and torch refuses to convert it)
        q = torch.clamp(q, min=1.0, max=min(op.max_value, torch.finfo(q.dtype).max)).unsqueeze(1)
        d.copy_((torch.clamp(src, -q, q) / q).to(d.dtype).reshape(d.shape))
    elif op.clip_range < torch.finfo(d.dtype).max:     # a bound beyond the range clamps nothing
        d.clamp_(-op.clip_range, op.clip_range)
    w.bind(op.dst, d)


def _register_solver_ops() -> None:
    """The custom ops solvers declare (their classes live beside the solvers)."""
    from ..solvers.diffusers_compat import ProcessX0
    from ..solvers.sde import LangevinCorrector
    register(LangevinCorrector)(_langevin)
    register(ProcessX0)(_process_x0)


_register_solver_ops()
