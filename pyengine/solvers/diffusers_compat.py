"""Solvers that reproduce the steps of diffusers schedulers no other family covers, written
in the scaled state x_hat = x / s with sigma^2 = (1 - alpha_bar) / alpha_bar:

* ``clip_x0``: any registry solver with its denoised estimate clipped to [-r, r]
  (``clip_sample``) or dynamically thresholded (Saharia et al. 2022, ``thresholding``) after
  every model call -- a data-dependent op (:class:`ProcessX0`, one extra pass), so a custom
  op of the plan;
* ``lcm_boundary``: latent consistency models' multistep sampling (Luo et al. 2023) with
  the consistency boundary condition D' = c_skip(t) x + c_out(t) D (LCMScheduler);
* ``tcd``: trajectory consistency distillation's strategic stochastic sampling (Zheng et
  al. 2024, TCDScheduler): DDIM to the level of timestep floor((1 - gamma) t'), then forward
  noise back up to t';
* ``pndm_plms``: PNDM's pseudo linear multistep (Liu et al. 2022, PNDMScheduler with
  ``skip_prk_steps``): a pseudo-Heun first step, then Adams-Bashforth on the raw model
  outputs, each step DDIM's transfer;
* ``deis``: DEIS multistep (Zhang & Chen 2023, ``logrho`` = DEISMultistepScheduler):
  Lagrange extrapolation of the data prediction in log rho, integrated exactly.
"""

from __future__ import annotations

import math

import numpy as np

from .. import parameterization as param
from ..plan import Custom, Lin
from . import ddim, dpm, euler, ipndm, unipc  # noqa: F401  (bases of clip_x0 registered first)
from .registry import Option, check_options, get, register

__all__ = ["ProcessX0"]


# ---------------------------------------------------------------------------------------
# clip_sample / dynamic thresholding of the denoised estimate
# ---------------------------------------------------------------------------------------


class ProcessX0(Custom):
    """dst = f(sum_k c_k buf_k): the denoised estimate of a model call, clamped to
    [-clip_range, clip_range], or dynamically thresholded: per sample, q = the ``ratio``
    quantile of |x0| over all non-batch elements, clamped to [1, max_value], and
    x0 <- clamp(x0, -q, q) / q (diffusers' ``_threshold_sample``). The numbers depend on the
    data, so this is a custom op; its tensor code is in :mod:`pyengine.solvers.x0_ops`."""

    writes_state = False
    draws = False

    def __init__(self, dst, bufs, coefs, step, sigma, *, clip_range=math.inf,
                 threshold_ratio=None, max_value=1.0):
        self.dst = dst
        self.bufs, self.coefs = list(bufs), np.asarray(coefs, dtype=np.float64)
        self.step, self.sigma = int(step), float(sigma)
        self.clip_range = float(clip_range)
        self.threshold_ratio = None if threshold_ratio is None else float(threshold_ratio)
        self.max_value = float(max_value)
        self.kind = "process_x0"

    def __repr__(self) -> str:
        what = (f"threshold(ratio={self.threshold_ratio:g}, max={self.max_value:g})"
                if self.threshold_ratio is not None else f"clamp(+-{self.clip_range:g})")
        terms = " + ".join(f"{c:.6g}*{b}" for c, b in zip(self.coefs, self.bufs))
        return f"ProcessX0({self.dst} = {what}({terms}) at sigma={self.sigma:.6g})"


class _X0Builder:
    """A PlanBuilder whose ``evaluate`` returns the processed denoised estimate: after the
    model call a :class:`ProcessX0` op writes it into ``<dst>_x0``. The noise estimate is
    the model's own (``eps_from_clipped=False``: DDIM's default) or the one consistent with
    the processed estimate, eps = (x_hat - D') / sigma (diffusers' Heun, DDIM's
    ``use_clipped_model_output``, DPM-Solver's noise-prediction form)."""

    def __init__(self, b, make_op, eps_from_clipped: bool):
        object.__setattr__(self, "_b", b)
        object.__setattr__(self, "_make_op", make_op)
        object.__setattr__(self, "_eps_clipped", bool(eps_from_clipped))

    def __getattr__(self, name):
        return getattr(self._b, name)

    def __setattr__(self, name, value):
        setattr(self._b, name, value)

    def evaluate(self, slot: str, sigma: float, dst: str = "out"):
        b = self._b
        D, eps = b.evaluate(slot, sigma, dst=dst)
        keys = [k for k, v in D.terms.items() if v != 0.0]
        name = dst + "_x0"
        op = self._make_op(name, [k[0] for k in keys], [D.terms[k] for k in keys], b.step,
                           sigma)
        b.custom(op, reads=[k[0] for k in keys], writes=[name])
        Dc = b.ref(name)
        if self._eps_clipped:
            if not sigma > 0:
                raise ValueError("clip_x0: the noise estimate of a clipped x0 needs sigma > 0")
            eps = (b.xhat(slot, sigma) - Dc) / sigma
        return Dc, eps


