"""Training objectives: denoising score matching in the (s, sigma) form of :mod:`.processes`.

    x = s (x0 + sigma eps) = alpha x0 + sigma_dpm eps,   eps ~ N(0, I)
    loss = E_{sigma, x0, eps} w(sigma) ||F(x; t(sigma)) - target||^2 / dim

with F the network in its prediction's convention (:mod:`.parameterization`), ``target`` the
output whose denoised estimate is x0 exactly, and w the weight of the prediction's space.
A weighting is stated once, as the weight lambda(sigma) of the x0-space error: with
g = d out / d x0_hat at fixed x, ||out - target||^2 = g^2 ||x0_hat - x0||^2, so
w = lambda / g^2.

| weighting | lambda(sigma), x0 space | source |
|---|---|---|
| "none" | g^2 of the prediction: its plain MSE | DDPM L_simple (Ho 2020 eq. 14), flow matching |
| a prediction q | g_q^2: the MSE of q's target, whatever F predicts | Salimans & Ho 2022 |
| "snr" | 1 / sigma^2 (= "epsilon") | |
| "min_snr" | min(1 / sigma^2, gamma) | Hang et al. 2023 (gamma = 5) |
| "edm" | (sigma^2 + sd^2) / (sigma sd)^2 | Karras et al. 2022, Table 1 |

(1 / sigma^2 = alpha^2 / sigma_dpm^2 is the SNR of every process in this form.)

Noise levels (:func:`sample_sigmas`): ``"uniform"`` in the process's own time over its
trained range (integer timesteps for discrete VP), ``"lognormal"`` (EDM), ``"logit_normal"``
(SD3's flow models). Per-sample factors are float64 on the host (the process functions are
numpy), then cast to the data's dtype; a GPU batch syncs once per call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import check_tensor
from .parameterization import Denoiser, check_prediction, output_from_denoised, wrap
from .processes import Process, VPDiscrete

__all__ = ["WEIGHTINGS", "SIGMA_SAMPLING", "sample_sigmas", "noisy", "target", "loss_weight",
           "denoising_loss"]

WEIGHTINGS = ("none", "epsilon", "sample", "v", "flow", "score", "snr", "min_snr", "edm")
SIGMA_SAMPLING = ("uniform", "lognormal", "logit_normal")


def _host(sigma) -> np.ndarray:
    """sigma (tensor, array or float) as a float64 numpy vector."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.detach().to("cpu", torch.float64).numpy()
    return np.atleast_1d(np.asarray(sigma, dtype=np.float64))


