"""Euler-family solvers of the probability-flow ODE d x_hat / d sigma = eps(x_hat, sigma)
(Karras et al. 2022), with EDM churn and the ancestral SDE variant."""

from __future__ import annotations

from ._common import CHURN_DEFAULTS, CHURN_OPTIONS, ancestral_step, churn
from .registry import register


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
                  "(k-diffusion sample_euler_ancestral)", options=("eta", "s_noise"),
          eta=1.0, s_noise=1.0, featured=True)
def euler_ancestral(b, eta, s_noise):
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        _, eps = b.evaluate("x", sig[i])
        b.assign("x", b.xhat("x", sig[i]) + (down - sig[i]) * eps, sig[i + 1],
                 noise=s_noise * up, noisy=True)


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
          options=CHURN_OPTIONS, **CHURN_DEFAULTS)
def dpm_2(b, s_churn, s_tmin, s_tmax, s_noise):
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        sigma_hat = churn(b, sig[i], s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                          s_noise=s_noise)
        x_hat = b.xhat("x", sigma_hat)
        _, eps = b.evaluate("x", sigma_hat, dst="e1")
        if sig[i + 1] == 0:
            b.assign("x", x_hat + (sig[i + 1] - sigma_hat) * eps, sig[i + 1])
            continue
        sigma_mid = (sigma_hat * sig[i + 1]) ** 0.5
        b.assign("x2", x_hat + (sigma_mid - sigma_hat) * eps, sigma_mid, kind="dpm2_mid")
        _, eps2 = b.evaluate("x2", sigma_mid, dst="e2")
        b.assign("x", x_hat + (sig[i + 1] - sigma_hat) * eps2, sig[i + 1])
