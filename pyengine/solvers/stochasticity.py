"""The one stochasticity knob of pyengine's own samplers: the lambda family of SEEDS
(Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for Fast High-Quality Sampling from
Diffusion Models"), which interpolates between the probability-flow ODE (lambda = 0) and the
reverse SDE (lambda = 1).

In the half-log-SNR l = -log sigma of the scaled state x_hat = x / s, a step from sigma to
sigma' has h = l' - l = log(sigma / sigma') and its first-order exponential-integrator form is

    x_hat' = (sigma'/sigma) e^{-lambda h} x_hat + (1 - (sigma'/sigma) e^{-lambda h}) D
             + sigma' sqrt(1 - e^{-2 lambda h}) z,

with (sigma'/sigma) e^{-lambda h} = e^{-(1 + lambda) h}. The noise std sigma' sqrt(1 - e^{-2
lambda h}) together with the shrunk x_hat - D keeps the noise part's variance at sigma'^2 for
every lambda (the marginals are those of the PF-ODE). SDE-DPM-Solver++(2M)'s ``eta`` is this
lambda; the ancestral ``eta`` of DDIM / Euler-ancestral is the same first-order step with
std = eta sigma' sqrt(1 - sigma'^2/sigma^2), so

    e^{-2 lambda h} = 1 - eta^2 (1 - sigma'^2 / sigma^2)      (eta^2 -> lambda as h -> 0)

and eta = 1 is lambda = 1 on every step, eta = 0 is lambda = 0. The registry option is
``stochasticity`` (lambda in [0, 1]; None: the solver's own ``eta``); docs/solvers.md.
"""

from __future__ import annotations

import math

__all__ = ["ancestral_eta", "noise_fraction"]


def noise_fraction(sigma: float, sigma_next: float, lam: float) -> float:
    """sqrt(1 - e^{-2 lam h}), h = log(sigma / sigma_next): the lambda-family noise std over
    sigma_next (1 on a step to sigma 0 with lam > 0; 0 with lam = 0)."""
    if lam == 0 or sigma_next == sigma:
        return 0.0
    if sigma_next == 0:
        return 1.0
    h = math.log(sigma / sigma_next)
    return math.sqrt(-math.expm1(-2.0 * lam * h))


def ancestral_eta(sigma: float, sigma_next: float, lam: float) -> float:
    """The DDIM / ancestral eta of one step that gives the lambda-family step:
    eta^2 = (1 - e^{-2 lam h}) / (1 - e^{-2 h}); sqrt(lam) at h = 0 (its limit), 1 on a step
    to sigma 0 with lam > 0 (no noise is drawn there either way), 0 with lam = 0."""
    if lam == 0:
        return 0.0
    if sigma_next == 0:
        return 1.0
    if sigma_next == sigma:
        return math.sqrt(lam)
    h = math.log(sigma / sigma_next)
    return math.sqrt(math.expm1(-2.0 * lam * h) / math.expm1(-2.0 * h))
