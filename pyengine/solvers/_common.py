"""Small pieces several solver families share."""

from __future__ import annotations

import math


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_next^2,
    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)).
    This is also DDIM's eta noise (Song et al. 2021 eq. 16) written in sigma."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    if not 0 < sigma_next <= sigma:
        raise ValueError(f"an ancestral step with eta > 0 goes down in noise: need "
                         f"0 <= sigma_next <= sigma, got sigma={sigma!r}, "
                         f"sigma_next={sigma_next!r}")
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                         / sigma ** 2))
    down = math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0))
    return down, up


def churn_gamma(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM Algorithm 2's gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]."""
    return min(s_churn / n, math.sqrt(2.0) - 1.0) if s_tmin <= sigma <= s_tmax else 0.0


def churn(b, sigma: float, *, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
          slot: str = "x") -> float:
    """EDM Algorithm 2 lines 4-6: raise the noise level from sigma to sigma_hat = sigma (1 + gamma)
    with gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], adding fresh noise of
    std S_noise sqrt(sigma_hat^2 - sigma^2). Emits the noisy update only when gamma > 0."""
    gamma = churn_gamma(sigma, b.n_steps, s_churn, s_tmin, s_tmax)
    if gamma <= 0:
        return sigma
    sigma_hat = sigma * (1.0 + gamma)
    b.assign(slot, b.xhat(slot, sigma), sigma_hat,
             noise=s_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2), kind="churn")
    return sigma_hat


CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
CHURN_DEFAULTS = dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)
