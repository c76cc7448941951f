"""Model parameterizations, normalized once at the boundary.

With alpha = s and sigma_dpm = s * sigma, a state x = alpha * x0 + sigma_dpm * eps, every
model output kind is affine in (x, out), so the denoised estimate D = x0_hat and the noise
estimate eps_hat fold into the plan's coefficients (no solver branches on the prediction):

| prediction | D = x0_hat | eps_hat |
|---|---|---|
| epsilon | (x - sigma_dpm out) / alpha | out |
| sample  | out | (x - alpha out) / sigma_dpm |
| v (alpha eps - sigma_dpm x0) | (alpha x - sigma_dpm out) / n_v | (sigma_dpm x + alpha out) / n_v |
| flow (out = eps - x0) | (x - sigma_dpm out) / n_f | (x + alpha out) / n_f |
| score (out = grad log p(x)) | (x + sigma_dpm^2 out) / alpha | -sigma_dpm out |

with n_v = alpha^2 + sigma_dpm^2 and n_f = alpha + sigma_dpm. For VP processes n_v = 1 and for
flow n_f = 1, which gives the familiar forms. The model also needs calling in the process's
convention; :func:`wrap` builds that callable, including for k-diffusion-style denoisers
``D(x_hat, sigma)``.
"""

from __future__ import annotations

import math

import torch

from .errors import check_callable, check_kwargs

PREDICTIONS = ("epsilon", "sample", "v", "flow", "score")
_ALIASES = {"eps": "epsilon", "x0": "sample", "v_prediction": "v", "velocity": "flow",
            "flow_prediction": "flow"}

__all__ = ["PREDICTIONS", "check_prediction", "affine", "output_from_denoised", "Denoiser",
           "ModelAdapter", "wrap"]


def check_prediction(prediction: str) -> str:
    p = _ALIASES.get(prediction, prediction)
    if p not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or an alias in "
                         f"{sorted(_ALIASES)}), got {prediction!r}")
    return p


def affine(prediction: str, alpha: float, sd: float):
    """((D_x, D_out), (eps_x, eps_out)): D = D_x x + D_out out, eps = eps_x x + eps_out out."""
    p = check_prediction(prediction)
    def inv(a):
        return 1.0 / a if a != 0 else math.nan
    if p == "epsilon":
        return (inv(alpha), -sd * inv(alpha)), (0.0, 1.0)
    if p == "sample":
        return (0.0, 1.0), (inv(sd), -alpha * inv(sd))
    if p == "v":
        n = inv(alpha * alpha + sd * sd)
        return (alpha * n, -sd * n), (sd * n, alpha * n)
    if p == "flow":
        n = inv(alpha + sd)
        return (n, -sd * n), (n, alpha * n)
    # score
    return (inv(alpha), sd * sd * inv(alpha)), (0.0, -sd)


def output_from_denoised(prediction: str, x, denoised, alpha: float, sd: float):
    """The model output of the given kind whose denoised estimate is ``denoised`` (inverse of
    :func:`affine`); used to turn an exact denoiser into an eps/v/flow/score model."""
    p = check_prediction(prediction)
    if p == "sample":
        return denoised
    eps = (x - alpha * denoised) / sd
    if p == "epsilon":
        return eps
    if p == "v":
        return alpha * eps - sd * denoised
    if p == "flow":
        return eps - denoised
    return -eps / sd


class Denoiser:
    """Marks a k-diffusion-style denoiser ``D(x_hat, sigma) -> x0_hat``.

    pyengine calls it with the scaled state x_hat = x / s and a [B] tensor of sigmas, whatever
    the process; its output is taken as prediction="sample".
    """

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"Denoiser needs a callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, x_hat, sigma, **kwargs):
        return self.fn(x_hat, sigma, **kwargs)


class ModelAdapter:
    """Calls a user model in the process convention: ``model(x, t)`` with t a [B] tensor.

    ``t`` has the dtype of x (float32 for reduced-precision states). A :class:`Denoiser` is
    called as ``D(x / s, sigma)`` instead. Extra keyword arguments are passed through.
    """

    def __init__(self, model, extra_args: dict | None = None):
        check_callable("model", model)
        self.model = model
        self.is_denoiser = isinstance(model, Denoiser)
        self.extra_args = check_kwargs("extra_args", extra_args)

    def __call__(self, x: torch.Tensor, sigma: float, t: float, s: float,
                 row: torch.Tensor | None = None) -> torch.Tensor:
        """``row``: the [B] tensor of t (of sigma for a Denoiser) made by the caller."""
        if row is None:
            tdtype = x.dtype if x.dtype == torch.float64 else torch.float32
            row = torch.full((x.shape[0],), sigma if self.is_denoiser else t, dtype=tdtype,
                             device=x.device)
        if self.is_denoiser:
            out = self.model(x / s if s != 1.0 else x, row, **self.extra_args)
        else:
            out = self.model(x, row, **self.extra_args)
        return self._check(out, x)

    def call_row(self, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """A model (not a Denoiser) on ``x`` at the [B] times ``row``."""
        return self._check(self.model(x, row, **self.extra_args), x)

    def call_rows(self, x: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
        """The same call with per-sample [B] tensors of times, sigmas and scales (read from
        device memory: what a captured loop and a mixed-step batch use)."""
        if self.is_denoiser:
            view = (-1,) + (1,) * (x.dim() - 1)
            out = self.model(x / s.view(view).to(x.dtype), sigma, **self.extra_args)
        else:
            out = self.model(x, t, **self.extra_args)
        return self._check(out, x)

    @staticmethod
    def _check(out, x):
        out = output_tensor(out)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model output must be a tensor of the input's shape "
                             f"{tuple(x.shape)}, got {got}")
        if out.device != x.device or not out.is_floating_point():
            raise ValueError(f"model output must be a floating tensor on the input's device "
                             f"{x.device}, got {out.dtype} on {out.device}")
        return out


def output_tensor(out):
    """The tensor of a model's output: itself, a diffusers output's ``.sample``, or a tuple's
    first element (anything else is returned as it is, for the caller to refuse)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple):
        return out[0]
    return out


def wrap(model, extra_args: dict | None = None) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model, extra_args)


def edm_scalings(sigma, sigma_data: float):
    """EDM's preconditioning (Karras et al. 2022, Table 1) at ``sigma`` (a float or a tensor):
    (c_skip, c_out, c_in) = (sd^2 / (sigma^2 + sd^2), sigma sd / sqrt(sigma^2 + sd^2),
    1 / sqrt(sigma^2 + sd^2)), so D(x; sigma) = c_skip x + c_out F(c_in x, c_noise). The one
    statement of it that the digits model and the diffusers EDM adapters use."""
    sd2 = float(sigma_data) ** 2
    n2 = sigma * sigma + sd2
    root = n2 ** 0.5
    return sd2 / n2, sigma * float(sigma_data) / root, 1 / root
