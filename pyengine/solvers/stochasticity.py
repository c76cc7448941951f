"""The lambda family of SEEDS (Gonzalez et al. 2023, "SEEDS: Exponential SDE Solvers for
Fast High-Quality Sampling from Diffusion Models"): lambda = 0 the PF-ODE, 1 the reverse SDE.
Its first-order step in x_hat = x / s, h = log(sigma / sigma'):

    x_hat' = e^{-(1+lambda)h} x_hat + (1 - e^{-(1+lambda)h}) D + sigma' sqrt(1 - e^{-2 lambda h}) z

SDE-DPM-Solver++'s eta is lambda; DDIM's / ancestral eta gives the same step where
e^{-2 lambda h} = 1 - eta^2 (1 - sigma'^2/sigma^2). The registry option ``stochasticity``
(derivation, solvers and tests: docs/solvers.md).
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
