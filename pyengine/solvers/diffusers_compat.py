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
* ``pndm``: PNDM with its pseudo Runge-Kutta warm-up (PNDMScheduler's default): three
  4-call steps, then the same Adams-Bashforth;
* ``deis_logrho``: DEIS multistep (Zhang & Chen 2023, ``logrho`` = DEISMultistepScheduler):
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
    data, so this is a custom op; its tensor code is in :mod:`pyengine.runtime.custom`."""

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
    "base": Option("solver"),
    "clip_sample_range": Option("real", lo=0.0, lo_open=True, allow_inf=True),
    "thresholding": Option("bool"),
    "dynamic_thresholding_ratio": Option("real", lo=0.0, hi=1.0),
    "sample_max_value": Option("real", lo=0.0, lo_open=True, allow_inf=True),
    "eps_from_clipped": Option("bool"),
}


@register("clip_x0", order=1, nfe_per_step=1, stochastic=False, family="x0",
          summary="Any registry solver (base, base_options) with its denoised estimate "
                  "clamped to [-clip_sample_range, clip_sample_range] or dynamically "
                  "thresholded (Saharia et al. 2022) after every model call (diffusers' "
                  "clip_sample / thresholding): one custom op per model call",
          options=tuple(["base_options"] + list(_X0_SPECS)), specs=_X0_SPECS,
          base="ddim", base_options=None, clip_sample_range=math.inf, thresholding=False,
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
          specs={"timestep_scaling": Option("real", lo=0.0, hi=1e6),
                 "sigma_data": Option("real", lo=0.0, lo_open=True)})
def lcm_boundary(b, timestep_scaling, sigma_data):
    """The boundary condition reads the model's own time t of each level (the discrete
    timestep for diffusers' LCMs) and the process state x (not x_hat), as LCMScheduler does.
    Every step but the last re-noises the consistency estimate to the next level with fresh
    noise; the last returns it (times the last level's scale s; LCMScheduler's grid ends at
    sigma 0, where s = 1)."""
    sig = b.sigmas
    n = b.n_steps
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
          options=("gamma",), gamma=0.3, specs={"gamma": Option("real", lo=0.0, hi=1.0)})
def tcd(b, gamma):
    """The intermediate level: on a discrete process (diffusers' LCM/TCD models) the table's
    level at the integer timestep floor((1 - gamma) t'), elsewhere the level of model time
    (1 - gamma) t'. The last step is DDIM to the grid's last level without noise
    (TCDScheduler ends at timestep floor((1 - gamma) 0) = 0, the table's first level: its
    grid ends there)."""
    proc = b.process
    discrete = hasattr(proc, "num_train_timesteps")
    sig = b.sigmas
    n = b.n_steps
    for i in range(n):
        b.step = i
        D, eps = b.evaluate("x", sig[i])
        last = i == n - 1
        t_next = b.time_of(sig[i + 1])
        t_s = (1.0 - gamma) * t_next
        if discrete:
            t_s = math.floor(t_s)
        if last or t_s == t_next or sig[i + 1] == 0:
            sigma_s = sig[i + 1]
        else:
            sigma_s = float(proc.sigma_of_t(t_s) if discrete else
                            proc.sigma_of_model_time(t_s))
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


def _combiners(b, combine: str):
    """(raw_of, eps_of) of PNDM's two ways to combine outputs: ``"eps"`` combines the noise
    estimates themselves; ``"output"`` the raw model outputs, turned into a noise estimate with
    a state (PNDMScheduler's way)."""
    if combine == "eps":
        return (lambda slot, sigma, eps: eps), (lambda slot, sigma, comb: comb)
    return (lambda slot, sigma, eps: _raw_output(b, slot, sigma, eps),
            lambda slot, sigma, comb: _eps_of(b, slot, sigma, comb))


def _plms_step(b, x, s: float, t: float, raw, hist: list, eps_of, slot: str, keep: bool):
    """One PLMS step from ``s`` to ``t``: Adams-Bashforth (order <= 4) over ``raw`` and the
    history (most recent first); ``keep`` puts ``raw`` into ``slot`` as history. Returns the
    history for the next step."""
    q = min(len(hist) + 1, 4)
    comb = _AB[q][0] * raw
    for a, h in zip(_AB[q][1:], hist):
        comb = comb + a * h
    b.assign("x", x + (t - s) * eps_of("x", s, comb), t, aux=(slot, raw) if keep else None,
             kind="plms")
    return [b.ref(slot)] + hist[:2] if keep else hist


@register("pndm_plms", order=2, nfe_per_step=1, stochastic=False, family="pndm",
          summary="PNDM's PLMS (Liu et al. 2022; diffusers PNDMScheduler skip_prk_steps): "
                  "first step x_hat' = x_hat + (sigma' - sigma)(e_0 + e_1)/2 with e_1 at the "
                  "DDIM-predicted point, then x_hat' = x_hat + (sigma' - sigma) e(sum_j a_j "
                  "out_j), Adams-Bashforth weights (order <= 4) over the noise estimates, or "
                  "over the raw outputs (combine='output', diffusers' way)",
          options=("combine",), combine="eps",
          specs={"combine": Option("choice", choices=("eps", "output"))})
def pndm_plms(b, combine):
    """``combine="eps"`` takes the Adams-Bashforth combination over the noise estimates;
    ``combine="output"`` over the raw model outputs, turned into a noise estimate with the
    current state, as PNDMScheduler does (for epsilon models the two agree; for v models they
    differ, and only "eps" gives the same samples whatever the model's prediction kind). The
    first step's predictor output is not kept in the history. n steps take n + 1 model
    calls."""
    raw_of, eps_of = _combiners(b, combine)
    sig = b.sigmas
    n = b.n_steps
    ring = ["p0", "p1", "p2"]
    hist: list[Lin] = []                      # raw outputs kept, most recent first
    for i in range(n):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        _, eps0 = b.evaluate("x", s, dst="out")
        raw0 = raw_of("x", s, eps0)
        keep = i < n - 1
        if i == 0:
            if n == 1:
                b.assign("x", x + (t - s) * eps0, t, kind="pndm")
                continue
            # pseudo-Heun: predict with e_0, average the raw outputs, redo the step from x
            b.assign("x2", x + (t - s) * eps0, t, aux=(ring[0], raw0), kind="pndm_predict")
            hist = [b.ref(ring[0])]
            _, eps1 = b.evaluate("x2", t, dst="out")
            raw1 = raw_of("x2", t, eps1)
            e = eps_of("x", s, 0.5 * (raw1 + hist[0]))
            b.assign("x", x + (t - s) * e, t, kind="pndm_heun")
            continue
        hist = _plms_step(b, x, s, t, raw0, hist, eps_of, ring[i % 3], keep)



def _prk_levels(b, s: float, t: float, midpoint: str):
    """(level of the first midpoint state, level of the second, model time of both midpoint
    calls) of a pseudo Runge-Kutta step from ``s`` to ``t``. ``midpoint="time"``: both at the
    model-time midpoint (t_s + t_t) / 2. ``"integer"`` (PNDMScheduler's integer timesteps,
    d = T - T'): the first state at timestep T - floor(d / 2), the second at T' + floor(d / 2),
    both calls at T' + floor(d / 2) (for odd d the first call's time is one below its state's
    level, as diffusers passes it)."""
    ta, tb = b.time_of(s), b.time_of(t)
    proc = b.process
    if midpoint == "time":
        tm = 0.5 * (ta + tb)
        sm = float(proc.sigma_of_model_time(tm))
        return sm, sm, tm
    if not (math.isfinite(ta) and math.isfinite(tb) and ta == round(ta) and tb == round(tb)):
        raise ValueError(f"pndm: midpoint='integer' needs integer model times at the grid's "
                         f"levels, got {ta!r} and {tb!r}")
    h = (int(round(ta)) - int(round(tb))) // 2

    def level(tt, at_a, at_b):
        if tt == ta:
            return float(at_a)
        if tt == tb:
            return float(at_b)
        return float(proc.sigma_of_model_time(float(tt)))
    return level(ta - h, s, t), level(tb + h, s, t), float(tb + h)


@register("pndm", order=2, nfe_per_step=1, stochastic=False, family="pndm",
          summary="PNDM (Liu et al. 2022; diffusers PNDMScheduler): three pseudo Runge-Kutta "
                  "warm-up steps (4 model calls each: x_hat_m = x_hat + (sigma_m - sigma) e_k "
                  "at the midpoint, then x_hat' = x_hat + (sigma' - sigma)(e_1 + 2 e_2 + 2 e_3 "
                  "+ e_4)/6), then PLMS: x_hat' = x_hat + (sigma' - sigma) e(sum_j a_j out_j), "
                  "Adams-Bashforth order 4 over the outputs at every step's start",
          options=("combine", "midpoint"), combine="eps", midpoint="time",
          specs={"combine": Option("choice", choices=("eps", "output")),
                 "midpoint": Option("choice", choices=("time", "integer"))})
def pndm(b, combine, midpoint):
    """The first min(3, n) steps are pseudo Runge-Kutta (every stage DDIM's transfer from
    the step's start); their first outputs start the Adams-Bashforth history, so the fourth
    step is already of order 4. ``combine`` as in ``pndm_plms`` ("output": the raw outputs
    are combined and turned into a noise estimate with the step's start state, PNDMScheduler's
    way). ``midpoint``: see :func:`_prk_levels`. n steps take n + 9 model calls (n >= 3)."""
    raw_of, eps_of = _combiners(b, combine)
    sig = b.sigmas
    n = b.n_steps
    ring = ["p0", "p1", "p2"]
    hist: list[Lin] = []                      # first outputs of the steps, most recent first
    for i in range(n):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        _, eps1 = b.evaluate("x", s, dst="out")
        raw1 = raw_of("x", s, eps1)
        slot = ring[i % 3]
        if i < 3:
            s_a, s_b, t_m = _prk_levels(b, s, t, midpoint)
            b.assign("y", x + (s_a - s) * eps_of("x", s, raw1), s_a, aux=(slot, raw1),
                     kind="prk_1")
            _, eps2 = b.evaluate("y", s_a, dst="out", t=t_m)
            raw2 = raw_of("y", s_a, eps2)
            b.assign("y", x + (s_b - s) * eps_of("x", s, raw2), s_b, aux=("k2", raw2),
                     kind="prk_2")
            _, eps3 = b.evaluate("y", s_b, dst="out", t=t_m)
            raw3 = raw_of("y", s_b, eps3)
            b.assign("y", x + (t - s) * eps_of("x", s, raw3), t, aux=("k3", raw3),
                     kind="prk_3")
            _, eps4 = b.evaluate("y", t, dst="out")
            raw4 = raw_of("y", t, eps4)
            comb = (b.ref(slot) + 2.0 * b.ref("k2") + 2.0 * b.ref("k3") + raw4) / 6.0
            b.assign("x", x + (t - s) * eps_of("x", s, comb), t, kind="prk")
            hist = [b.ref(slot)] + hist[:2]
            continue
        hist = _plms_step(b, x, s, t, raw1, hist, eps_of, slot, i < n - 1)


# ---------------------------------------------------------------------------------------
# Linear multistep with the Lagrange polynomial integrated on every step
# ---------------------------------------------------------------------------------------


def _lagrange_integrals(nodes, a: float, b_: float) -> list[float]:
    """w_j = integral over [a, b_] of the Lagrange basis polynomial of node j (in sigma): the
    quadrature of ComfyUI's lms (:func:`pyengine.solvers.comfy.lagrange_weights`)."""
    from .comfy import lagrange_weights
    return lagrange_weights(nodes, a, b_)


def _check_prior_levels(levels, first: float) -> list[float]:
    """``prior_levels`` as floats: finite, decreasing, above the grid's first level."""
    if levels is None:
        return []
    try:
        out = [float(v) for v in levels]
    except (TypeError, ValueError):
        raise ValueError(f"prior_levels must be a sequence of noise levels, got "
                         f"{levels!r}") from None
    if any(not math.isfinite(v) for v in out) or \
            any(a <= c for a, c in zip(out, out[1:] + [float(first)])):
        raise ValueError(f"prior_levels must be finite, decreasing and above the grid's first "
                         f"level {first:g}, got {out!r}")
    return out


@register("lms_integrated", order=2, nfe_per_step=1, stochastic=False, family="lms",
          summary="Linear multistep in (x_hat, sigma): x_hat' = x_hat + sum_j w_j eps_{i-j}, w_j "
                  "the integral over [sigma, sigma'] of the Lagrange basis on the last "
                  "min(order, i + 1) levels, the step to 0 included (k-diffusion's sample_lms, "
                  "diffusers LMSDiscreteScheduler)",
          options=("order", "prior_levels"), defaults=dict(order=4, prior_levels=None),
          specs={"order": Option("int", lo=1, hi=4)})
def lms_integrated(b, order, prior_levels):
    """Measured order 2 for order >= 2 (the first-order warm-up step, as ipndm's).
    ``prior_levels``: the levels of a schedule's steps before this grid's first (a run
    started part-way, decreasing to above sigma_0). They stay nodes of the Lagrange basis
    though no output exists there, and the weights of those nodes are dropped: diffusers'
    LMSDiscreteScheduler started at step index k takes order min(k + 1, order) over the
    schedule's levels and pairs the coefficients with the outputs it has."""
    sig = b.sigmas
    n = b.n_steps
    prior = _check_prior_levels(prior_levels, sig[0])
    ring = [f"l{k}" for k in range(max(order - 1, 1))]
    hist: list[tuple[Lin, float]] = []        # (eps Lin, sigma), most recent first
    for i in range(n):
        b.step = i
        _, eps = b.evaluate("x", sig[i])
        q = min(i + 1, order)
        prev = hist[:q - 1]
        nodes = [sig[i]] + [sg for _, sg in prev]
        nodes += prior[::-1][:max(min(i + 1 + len(prior), order) - len(nodes), 0)]
        w = _lagrange_integrals(nodes, sig[i], sig[i + 1])
        lin = b.xhat("x", sig[i]) + w[0] * eps
        for wj, (e, _) in zip(w[1:], prev):
            lin = lin + wj * e
        keep = order > 1 and i < n - 1
        slot = ring[i % len(ring)]
        b.assign("x", lin, sig[i + 1], aux=(slot, eps) if keep else None, kind=f"lms{q}")
        if keep:
            hist = [(b.ref(slot), sig[i])] + hist[:order - 2]


# ---------------------------------------------------------------------------------------
# DEIS (log rho)
# ---------------------------------------------------------------------------------------


def deis_weights(rho_s: float, rho_t: float, rho_hist) -> list[float]:
    """DEIS's coefficients: c_k = integral over [rho_s, rho_t] of L_k(log rho) d rho, L_k the
    Lagrange basis on the nodes log rho_s, log rho_hist[0], ... (the noise estimates' levels,
    current first). With u = log rho the integral of e^u p(u) is e^u (p - p' + p'' - ...),
    evaluated exactly."""
    us = np.log(np.array([rho_s] + list(rho_hist), dtype=np.float64))
    P = np.polynomial.Polynomial
    out = []
    for j in range(us.size):
        p = P([1.0])
        for k in range(us.size):
            if k != j:
                p = p * P([-us[k], 1.0]) / (us[j] - us[k])
        anti, d, sign = P([0.0]), p, 1.0
        while True:
            anti = anti + sign * d
            if d.degree() == 0:
                break
            d, sign = d.deriv(), -sign
        ut, uS = math.log(rho_t), math.log(rho_s)
        out.append(float(rho_t * anti(ut) - rho_s * anti(uS)))
    return out


@register("deis_logrho", order=2, nfe_per_step=1, stochastic=False, family="deis",
          summary="DEIS multistep, log-rho (Zhang & Chen 2023; diffusers "
                  "DEISMultistepScheduler): x_hat' = x_hat + sum_k c_k eps_k, c_k the integral "
                  "over [sigma, sigma'] of the Lagrange basis in log sigma on the last "
                  "min(order, i + 1) levels; x_hat' = D on a step to 0",
          options=("order", "lower_order_final", "order_list"),
          defaults=dict(order=3, lower_order_final=True, order_list=None),
          specs={"order": Option("int", lo=1, hi=3)},
          variants=(("deis_logrho[order=1]", {"order": 1}, 1, 1),
                    ("deis_logrho[order=2]", {"order": 2}, 2, 1),
                    ("deis_logrho[order=3]", {"order": 3}, 2, 1)))
def deis_logrho(b, order, lower_order_final, order_list):
    """``lower_order_final``: the last step first order and the one before at most second
    (diffusers applies its flag only below 15 steps: pass ``cfg.lower_order_final and
    steps < 15``). ``order_list`` gives every step's order instead (lowered where the history
    is shorter). Order 3 measures 2 (its first-order warm-up step)."""
    sig = b.sigmas
    n = b.n_steps
    if order_list is not None:
        try:
            order_list = [int(o) for o in order_list]
        except (TypeError, ValueError):
            raise ValueError(f"deis_logrho: order_list must be a sequence of orders, got "
                             f"{order_list!r}") from None
        if len(order_list) != n or any(o not in (1, 2, 3) for o in order_list):
            raise ValueError(f"deis_logrho: order_list needs {n} orders in 1..3, got "
                             f"{order_list!r}")
        order = max(order_list)
    ring = ["q0", "q1"]
    hist: list[tuple[Lin, float]] = []        # (eps Lin, sigma), most recent first
    for i in range(n):
        b.step = i
        s, t = sig[i], sig[i + 1]
        D, eps = b.evaluate("x", s)
        keep = order > 1 and i < n - 1
        slot = ring[i % 2]
        aux = (slot, eps) if keep else None
        if t == 0:
            b.assign("x", D, t, aux=aux, kind="deis_final")
        else:
            q = min(order, i + 1)
            if order_list is not None:
                q = min(order_list[i], i + 1)
            elif lower_order_final and i == n - 1:
                q = 1
            elif lower_order_final and i == n - 2:
                q = min(q, 2)
            prev = hist[:q - 1]
            w = deis_weights(s, t, [sg for _, sg in prev])
            lin = b.xhat("x", s) + w[0] * eps
            for wj, (e, _) in zip(w[1:], prev):
                lin = lin + wj * e
            b.assign("x", lin, t, aux=aux, kind=f"deis{q}")
        if keep:
            hist = [(b.ref(slot), s)] + hist[:1]