_X0_SPECS = {
    "clip_sample_range": Option("real", lo=0.0, lo_open=True, allow_inf=True),
    "thresholding": Option("bool"),
    "dynamic_thresholding_ratio": Option("real", lo=0.0, hi=1.0, lo_open=True),
    "sample_max_value": Option("real", lo=1.0, allow_inf=True),
    "eps_from_clipped": Option("bool"),
}


@register("clip_x0", order=1, nfe_per_step=1, stochastic=False, family="x0",
          summary="Any registry solver (base, base_options) with its denoised estimate "
                  "clamped to [-clip_sample_range, clip_sample_range] or dynamically "
                  "thresholded (Saharia et al. 2022) after every model call (diffusers' "
                  "clip_sample / thresholding): one custom op per model call",
          options=tuple(["base", "base_options"] + list(_X0_SPECS)), specs=_X0_SPECS,
          base="ddim", base_options=None, clip_sample_range=1.0, thresholding=False,
          dynamic_thresholding_ratio=0.995, sample_max_value=1.0, eps_from_clipped=False)
def _clip_x0(b, base, base_options, clip_sample_range, thresholding,
             dynamic_thresholding_ratio, sample_max_value, eps_from_clipped):
    if not isinstance(base, str):
        raise ValueError(f"clip_x0: base must be a solver name, got {base!r}")
    info = get(base)
    if info.name == "clip_x0":
        raise ValueError("clip_x0: base must be another solver")
    if base_options is not None and not isinstance(base_options, dict):
        raise ValueError(f"clip_x0: base_options must be a dict of {base}'s options, got "
                         f"{base_options!r}")
    opts = check_options(info, dict(base_options or {}))

    def make(dst, bufs, coefs, step, sigma):
        return ProcessX0(dst, bufs, coefs, step, sigma, clip_range=clip_sample_range,
                         threshold_ratio=dynamic_thresholding_ratio if thresholding else None,
                         max_value=sample_max_value)
    info.build(_X0Builder(b, make, eps_from_clipped), **opts)


# ---------------------------------------------------------------------------------------
# LCM and TCD
# ---------------------------------------------------------------------------------------


@register("lcm_boundary", order=1, nfe_per_step=1, stochastic=True, family="consistency",
          summary="LCM multistep (Luo et al. 2023; diffusers LCMScheduler): D' = c_skip x + "
                  "c_out D with c_skip = sd^2/(tau^2 + sd^2), c_out = tau/sqrt(tau^2 + sd^2), "
                  "tau = timestep_scaling * t; x_hat' = D' + sigma' z, x = D' on the last step",
          options=("timestep_scaling", "sigma_data"), timestep_scaling=10.0, sigma_data=0.5,
          specs={"timestep_scaling": Option("real", lo=0.0),
                 "sigma_data": Option("real", lo=0.0, lo_open=True)})
def lcm_boundary(b, timestep_scaling, sigma_data):
    """The boundary condition reads the model's own time t of each level (the discrete
    timestep for diffusers' LCMs) and the process state x (not x_hat), as LCMScheduler does.
    Every step but the last re-noises the consistency estimate to the next level with fresh
    noise; the last returns it. The grid must end at sigma 0."""
    sig = b.sigmas
    n = b.n_steps
    if sig[-1] != 0:
        raise ValueError(f"lcm_boundary: the grid must end at sigma 0 (the last step returns "
                         f"the consistency estimate), got {sig[-1]!r}")
    sd2 = sigma_data * sigma_data
    for i in range(n):
        b.step = i
        D, _ = b.evaluate("x", sig[i])
        tau = b.time_of(sig[i]) * timestep_scaling
        c_skip = sd2 / (tau * tau + sd2)
        c_out = tau / math.sqrt(tau * tau + sd2)
        Dl = c_out * D + c_skip * b.ref("x")
        if i == n - 1:
            b.assign("x", Dl, sig[i + 1], kind="lcm_final")
        else:
            b.assign("x", Dl, sig[i + 1], noise=sig[i + 1], noisy=True, kind="lcm")


@register("tcd", order=1, nfe_per_step=1, stochastic=True, family="consistency",
          summary="TCD strategic stochastic sampling (Zheng et al. 2024; diffusers "
                  "TCDScheduler): x_hat_s = D + sigma_s eps at the level of timestep "
                  "floor((1 - gamma) t'), then x_hat' = x_hat_s + sqrt(sigma'^2 - sigma_s^2) z; "
                  "gamma = 0 is DDIM",
          options=("gamma",), gamma=0.3, specs={"gamma": Option("real", lo=0.0, hi=1.0)},
          variants=(("tcd[gamma=0]", {"gamma": 0.0}, 1, 1), ("tcd", {}, 1, 1)))
