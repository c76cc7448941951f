"""Log-likelihood of data through the probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through SDEs", App. D.2; the instantaneous change of variables of Chen et
al. 2018 and FFJORD, Grathwohl et al. 2019).

In the scaled state x_hat = x / s and u = log sigma the PF-ODE is

    d x_hat / d u = v(x_hat, u) = x_hat - D(x_hat; sigma),     sigma = e^u

and the log-density of the marginal p_sigma along a solution changes as
d log p_sigma(x_hat(u)) / du = -div v = -(d - div D). So for data x0 at sigma_min

    log p_{sigma_min}(x0) = log p_{sigma_max}(x_hat(u_max)) + int_{u_min}^{u_max} (d - div D) du

with u_min = log sigma_min, u_max = log sigma_max. The integral rides along the ODE as one
more state component. ``div D`` is exact (the Jacobian's diagonal from d vector-Jacobian
products, one vmapped backward pass where the model allows it; for small dimensions) or
Hutchinson's estimate z^T (dD/dx) z with probes z fixed over the whole solve (Rademacher or
Gaussian, drawn from Philox keyed by each sample's seed, so an estimate never depends on the
batch around it): E_z of the integral is the exact integral, the estimator is
unbiased. The ``d`` part is added exactly, so Gaussian probes add no variance through z^T z.

Everything is in data units (x_hat space): the result is log p_{sigma_min}(x0), the density
of x0 + sigma_min eps, which tends to the data density as sigma_min -> 0. For the Gaussian
mixture it is ``GaussianMixture.log_prob(x0, sigma_min)`` exactly. Bits per dimension are
-log p / (d ln 2) of this continuous density; for 8-bit images uniformly dequantized as
(k + u) / 256 the discrete bits/dim add log2 of the bins per unit: 8 for data in [0, 1] (Song
et al.), 7 for data mapped to [-1, 1].

The prior at sigma_max is either ``"gaussian"``, N(0, (sigma_max^2 + data_var) I) in x_hat
space with data_var such that the std matches ``process.prior_std``, the scale Sampler gives
its initial noise (1 for VP and flow; 0 for VE and EDM: score_sde's and k-diffusion's
N(0, sigma_max^2 I)), or a callable giving the exact log-density of the noisy marginal
(``lambda x: gmm.log_prob(x, sigma_max)``). The Gaussian prior's own error
at a latent x_T ~ sigma_max z is about (x_T . mean) / sigma_max^2 ~ |mean| / sigma_max per
sample, zero on average: 1.3e-2 to 2.9e-2 nats at sigma_max = 80 on GaussianMixture.random
(d = 2..8, means of norm about sqrt(d)), against 1e-8 with the exact marginal as prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import check_callable, check_int, check_real, check_tensor
from .noise import philox_normal, seeds_tensor
from .parameterization import Denoiser, affine, check_prediction, wrap
from .processes import Process
from .solvers.registry import MAX_STEPS

__all__ = [
    "LikelihoodResult",
    "divergence_exact",
    "divergence_hutchinson",
    "hutchinson_probes",
    "log_likelihood",
]

_SCIPY_METHODS = ("RK45", "DOP853", "RK23", "Radau", "BDF", "LSODA")
_FIXED_METHODS = ("euler", "heun", "rk4")
#: The 'auto' divergence is exact up to this many dimensions per sample (d backward passes).
EXACT_MAX_DIM = 16


@dataclass
class LikelihoodResult:
    """Per-sample results of :func:`log_likelihood` (float64 tensors of shape [B])."""

    log_prob: torch.Tensor        # log p_{sigma_min}(x0), nats
    bits_per_dim: torch.Tensor    # -log_prob / (d ln 2)
    prior_log_prob: torch.Tensor  # log p_{sigma_max}(x_T) under the prior
    delta: torch.Tensor           # int (d - div D) du: log_prob - prior_log_prob
    latent: torch.Tensor          # x_T = x_hat at sigma_max, [B, ...], data units
    nfe: int                      # divergence evaluations (each one model call + backward)
    divergence: str               # "exact" or "hutchinson"


def _vjps(y: torch.Tensor, x: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """[P, *x.shape]: the vector-Jacobian products v_k^T (dy/dx) for vs [P, *y.shape].

    One vmapped backward pass (``is_grads_batched``) where the model's backward supports it,
    else one backward pass per vector."""
    try:
        (g,) = torch.autograd.grad(y, x, grad_outputs=vs, retain_graph=True,
                                   is_grads_batched=True)
        return g
    except (RuntimeError, NotImplementedError):
        pass
    return torch.stack([torch.autograd.grad(y, x, grad_outputs=v, retain_graph=True)[0]
                        for v in vs])


def divergence_exact(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), div fn(x)) per sample from the Jacobian's diagonal: the vector-Jacobian
    products with the d unit vectors (shared by the batch: ``fn`` must map [B, ...] to
    [B, ...] sample by sample, with no coupling across the batch)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        B, n = y.shape[0], y[0].numel()
        eye = torch.eye(n, dtype=y.dtype, device=y.device)
        vs = eye.unsqueeze(1).expand(n, B, n).reshape(n, *y.shape)
        g = _vjps(y, x, vs).reshape(n, B, n)
        div = torch.diagonal(g, dim1=0, dim2=2).sum(-1)
    return y.detach(), div.detach()


def divergence_hutchinson(fn, x: torch.Tensor, probes: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), mean_k z_k^T (d fn / dx) z_k) per sample for probes [P, B, ...]
    (vector-Jacobian products, Hutchinson 1989)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        B = y.shape[0]
        z = probes.to(y.dtype)
        g = _vjps(y, x, z)
        est = (g * z).reshape(z.shape[0], B, -1).sum(-1).mean(0)
    return y.detach(), est.detach()


def hutchinson_probes(seed, batch: int, numel: int, probes: int = 1, kind: str = "rademacher",
                      device=None, dtype=torch.float64) -> torch.Tensor:
    """Probes [probes, batch, numel]: Philox normals of draw k for probe k, keyed by each
    sample's seed (``seed`` as in Sampler.sample: an int or per-sample seeds), or their signs
    (Rademacher)."""
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {kind!r}")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    seeds = seeds_tensor(seed, batch)
    z = torch.stack([philox_normal(seeds, k, numel, device=device, dtype=torch.float64)
                     for k in range(probes)])
    if kind == "rademacher":
        z = torch.where(z >= 0, 1.0, -1.0).to(torch.float64)
    return z.to(dtype)


def _denoiser_in_xhat(process: Process, model, prediction: str, extra_args):
    """D(x_hat, sigma) for any model kind: call the model in the process convention on
    x = s x_hat and fold its output with the parameterization's affine map."""
    adapter = wrap(model, extra_args)

    def D(x_hat: torch.Tensor, sigma: float) -> torch.Tensor:
        s = float(process.s_of_sigma(sigma))
        t = float(process.model_time(sigma))
        x = x_hat * s if s != 1.0 else x_hat
        out = adapter(x, sigma, t, s)
        if x_hat.requires_grad and not out.requires_grad:
            # Its divergence would count only the dx * x part: silently wrong (-24.5 nats
            # instead of -0.92 on a 2-D mixture).
            raise ValueError(
                "log_likelihood needs the model's output to carry an autograd graph back to "
                "its input x (the divergence is taken by vector-Jacobian products), but the "
                "model returned a tensor without one: it computes in numpy, detaches, or runs "
                "under its own torch.no_grad()/inference_mode. Make the model differentiable "
                "in x.")
        (dx, do), _ = affine(prediction, s, s * sigma)
        return dx * x + do * out
    return D


