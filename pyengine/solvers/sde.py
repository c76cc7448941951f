"""Reverse-SDE samplers of score_sde (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations") in x_hat = x / s: ``euler_maruyama`` (App. E)
and ``pc_langevin`` (Alg. 4/5). Derivations and caveats: docs/solvers.md.
"""

from __future__ import annotations

import math

from ..plan import Custom
from .registry import register


def reverse_diffusion_step(b, i: int, slot: str = "x") -> None:
    """One Euler-Maruyama step of the reverse SDE from sig[i] to sig[i + 1] (mean at sigma 0)."""
    sig = b.sigmas
    s, sn = sig[i], sig[i + 1]
    D, _ = b.evaluate(slot, s, dst="out")
    x_hat = b.xhat(slot, s)
    if sn == 0:
        b.assign(slot, D, sn, kind="em_mean")
        return
    var = s * s - sn * sn
    b.assign(slot, x_hat + (var / (s * s)) * (D - x_hat), sn, noise=math.sqrt(var), noisy=True,
             kind="em")


@register("euler_maruyama", order=1, nfe_per_step=1, stochastic=True, family="sde",
          summary="Euler-Maruyama: x_hat' = x_hat + (sigma^2 - sigma'^2)/sigma^2 (D - x_hat) + "
                  "sqrt(sigma^2 - sigma'^2) z, the mean D on the step to sigma 0 (reverse "
                  "diffusion, Song 2021 App. E)")
def euler_maruyama(b):
    """x_hat' = x_hat + (sigma^2 - sigma'^2)/sigma^2 (D - x_hat) + sqrt(sigma^2 - sigma'^2) z,
    D on the step to sigma 0 (Song 2021 App. E, ReverseDiffusionPredictor). Weak order 1."""
    for i in range(b.n_steps):
        b.step = i
        reverse_diffusion_step(b, i)


class LangevinCorrector(Custom):
    """x <- x + eps_b score + sqrt(2 eps_b) z, score = sum_k c_k buf_k, eps_b = 2 alpha
    (snr ||z_b|| / ||score_b||)^2 per sample b (Song 2021 Alg. 5): a custom op, as eps_b
    depends on the data; tensor code in :mod:`pyengine.runtime.custom`."""

    writes_state = True
    draws = True

    def __init__(self, slot, bufs, coefs, noise_index, snr, alpha, step, sigma):
        self.slot = slot
        self.score_bufs, self.score_coefs = list(bufs), [float(c) for c in coefs]
        self.noise_index, self.snr, self.alpha = int(noise_index), float(snr), float(alpha)
        self.step, self.sigma = int(step), float(sigma)
        self.kind = "langevin"

    def __repr__(self) -> str:
        return (f"LangevinCorrector({self.slot} at sigma={self.sigma:.6g}, snr={self.snr}, "
                f"z[{self.noise_index}])")


@register("pc_langevin", order=1, nfe_per_step=2, stochastic=True, family="sde",
          summary="PC sampler: n_corrector Langevin steps x <- x + eps score + sqrt(2 eps) z, "
                  "eps = 2 (snr ||z||/||score||)^2 per sample (alpha = 1), then the "
                  "Euler-Maruyama predictor (score_sde, Song 2021 Alg. 4/5)",
          options=("snr", "n_corrector"), snr=0.16, n_corrector=1)
def pc_langevin(b, snr, n_corrector):
    """Per level: ``n_corrector`` times x <- x + eps score + sqrt(2 eps) z, eps =
    2 (snr ||z|| / ||score||)^2 per sample, score = -eps_hat/(s sigma); then the
    :func:`euler_maruyama` step (Song 2021 Alg. 4/5, alpha = 1). Meant for image-sized
    states: in low dimension the step size fluctuates (docs/solvers.md)."""
    if isinstance(n_corrector, bool) or int(n_corrector) != n_corrector or n_corrector < 0:
        raise ValueError(f"n_corrector must be a non-negative integer, got {n_corrector!r}")
    if not snr > 0:
        raise ValueError(f"snr must be positive, got {snr!r}")
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s = b.s(sig[i])
        for _ in range(int(n_corrector)):
            # score w.r.t. the process-space state: grad_x log p = -eps / (s sigma)
            _, eps = b.evaluate("x", sig[i], dst="out")
            score = eps * (-1.0 / (s * sig[i]))
            for key in score.terms:
                if b.ref(key[0]).terms.keys() != {key}:
                    raise RuntimeError(f"plan bug: stale buffer {key} in the Langevin score")
            keys = [k for k, v in score.terms.items() if v != 0.0]
            op = LangevinCorrector("x", [k[0] for k in keys], [score.terms[k] for k in keys],
                                   b.next_noise_index(), snr, 1.0, i, sig[i])
            b.custom(op, reads=[k[0] for k in keys], writes=["x"])
        reverse_diffusion_step(b, i)
