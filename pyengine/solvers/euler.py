"""Euler-family solvers of the probability-flow ODE d x_hat / d sigma = eps(x_hat, sigma)
(Karras et al. 2022), with EDM churn and the ancestral SDE variant."""

from __future__ import annotations

import math

from ._common import CHURN_DEFAULTS, CHURN_OPTIONS, ancestral_step, churn
from .registry import register
from .stochasticity import ancestral_eta


@register("euler", order=1, nfe_per_step=1, stochastic=False, family="euler",
          summary="Euler: x_hat' = x_hat + (sigma' - sigma_hat) eps (Karras 2022 Alg. 2 without "
                  "the correction)", options=CHURN_OPTIONS, featured=True, **CHURN_DEFAULTS)
def euler(b, s_churn, s_tmin, s_tmax, s_noise):
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        sigma_hat = churn(b, sig[i], s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise)
        _, eps = b.evaluate("x", sigma_hat)
        b.assign("x", b.xhat("x", sigma_hat) + (sig[i + 1] - sigma_hat) * eps, sig[i + 1])


@register("euler_ancestral", order=1, nfe_per_step=1, stochastic=True, family="euler",
          summary="Euler ancestral: x_hat' = x_hat + (sigma_down - sigma) eps + s_noise sigma_up z "
                  "(k-diffusion sample_euler_ancestral); stochasticity=lambda: the SEEDS "
                  "lambda family (per-step eta with e^{-2 lambda h} = 1 - eta^2 (1 - "
                  "sigma'^2/sigma^2))", options=("eta", "s_noise", "stochasticity"),
          eta=1.0, s_noise=1.0, stochasticity=None, featured=True)
def euler_ancestral(b, eta, s_noise, stochasticity):
    """k-diffusion's ancestral Euler with ``eta``, or ``stochasticity`` = lambda in [0, 1]
    (pyengine.solvers.stochasticity): per-step eta as in :func:`ddim`; the step is then
    DDIM's. With ``stochasticity`` a step draws noise only where lambda > 0 (0 gives exactly
    the plan of ``euler``); with ``eta`` every step draws, as k-diffusion."""
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        e = eta if stochasticity is None else ancestral_eta(sig[i], sig[i + 1], stochasticity)
        down, up = ancestral_step(sig[i], sig[i + 1], e)
        _, eps = b.evaluate("x", sig[i])
        b.assign("x", b.xhat("x", sig[i]) + (down - sig[i]) * eps, sig[i + 1],
                 noise=s_noise * up, noisy=stochasticity is None or e > 0)


@register("heun", order=2, nfe_per_step=2, stochastic=False, family="euler",
          summary="Heun, EDM Algorithm 2 (churn optional); Euler on the step to sigma 0",
          options=CHURN_OPTIONS, featured=True, **CHURN_DEFAULTS)
def heun(b, s_churn, s_tmin, s_tmax, s_noise):
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        sigma_hat = churn(b, sig[i], s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise)
        x_hat = b.xhat("x", sigma_hat)
        _, eps = b.evaluate("x", sigma_hat, dst="e1")
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            b.assign("x", x_hat + dt * eps, sig[i + 1])
            continue
        # predictor (Euler) into its own buffer, then the trapezoidal corrector
        b.assign("x2", x_hat + dt * eps, sig[i + 1], kind="heun_predict")
        _, eps2 = b.evaluate("x2", sig[i + 1], dst="e2")
        b.assign("x", x_hat + (0.5 * dt) * (eps + eps2), sig[i + 1], kind="heun_correct")


@register("dpm_2", order=2, nfe_per_step=2, stochastic=False, family="euler",
          summary="DPM-2: midpoint in log sigma, sigma_mid = sqrt(sigma_hat sigma') (k-diffusion "
                  "sample_dpm_2); Euler on the step to sigma 0",
          options=CHURN_OPTIONS + ("mid_levels",), mid_levels=None, **CHURN_DEFAULTS)
def dpm_2(b, s_churn, s_tmin, s_tmax, s_noise, mid_levels):
    """``mid_levels``: sigma_mid of each step given as a table instead of computed (a
    scheduler's own rounded one: diffusers' KDPM2DiscreteScheduler keeps its
    sigmas_interpol in float32); without churn only."""
    sig = b.sigmas
    mids = _mid_levels(mid_levels, sig, s_churn)
    for i in range(b.n_steps):
        b.step = i
        sigma_hat = churn(b, sig[i], s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise)
        x_hat = b.xhat("x", sigma_hat)
        _, eps = b.evaluate("x", sigma_hat, dst="e1")
        if sig[i + 1] == 0:
            b.assign("x", x_hat + (sig[i + 1] - sigma_hat) * eps, sig[i + 1])
            continue
        sigma_mid = (sigma_hat * sig[i + 1]) ** 0.5 if mids is None else mids[i]
        b.assign("x2", x_hat + (sigma_mid - sigma_hat) * eps, sigma_mid, kind="dpm2_mid")
        _, eps2 = b.evaluate("x2", sigma_mid, dst="e2")
        b.assign("x", x_hat + (sig[i + 1] - sigma_hat) * eps2, sig[i + 1])


def _mid_levels(levels, sig, s_churn: float):
    """``mid_levels`` of dpm_2 checked: None, or one finite number per step within its step
    (sigma' <= mid <= sigma to 1e-6 relative; read only where sigma' > 0)."""
    if levels is None:
        return None
    where = "solver 'dpm_2': mid_levels"
    if s_churn > 0:
        raise ValueError(f"{where} are the levels of steps without churn; got s_churn="
                         f"{s_churn:g}")
    try:
        mids = [float(v) for v in levels]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a sequence of noise levels, got {levels!r}") \
            from None
    n = len(sig) - 1
    if len(mids) != n:
        raise ValueError(f"{where} must hold one level per step ({n}), got {len(mids)}")
    for i, m in enumerate(mids):
        if sig[i + 1] > 0 and not (math.isfinite(m) and sig[i + 1] * (1 - 1e-6) <= m <=
                                   sig[i] * (1 + 1e-6)):
            raise ValueError(f"{where}: step {i} ({sig[i]:g} -> {sig[i + 1]:g}) has mid "
                             f"level {m!r}, outside the step")
    return mids