def _gaussian_prior(var: float):
    def logp(x: torch.Tensor) -> torch.Tensor:
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        d = xf.shape[1]
        return -0.5 * (xf * xf).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)
    return logp


def log_likelihood(process: Process, model, data: torch.Tensor, *, prediction: str = "epsilon",
                   sigma_min: float | None = None, sigma_max: float | None = None,
                   prior="gaussian", data_var: float | None = None,
                   divergence: str = "auto", probes: int | torch.Tensor = 1,
                   probe: str = "rademacher", seed=0, method: str = "RK45",
                   rtol: float = 1e-5, atol: float = 1e-5, steps: int | None = None,
                   extra_args: dict | None = None,
                   dtype: torch.dtype = torch.float64) -> LikelihoodResult:
    """log p(x0) of data ``data`` [B, ...] (data units) through the PF-ODE, in nats and bits/dim.

    ``divergence``: "exact" (the Jacobian's diagonal from d vector-Jacobian products per
    evaluation), "hutchinson" (``probes`` vector-Jacobian products with ``probe`` =
    "rademacher" or "gaussian" vectors, fixed over the solve, seeded per sample by ``seed``;
    or ``probes`` a tensor of probe vectors [P, B, ...] or [P, ...]), or "auto" (exact up to
    EXACT_MAX_DIM = 16 dimensions per sample). ``method``: a scipy ``solve_ivp`` method
    (RK45, DOP853, ...; float64 on the host, all samples in one system, with ``rtol`` and
    ``atol``) or a fixed-step one in torch on the data's device ("euler", "heun", "rk4",
    ``steps`` uniform steps in log sigma). ``sigma_min``/``sigma_max`` default to the
    process's range; ``prior`` and ``data_var`` as in the module docstring. The model runs in
    ``dtype`` (float64 default).

    The divergence needs autograd through the model: a model whose output has no graph back
    to its input (numpy inside, ``detach``, its own ``no_grad``) raises ValueError, and a call
    inside ``torch.inference_mode`` raises RuntimeError (no estimate without gradients).
    ``torch.no_grad`` around the call is fine: gradients are enabled inside.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("log_likelihood cannot run inside torch.inference_mode(): the "
                           "divergence of the model needs autograd (vector-Jacobian "
                           "products); call it outside inference_mode (torch.no_grad() "
                           "around it is fine)")
    if not isinstance(process, Process):
        raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                        f"{type(process).__name__}")
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.dim() < 2:
        raise ValueError("data must be a floating tensor [B, ...] with at least one dimension "
                         "per sample")
    check_tensor("data", data)
    if not bool(torch.isfinite(data).all()):
        raise ValueError("data must be finite (it holds NaN or infinite values)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_callable("model", model)
    rtol = check_real("rtol", rtol, lo=0.0, lo_open=True)
    atol = check_real("atol", atol, lo=0.0, lo_open=True)
    if data_var is not None:
        data_var = check_real("data_var", data_var, lo=0.0)
    prediction = check_prediction(prediction)
    if isinstance(model, Denoiser) and prediction != "sample":
        raise ValueError(f"model is a pe.Denoiser (it returns x0), but prediction="
                         f"{prediction!r}; use prediction='sample'")
    smin = check_real("sigma_min", process.sigma_min if sigma_min is None else sigma_min,
                      allow_inf=True)
    smax = check_real("sigma_max", process.sigma_max if sigma_max is None else sigma_max,
                      allow_inf=True)
    if not (0 < smin < smax) or not math.isfinite(smax):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {smin} and {smax}")
    B = data.shape[0]
    shape = data.shape
    d = data[0].numel()
    if divergence == "auto":
        divergence = "exact" if d <= EXACT_MAX_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact', 'hutchinson' or 'auto', got "
                         f"{divergence!r}")
    if method not in _SCIPY_METHODS + _FIXED_METHODS:
        raise ValueError(f"method must be one of {_SCIPY_METHODS + _FIXED_METHODS}, got "
                         f"{method!r}")
    if method in _FIXED_METHODS:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"method {method!r} needs steps= (a positive integer), got "
                             f"{steps!r}")
        check_int("steps", steps, hi=MAX_STEPS)
    elif steps is not None:
        raise ValueError(f"steps= is for the fixed-step methods {_FIXED_METHODS}; "
                         f"{method!r} adapts its steps to rtol/atol")
    if callable(prior):
        log_prior = prior
    elif prior == "gaussian":
        if data_var is None:
            std = float(process.prior_std(smax)) / float(process.s_of_sigma(smax))
            var = std * std
        else:
            var = smax * smax + float(data_var)
        log_prior = _gaussian_prior(var)
    else:
        raise ValueError(f"prior must be 'gaussian' or a callable x_hat -> log density [B], "
                         f"got {prior!r}")

    device = data.device
    D = _denoiser_in_xhat(process, model, prediction, extra_args)
    z = None
    if divergence == "hutchinson":
        if isinstance(probes, torch.Tensor):
            # explicit probe vectors: [P, B, ...] or [P, ...] shared by every sample
            z = probes.to(device=device, dtype=dtype)
            if z.dim() == data.dim() and tuple(z.shape[1:]) == tuple(shape[1:]):
                z = z.unsqueeze(1).expand(z.shape[0], *shape)
            if z.dim() != data.dim() + 1 or tuple(z.shape[1:]) != tuple(shape):
                raise ValueError(f"probes must be [P, *data.shape] or [P, *data.shape[1:]], "
                                 f"got {tuple(probes.shape)} for data {tuple(shape)}")
        else:
            z = hutchinson_probes(seed, B, d, probes, probe, device=device,
                                  dtype=dtype).view(probes, *shape)
    nfe = 0

    def field(u: float, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dx/du, d delta/du) = (x - D, d - div D) at u = log sigma."""
        nonlocal nfe
        nfe += 1
        sigma = math.exp(u)

        def fn(xx):
            return D(xx, sigma)
        if z is None:
            den, div = divergence_exact(fn, x)
        else:
            den, div = divergence_hutchinson(fn, x, z)
        return x - den, d - div.to(torch.float64)

    # clone: data made under inference_mode is an inference tensor, which autograd refuses
    x0 = data.detach().to(device=device, dtype=dtype).clone()
    u0, u1 = math.log(smin), math.log(smax)
    if method in _SCIPY_METHODS:
        from scipy.integrate import solve_ivp

        n = B * d

        def f(u, y):
            x = torch.from_numpy(y[:n]).view(shape).to(device=device, dtype=dtype)
            vx, vd = field(u, x)
            return np.concatenate([vx.detach().to("cpu", torch.float64).reshape(-1).numpy(),
                                   vd.detach().to("cpu", torch.float64).numpy()])

        y0 = np.concatenate([x0.to("cpu", torch.float64).reshape(-1).numpy(), np.zeros(B)])
        sol = solve_ivp(f, (u0, u1), y0, method=method, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"likelihood ODE solve failed: {sol.message}")
        yT = sol.y[:, -1]
        xT = torch.from_numpy(yT[:n].copy()).view(shape).to(device)
        delta = torch.from_numpy(yT[n:].copy()).to(device)
    else:
        xT, delta = _fixed_step(field, x0, u0, u1, steps, method)
    prior_lp = log_prior(xT.to(torch.float64)).to(torch.float64).reshape(B)
    log_prob = prior_lp + delta.to(torch.float64)
    return LikelihoodResult(log_prob=log_prob, bits_per_dim=-log_prob / (d * math.log(2.0)),
                            prior_log_prob=prior_lp, delta=delta.to(torch.float64), latent=xT,
                            nfe=nfe, divergence=divergence)


def _fixed_step(field, x, u0, u1, steps, method):
    """Explicit Euler / Heun / classical RK4 on (x, delta), uniform in u = log sigma."""
    h = (u1 - u0) / steps
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(steps):
        u = u0 + i * h
        k1x, k1d = field(u, x)
        if method == "euler":
            x, delta = x + h * k1x, delta + h * k1d
            continue
        if method == "heun":
            k2x, k2d = field(u + h, x + h * k1x)
            x, delta = x + 0.5 * h * (k1x + k2x), delta + 0.5 * h * (k1d + k2d)
            continue
        k2x, k2d = field(u + 0.5 * h, x + 0.5 * h * k1x)
        k3x, k3d = field(u + 0.5 * h, x + 0.5 * h * k2x)
        k4x, k4d = field(u + h, x + h * k3x)
        x = x + (h / 6.0) * (k1x + 2.0 * k2x + 2.0 * k3x + k4x)
        delta = delta + (h / 6.0) * (k1d + 2.0 * k2d + 2.0 * k3d + k4d)
    return x, delta
