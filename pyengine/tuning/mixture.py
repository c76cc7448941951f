"""The exact Gaussian mixture as a model that is differentiable in its time input.

:meth:`pyengine.models.GaussianMixture.as_model` maps the model time to sigma with the
process's numpy code (no gradient reaches ``t``). Fitting decoupled evaluation times needs
d output / d t: :func:`mixture_model` is the same model with sigma(t) an autograd function
whose derivative is a central difference of the process's own ``sigma_of_model_time``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..parameterization import output_from_denoised

__all__ = ["mixture_model", "s_of_sigma", "sigma_of_model_time"]


class _Numeric(torch.autograd.Function):
    """y = fn(x) for a numpy float64 function, with a central-difference derivative."""

    @staticmethod
    def forward(ctx, x, fn, lo, hi):
        xx = x.detach().cpu().to(torch.float64).numpy()
        y = np.asarray(fn(xx), dtype=np.float64).reshape(xx.shape)
        h = 1e-6 * np.maximum(np.abs(xx), 1e-3)
        a, b = np.clip(xx - h, lo, hi), np.clip(xx + h, lo, hi)
        ya = np.asarray(fn(a), dtype=np.float64).reshape(xx.shape)
        yb = np.asarray(fn(b), dtype=np.float64).reshape(xx.shape)
        ctx.save_for_backward(torch.from_numpy((yb - ya) / np.maximum(b - a, 1e-300)))
        return torch.from_numpy(y).to(x.device)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return grad * d.to(device=grad.device, dtype=grad.dtype), None, None, None


def sigma_of_model_time(process, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) of ``process`` as a float64 tensor that carries gradients to ``t``."""
    lo = float(process.model_time(float(process.sigma_min)))
    hi = float(process.model_time(float(process.sigma_max)))
    return _Numeric.apply(torch.as_tensor(t, dtype=torch.float64).reshape(-1),
                          process.sigma_of_model_time, min(lo, hi), max(lo, hi))


def s_of_sigma(process, sigma: torch.Tensor) -> torch.Tensor:
    """The process scale s(sigma) as a float64 tensor that carries gradients to ``sigma``."""
    return _Numeric.apply(sigma, process.s_of_sigma, 0.0, np.inf)


def mixture_model(gmm, process, prediction: str = "epsilon"):
    """``model(x, t)`` of the exact mixture ``gmm`` in ``process``'s convention, returning
    the given prediction kind, differentiable in ``x`` and ``t`` (float64 inside)."""
    def model(x, t):
        B = x.shape[0]
        tt = torch.as_tensor(t).reshape(-1)
        if tt.numel() not in (1, B):
            raise ValueError(f"t must be one time or one per sample ({B}), got {tt.numel()}")
        sig = sigma_of_model_time(process, tt).to(x.device)
        sig = sig.expand(B) if sig.numel() == 1 else sig
        s = s_of_sigma(process, sig)
        view = (-1,) + (1,) * (x.dim() - 1)
        sig_v, s_v = sig.view(view), s.view(view)
        x64 = x.to(torch.float64)
        D = gmm.denoise(x64 / s_v, sig)
        return output_from_denoised(prediction, x64, D, s_v, s_v * sig_v).to(x.dtype)
    return model
