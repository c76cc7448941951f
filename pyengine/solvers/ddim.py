"""DDIM (Song et al. 2021) with eta, DDPM ancestral sampling (Ho et al. 2020) and DDIM
inversion, written in the scaled state x_hat = x / s with sigma^2 = (1 - alpha_bar) / alpha_bar."""

from __future__ import annotations

import math

from ._common import ancestral_step
from .registry import register
from .stochasticity import ancestral_eta


@register("ddim", order=1, nfe_per_step=1, stochastic=False, family="ddim",
          summary="DDIM (Song 2021 eq. 12): x_hat' = D + sqrt(sigma'^2 - std^2) eps + std z, "
                  "std = eta sigma' sqrt(1 - sigma'^2/sigma^2); eta=0 is the PF-ODE; "
                  "stochasticity=lambda: the SEEDS lambda family (per-step eta with "
                  "e^{-2 lambda h} = 1 - eta^2 (1 - sigma'^2/sigma^2))",
          options=("eta", "stochasticity"), eta=0.0, stochasticity=None)
def ddim(b, eta, stochasticity):
    """DDIM with ``eta`` (diffusers' and the paper's), or ``stochasticity`` = lambda in [0, 1]
    (pyengine.solvers.stochasticity): each step then uses the eta that makes it the
    lambda-family step, eta_i^2 = (1 - e^{-2 lambda h_i}) / (1 - sigma_{i+1}^2/sigma_i^2)."""
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        e = eta if stochasticity is None else ancestral_eta(sig[i], sig[i + 1], stochasticity)
        _, std = ancestral_step(sig[i], sig[i + 1], e)
        D, eps = b.evaluate("x", sig[i])
        b.assign("x", D + math.sqrt(max(sig[i + 1] ** 2 - std ** 2, 0.0)) * eps, sig[i + 1],
                 noise=std, noisy=e > 0)


@register("ddpm", order=1, nfe_per_step=1, stochastic=True, family="ddim",
          summary="DDPM ancestral (Ho 2020 eq. 7): posterior mean c0 D + ct x plus std z; "
                  "variance_type fixed_small (beta tilde) or fixed_large (beta)",
          options=("variance_type",), variance_type="fixed_small")
def ddpm(b, variance_type):
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got "
                         f"{variance_type!r}")
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        a_t = 1.0 / (1.0 + sig[i] ** 2)           # alpha_bar at this level
        a_p = 1.0 / (1.0 + sig[i + 1] ** 2)       # alpha_bar at the next
        alpha = a_t / a_p
        beta = 1.0 - alpha
        c0 = math.sqrt(a_p) * beta / (1.0 - a_t)
        ct = math.sqrt(alpha) * (1.0 - a_p) / (1.0 - a_t)
        if variance_type == "fixed_small":
            var = max((1.0 - a_p) / (1.0 - a_t) * beta, 1e-20)
        else:
            var = beta
        # x_vp = sqrt(a) x_hat on both sides; the state is then rescaled by the process's s.
        draw = b.time_of(sig[i]) > 0   # diffusers draws only while t > 0
        D, _ = b.evaluate("x", sig[i])
        x_hat = b.xhat("x", sig[i])
        b.assign("x", (c0 / math.sqrt(a_p)) * D + (ct * math.sqrt(a_t / a_p)) * x_hat,
                 sig[i + 1], noise=math.sqrt(var / a_p) if draw else 0.0, noisy=draw)


@register("ddim_inverse", order=1, nfe_per_step=1, stochastic=False, family="inversion",
          summary="DDIM inversion: data to noise along increasing sigma, x_hat' = D + sigma' eps")
def ddim_inverse(b):
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        D, eps = b.evaluate("x", sig[i])
        b.assign("x", D + sig[i + 1] * eps, sig[i + 1])