def _col(v: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A per-sample float64 vector as a [B, 1, ...] tensor in ``like``'s dtype and device."""
    return torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(
        (-1,) + (1,) * (like.dim() - 1))


def _combine(a: np.ndarray, x: torch.Tensor, b: np.ndarray, y: torch.Tensor) -> torch.Tensor:
    """a x + b y with per-sample a, b; terms with all-zero coefficients are left out and unit
    coefficients not multiplied (so x0 + sigma eps, a target of x0 itself, stay exact)."""
    terms = [v if np.all(c == 1.0) else _col(c, v) * v
             for c, v in ((a, x), (b, y)) if not np.all(c == 0.0)]
    if not terms:
        return torch.zeros_like(x)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _check_weighting(weighting) -> str:
    """The weighting's name, a prediction alias ("x0", "eps", ...) normalized."""
    if weighting in ("none", "snr", "min_snr", "edm"):
        return weighting
    try:
        return check_prediction(weighting)
    except (ValueError, TypeError):
        raise ValueError(f"weighting must be one of {WEIGHTINGS} (or a prediction alias), "
                         f"got {weighting!r}") from None


def _time_range(process: Process) -> tuple[float, float]:
    """The process's own time at sigma_min and sigma_max: the trained range of t."""
    return (float(process.t_of_sigma(process.sigma_min)),
            float(process.t_of_sigma(process.sigma_max)))


def sample_sigmas(process: Process, n: int, *, method: str = "uniform",
                  generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                  device=None, p_mean: float = -1.2, p_std: float = 1.2,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """n training noise levels sigma, a [n] tensor (``dtype``: torch's default).

    * ``"uniform"``: t ~ U(t(sigma_min), t(sigma_max)) in the process's own time, sigma =
      sigma(t); a discrete VP process draws integer timesteps U{0..N-1} (DDPM, Ho 2020 Alg. 1).
    * ``"lognormal"``: log sigma ~ N(p_mean, p_std^2), not clipped (EDM, Karras 2022 Table 1:
      P_mean = -1.2, P_std = 1.2); drawn in ``dtype``.
    * ``"logit_normal"``: u = sigmoid(logit_mean + logit_std z), t = t_min + u (t_max - t_min)
      (Esser et al. 2024, Sec. 3.1; for the flow process t is the interpolation time).
    """
    if not isinstance(process, Process):
        raise TypeError(f"process must be a pyengine.processes.Process, got "
                        f"{type(process).__name__}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if method not in SIGMA_SAMPLING:
        raise ValueError(f"method (sigma sampling) must be one of {SIGMA_SAMPLING}, got {method!r}")
    dtype = dtype or torch.get_default_dtype()
    gen_device = generator.device if generator is not None else "cpu"
    n = int(n)
    if method == "lognormal":
        z = torch.randn(n, generator=generator, dtype=dtype, device=gen_device)
        return (p_mean + p_std * z).exp().to(device or gen_device)
    if method == "uniform" and isinstance(process, VPDiscrete):
        k = torch.randint(0, process.num_train_timesteps, (n,), generator=generator,
                          device=gen_device).cpu().numpy()
        sig = process.sigmas[k]
    else:
        if method == "uniform":
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=gen_device)
        else:
            z = torch.randn(n, generator=generator, dtype=torch.float64, device=gen_device)
            u = torch.sigmoid(logit_mean + logit_std * z)
        t_lo, t_hi = _time_range(process)
        sig = _host(process.sigma_of_t(t_lo + _host(u) * (t_hi - t_lo)))
    return torch.as_tensor(sig, dtype=dtype, device=device or gen_device)


def noisy(process: Process, x0: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
    """x = s(sigma) (x0 + sigma eps) = alpha x0 + sigma_dpm eps, one sigma per sample."""
    alpha, sd = process.alpha_sigma_dpm(_host(sigma))
    return _combine(_host(alpha), x0, _host(sd), eps)


def _coefficients(prediction: str, alpha, sd):
    """(c_x0, c_eps, g): target = c_x0 x0 + c_eps eps and g = d out / d x0_hat at fixed x.

    ``output_from_denoised`` is linear in (x, x0_hat), so evaluating it at the basis points
    (x0, eps) = (1, 0), (0, 1) and (x, x0_hat) = (0, 1) gives the three exactly (no
    cancellation of x - alpha x0 at small sigma)."""
    c_x0 = output_from_denoised(prediction, alpha, 1.0, alpha, sd)
    c_eps = output_from_denoised(prediction, sd, 0.0, alpha, sd)
    g = output_from_denoised(prediction, 0.0, 1.0, alpha, sd)
    return tuple(np.array(np.broadcast_to(_host(c), np.shape(sd))) for c in (c_x0, c_eps, g))


def target(process: Process, prediction: str, x0: torch.Tensor, eps: torch.Tensor,
           sigma) -> torch.Tensor:
    """The output of kind ``prediction`` at x = alpha x0 + sigma_dpm eps whose denoised
    estimate is x0: eps, x0, v = alpha eps - sigma_dpm x0, flow = eps - x0, or the score
    -eps / sigma_dpm (the inverse of :func:`.parameterization.affine`)."""
    prediction = check_prediction(prediction)
    alpha, sd = process.alpha_sigma_dpm(_host(sigma))
    c_x0, c_eps, _ = _coefficients(prediction, _host(alpha), _host(sd))
    return _combine(c_x0, x0, c_eps, eps)


def loss_weight(process: Process, prediction: str, sigma, weighting: str = "none", *,
                sigma_data: float | None = None, gamma: float = 5.0) -> torch.Tensor:
    """w(sigma) = lambda(sigma) / g^2, the [B] weight of ||out - target||^2 (module table).

    ``sigma_data`` (for ``"edm"``): the argument, else ``process.sigma_data``, else 0.5.
    ``gamma``: the clip of ``"min_snr"``. Returned in sigma's dtype (float64 for non-tensors);
    lambda of ``"edm"`` and ``"min_snr"`` is computed in that dtype.
    """
    prediction = check_prediction(prediction)
    weighting = _check_weighting(weighting)
    sig = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    sig = sig.reshape(-1)
    alpha, sd = (_host(a) for a in process.alpha_sigma_dpm(_host(sig)))
    g = _coefficients(prediction, alpha, sd)[2]
    if weighting in ("none", prediction):
        return torch.ones_like(sig)
    if weighting == "edm":
        # EDM Table 1: lambda = 1 / c_out^2, so lambda ||D - x0||^2 = ||F - F_target||^2 (eq. 8)
        s_d = float(sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5))
        lam = (sig ** 2 + s_d ** 2) / (sig * s_d) ** 2
    elif weighting == "min_snr":
        lam = (1.0 / sig ** 2).clamp(max=float(gamma))
    else:
        q = "epsilon" if weighting == "snr" else weighting
        gq = _coefficients(q, alpha, sd)[2]
        return torch.as_tensor((gq / g) ** 2, dtype=sig.dtype, device=sig.device)
    return lam if np.all(g * g == 1.0) else lam / torch.as_tensor(g * g, dtype=sig.dtype,
                                                                  device=sig.device)


def denoising_loss(model, process: Process, x0: torch.Tensor, *, prediction: str,
                   weighting: str = "none", sigma_sampling: str | Callable = "uniform",
                   generator: torch.Generator | None = None, extra_args: dict | None = None,
                   sigma=None, eps: torch.Tensor | None = None, sampling_options=None,
                   sigma_data: float | None = None, gamma: float = 5.0,
                   reduction: str = "mean") -> torch.Tensor:
    """mean_b w(sigma_b) ||F(x_b; t(sigma_b)) - target_b||^2 / dim, x = alpha x0 + sigma_dpm eps.

    The model is called as in sampling (``model(x, t)`` with t = ``process.model_time``, a
    :class:`.Denoiser` as ``D(x / s, sigma)`` with ``prediction="sample"``). sigma: drawn by
    :func:`sample_sigmas` with ``method=sigma_sampling`` and ``sampling_options`` (or a
    callable ``n -> [n] sigmas``), unless given; eps: drawn after sigma from ``generator``
    unless given. ``reduction="none"`` returns the [B] per-sample losses.
    """
    prediction = check_prediction(prediction)
    if isinstance(model, Denoiser) and prediction != "sample":
        raise ValueError(f"a Denoiser outputs x0: prediction must be 'sample', got {prediction!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    _check_weighting(weighting)
    check_tensor("x0", x0)
    n = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if sigma is None:
        if callable(sigma_sampling):
            sigma = sigma_sampling(n)
        elif sigma_sampling in SIGMA_SAMPLING:
            sigma = sample_sigmas(process, n, method=sigma_sampling, generator=generator,
                                  dtype=x0.dtype, **dict(sampling_options or {}))
        else:
            raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLING} or a callable, "
                             f"got {sigma_sampling!r}")
    sigma = torch.as_tensor(sigma, dtype=x0.dtype).reshape(-1).to(x0.device)
    if sigma.numel() != n:
        raise ValueError(f"sigma must hold one noise level per sample ({n}), got {sigma.numel()}")
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                          device=gen_device).to(x0.device)
    x = noisy(process, x0, sigma, eps)
    sig64 = _host(sigma)
    tdtype = x.dtype if x.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(process.model_time(sig64), dtype=tdtype, device=x.device).reshape(-1)
    s = torch.as_tensor(process.s_of_sigma(sig64), dtype=torch.float64, device=x.device)
    out = wrap(model, extra_args).call_rows(x, t, sigma.to(tdtype), s.reshape(-1))
    w = loss_weight(process, prediction, sigma, weighting, sigma_data=sigma_data, gamma=gamma)
    err = w.reshape((-1,) + (1,) * (x0.dim() - 1)) * (out - target(process, prediction, x0,
                                                                   eps, sigma)) ** 2
    return err.mean() if reduction == "mean" else err.reshape(n, -1).mean(1)