def tcd(b, gamma):
    """Needs a discrete process (the intermediate level is the table's level at an integer
    timestep). The last step (and every step with gamma = 0) ends at x_hat_s: for the last
    step s is the table's timestep 0, so the grid must end at that level (sigma_min), as
    TCDScheduler's does."""
    proc = b.process
    if not hasattr(proc, "num_train_timesteps"):
        raise ValueError(f"tcd needs a discrete VP process (its intermediate level is a table "
                         f"entry), got {proc!r}")
    sig = b.sigmas
    n = b.n_steps
    last_t = b.time_of(sig[n])
    if not math.isclose(sig[n], float(proc.sigma_of_t(0)), rel_tol=1e-6) or last_t != 0:
        raise ValueError(f"tcd: the grid must end at the table's level of timestep 0 "
                         f"(sigma {float(proc.sigma_of_t(0)):.6g}), got {sig[n]!r}")
    for i in range(n):
        b.step = i
        D, eps = b.evaluate("x", sig[i])
        last = i == n - 1
        t_next = 0.0 if last else b.time_of(sig[i + 1])
        t_s = math.floor((1.0 - gamma) * t_next)
        sigma_s = sig[i + 1] if (t_s == t_next or last) else float(proc.sigma_of_t(t_s))
        if gamma > 0 and not last:
            b.assign("x", D + sigma_s * eps, sig[i + 1],
                     noise=math.sqrt(max(sig[i + 1] ** 2 - sigma_s ** 2, 0.0)), noisy=True,
                     kind="tcd")
        else:
            b.assign("x", D + sigma_s * eps, sig[i + 1], kind="tcd_ddim")


# ---------------------------------------------------------------------------------------
# PNDM's PLMS
# ---------------------------------------------------------------------------------------

_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _raw_output(b, slot, sigma, eps):
    """The Lin of the raw model output of the call just made (eps = e_x x + e_o out)."""
    s = b.s(sigma)
    _, (ex, eo) = param.affine(b.prediction, s, s * sigma)
    return (eps - b.ref(slot) * ex) / eo


def _eps_of(b, slot, sigma, raw):
    s = b.s(sigma)
    _, (ex, eo) = param.affine(b.prediction, s, s * sigma)
    return b.ref(slot) * ex + raw * eo


@register("pndm_plms", order=2, nfe_per_step=1, stochastic=False, family="pndm",
          summary="PNDM's PLMS (Liu et al. 2022; diffusers PNDMScheduler skip_prk_steps): "
                  "first step x_hat' = x_hat + (sigma' - sigma)(e_0 + e_1)/2 with e_1 at the "
                  "DDIM-predicted point, then x_hat' = x_hat + (sigma' - sigma) e(sum_j a_j "
                  "out_j), Adams-Bashforth weights over the raw outputs (order <= 4)")
def pndm_plms(b):
    """The Adams-Bashforth combination is taken over the raw model outputs and turned into a
    noise estimate with the current state (for v models that differs from combining noise
    estimates), exactly as PNDMScheduler does; the first step's predictor output is not kept
    in the history. n steps take n + 1 model calls."""
    sig = b.sigmas
    n = b.n_steps
    ring = ["p0", "p1", "p2"]
    hist: list[Lin] = []                      # raw outputs kept, most recent first
    for i in range(n):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        _, eps0 = b.evaluate("x", s, dst="out")
        raw0 = _raw_output(b, "x", s, eps0)
        keep = i < n - 1
        if i == 0:
            if n == 1:
                b.assign("x", x + (t - s) * eps0, t, kind="pndm")
                continue
            # pseudo-Heun: predict with e_0, average the raw outputs, redo the step from x
            b.assign("x2", x + (t - s) * eps0, t, aux=(ring[0], raw0), kind="pndm_predict")
            hist = [b.ref(ring[0])]
            _, eps1 = b.evaluate("x2", t, dst="out")
            raw1 = _raw_output(b, "x2", t, eps1)
            e = _eps_of(b, "x", s, 0.5 * (raw1 + hist[0]))
            b.assign("x", x + (t - s) * e, t, kind="pndm_heun")
            continue
        q = min(len(hist) + 1, 4)
        comb = _AB[q][0] * raw0
        for a, h in zip(_AB[q][1:], hist):
            comb = comb + a * h
        e = _eps_of(b, "x", s, comb)
        slot = ring[i % 3]
        b.assign("x", x + (t - s) * e, t, aux=(slot, raw0) if keep else None, kind="plms")
        if keep:
            hist = [b.ref(slot)] + hist[:2]


from . import x0_ops  # noqa: E402,F401  (the executor's tensor code of ProcessX0)
