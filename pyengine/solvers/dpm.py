"""DPM-Solver (Lu et al. 2022a, arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022b,
arXiv:2211.01095) in x_hat = x / s, h = log(sigma_s / sigma_t):

    noise prediction (DPM-Solver-1 = DDIM):  x_hat_t = x_hat_s - sigma_t (e^h - 1) eps
    data prediction (DPM-Solver++(1)):       x_hat_t = e^-h x_hat_s + (1 - e^-h) D

plus phi-weighted differences of earlier outputs at higher order; the step to sigma 0 is
x_hat = D. Derivation, history slots and measured orders: docs/solvers.md.
"""

from __future__ import annotations

import math

from .registry import Option, register
from .stochasticity import noise_fraction

__all__ = ["diffusers_order_list"]


def _lam(sigma: float) -> float:
    return -math.log(sigma)


def _phi1(h: float) -> float:
    """1 - e^-h: weight of D in the data-prediction first-order update."""
    return -math.expm1(-h)


def _phi2(h: float) -> float:
    """(e^-h - 1)/h + 1 = (h - 1 + e^-h)/h: weight of h D' in the data-prediction update."""
    return math.expm1(-h) / h + 1.0


def _phi3(h: float) -> float:
    """(e^-h - 1 + h)/h^2 - 1/2: minus the weight of h^2 D'' in the data-prediction update."""
    return (math.expm1(-h) + h) / (h * h) - 0.5


#: diffusers' algorithm_type values the diffusers-semantics solvers take: the data (++) or
#: noise prediction form, ODE or SDE.
_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------
# DPM-Solver-1/2/3, singlestep, noise prediction (Lu 2022a)
# ---------------------------------------------------------------------------------------


def _dpm_solver_singlestep(b, order: int) -> None:
    """Lu 2022a Algorithms 1 (order 2, r1 = 1/2) and 2 (order 3, r1 = 1/3, r2 = 2/3), with the
    intermediate levels placed at lambda_s + r h."""
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D0, eps0 = b.evaluate("x", s, dst="e0")
        if t == 0:
            # lambda_t = inf: only the first-order update is defined, and it gives D.
            b.assign("x", D0, t)
            continue
        h = _lam(t) - _lam(s)
        if order == 1:
            b.assign("x", x - t * math.expm1(h) * eps0, t)
            continue
        if order == 2:
            r1 = 0.5
            s1 = s * math.exp(-r1 * h)
            b.assign("u1", x - s1 * math.expm1(r1 * h) * eps0, s1, kind="dpm2_mid")
            _, eps1 = b.evaluate("u1", s1, dst="e1")
            b.assign("x", x - t * math.expm1(h) * eps0
                     - (t / (2.0 * r1)) * math.expm1(h) * (eps1 - eps0), t)
            continue
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        s1, s2 = s * math.exp(-r1 * h), s * math.exp(-r2 * h)
        b.assign("u1", x - s1 * math.expm1(r1 * h) * eps0, s1, kind="dpm3_u1")
        _, eps1 = b.evaluate("u1", s1, dst="e1")
        d1 = eps1 - eps0
        b.assign("u2", x - s2 * math.expm1(r2 * h) * eps0
                 - (s2 * r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0) * d1, s2,
                 kind="dpm3_u2")
        _, eps2 = b.evaluate("u2", s2, dst="e2")
        d2 = eps2 - eps0
        b.assign("x", x - t * math.expm1(h) * eps0
                 - (t / r2) * (math.expm1(h) / h - 1.0) * d2, t)


@register("dpm_solver_1", order=1, nfe_per_step=1, stochastic=False, family="dpm",
          summary="DPM-Solver-1: x_hat' = x_hat - sigma' (e^h - 1) eps (Lu 2022 DPM-Solver eq. "
                  "3.7; DDIM in lambda); stochasticity=lambda: x_hat' = x_hat - sigma' (e^h - "
                  "e^{-lambda h}) eps + sigma' sqrt(1 - e^{-2 lambda h}) z (the SEEDS lambda "
                  "family, first order)", options=("stochasticity",), stochasticity=None)
def dpm_solver_1(b, stochasticity):
    """DPM-Solver-1; ``stochasticity`` = lambda in (0, 1] makes it the first-order step of the
    SEEDS lambda family in noise prediction (pyengine.solvers.stochasticity),
    x_hat' = x_hat - sigma' (e^h - e^{-lambda h}) eps + sigma' sqrt(1 - e^{-2 lambda h}) z,
    x_hat' = D on the step to sigma 0; None or 0 is DPM-Solver-1 itself."""
    if not stochasticity:
        _dpm_solver_singlestep(b, 1)
        return
    lam = float(stochasticity)
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D0, eps0 = b.evaluate("x", s, dst="e0")
        if t == 0:
            b.assign("x", D0, t)
            continue
        h = _lam(t) - _lam(s)
        b.assign("x", x - t * (math.exp(h) - math.exp(-lam * h)) * eps0, t,
                 noise=t * noise_fraction(s, t, lam), noisy=True, kind="seeds1")


@register("dpm_solver_2", order=2, nfe_per_step=2, stochastic=False, family="dpm",
          summary="DPM-Solver-2: u = x_hat - sigma_u (e^{h/2} - 1) eps, x_hat' = x_hat - "
                  "sigma' (e^h - 1) eps(u) (Lu 2022 DPM-Solver Alg. 1, r1 = 1/2); first order "
                  "on the step to sigma 0")
def dpm_solver_2(b):
    _dpm_solver_singlestep(b, 2)


@register("dpm_solver_3", order=3, nfe_per_step=3, stochastic=False, family="dpm",
          summary="DPM-Solver-3: x_hat' = x_hat - sigma' (e^h - 1) eps - (sigma'/r2) "
                  "((e^h - 1)/h - 1)(eps(u2) - eps) (Lu 2022 DPM-Solver Alg. 2, r1 = 1/3, "
                  "r2 = 2/3); first order on the step to sigma 0")
def dpm_solver_3(b):
    _dpm_solver_singlestep(b, 3)


# ---------------------------------------------------------------------------------------
# DPM-Solver++(2S), singlestep, data prediction (Lu 2022b)
# ---------------------------------------------------------------------------------------


@register("dpmpp_2s", order=2, nfe_per_step=2, stochastic=False, family="dpm",
          summary="DPM-Solver++(2S): u = e^{-h/2} x_hat + (1 - e^{-h/2}) D, x_hat' = e^-h x_hat "
                  "+ (1 - e^-h) D(u) (Lu 2022 DPM-Solver++ Alg. 1, r = 1/2); x_hat' = D on the "
                  "step to sigma 0")
def dpmpp_2s(b):
    sig = b.sigmas
    r = 0.5
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D0, _ = b.evaluate("x", s, dst="e0")
        if t == 0:
            b.assign("x", D0, t)
            continue
        h = _lam(t) - _lam(s)
        s1 = s * math.exp(-r * h)
        b.assign("u1", math.exp(-r * h) * x + _phi1(r * h) * D0, s1, kind="dpmpp2s_mid")
        D1, _ = b.evaluate("u1", s1, dst="e1")
        Dmix = (1.0 - 1.0 / (2.0 * r)) * D0 + (1.0 / (2.0 * r)) * D1
        b.assign("x", math.exp(-h) * x + _phi1(h) * Dmix, t)


# ---------------------------------------------------------------------------------------
# Multistep: DPM-Solver++ 2M, 3M, 3M corrected, SDE-2M (Lu 2022b); diffusers' multistep
# ---------------------------------------------------------------------------------------


def _multistep(b, *, max_order: int, solver_type: str, lower_order_final: bool,
               algorithm: str = "dpmsolver++", d2_weight: float = 1.0, eta: float = 0.0,
               s_noise: float = 1.0, noisy: bool = False, warmup_2s: bool = False) -> None:
    """Multistep DPM-Solver(++) (Lu 2022b Alg. 2 and its 3M form), he = (1 + eta) h:

        x_hat' = e^-he x_hat + (1 - e^-he) m0 + w D1_0 [k=2] + phi2 D1 - phi3 D2 [k=3]
                 + s_noise sigma_t sqrt(1 - e^{-2 eta h}) z          (dpmsolver++, m = D)
        x_hat' = x_hat - sigma_t (e^h - 1) m0 - ...                   (dpmsolver, m = eps)

    D1_0, D1, D2 are the divided differences of the history (docs/solvers.md), D2 scaled by
    ``d2_weight``. Order k = min(max_order, steps so far + 1), lowered at the end by
    ``lower_order_final``; ``warmup_2s`` makes the first step DPM-Solver++(2S)."""
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    _check_choice("algorithm", algorithm, _ALGORITHMS)
    pp = algorithm in ("dpmsolver++", "sde-dpmsolver++")
    if algorithm == "sde-dpmsolver++":
        eta, s_noise, noisy = 1.0, 1.0, True
    sde_eps = algorithm == "sde-dpmsolver"
    if sde_eps:
        noisy = True
        if max_order > 2:
            raise ValueError("algorithm='sde-dpmsolver' has no third-order update (diffusers' "
                             "DPMSolverMultistepScheduler has none either): use order 1 or 2")
    sig = b.sigmas
    n = b.n_steps
    hist: list[tuple[str, float]] = []   # (slot holding m, lambda), newest last
    for i in range(n):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D0, eps0 = b.evaluate("x", s)
        if t == 0:
            if sde_eps:
                # the limit t -> 0 of the first-order step below (diffusers: nan there)
                b.assign("x", x - 2.0 * s * eps0, t, noise=s, noisy=True)
            else:
                b.assign("x", D0, t, noisy=noisy)
            continue
        lam_s = _lam(s)
        h = _lam(t) - lam_s
        k = min(max_order, len(hist) + 1)
        if lower_order_final and i == n - 1:
            k = 1
        elif lower_order_final and i == n - 2:
            k = min(k, 2)
        m0 = D0 if pp else eps0
        keep = ("d" + str(i % 3), m0) if i < n - 1 else None
        if warmup_2s and k == 1 and i == 0:
            s1 = s * math.exp(-0.5 * h)
            b.assign("u1", math.exp(-0.5 * h) * x + _phi1(0.5 * h) * m0, s1, aux=keep,
                     kind="multistep_warmup_2s")
            D_mid, _ = b.evaluate("u1", s1, dst="e1")
            b.assign("x", math.exp(-h) * x + _phi1(h) * D_mid, t, kind="multistep_warmup_2s")
            if keep is not None:
                hist.append((keep[0], lam_s))
            continue
        if k >= 2:
            d_1, lam_1 = hist[-1]
            r0 = (lam_s - lam_1) / h
            D1_0 = (m0 - b.ref(d_1)) / r0
        if k == 3:
            d_2, lam_2 = hist[-2]
            r1 = (lam_1 - lam_2) / h
            D1_1 = (b.ref(d_1) - b.ref(d_2)) / r1
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (d2_weight / (r0 + r1)) * (D1_0 - D1_1)
        if pp:
            he = (1.0 + eta) * h
            xt = math.exp(-he) * x + _phi1(he) * m0
            if k == 2:
                xt = xt + (0.5 * _phi1(he) if solver_type == "midpoint" else _phi2(he)) * D1_0
            elif k == 3 and algorithm == "sde-dpmsolver++":
                # diffusers' third-order SDE weights (its D2 weight is not -phi3(2h))
                xt = xt + _phi2(he) * D1 + ((-math.expm1(-he) - he) / (he * he) - 0.5) * D2
            elif k == 3:
                xt = xt + _phi2(h) * D1 - _phi3(h) * D2
        elif sde_eps:
            # noise prediction with noise: twice the ODE's drift, sqrt(sigma^2 - sigma'^2) z
            e1 = math.expm1(h)
            xt = x - (2.0 * t * e1) * m0
            if k == 2:
                xt = xt - (t * (e1 if solver_type == "midpoint" else 2.0 * (e1 / h - 1.0))) * D1_0
        else:
            e1 = math.expm1(h)
            xt = x - (t * e1) * m0
            if k == 2:
                xt = xt - (t * (0.5 * e1 if solver_type == "midpoint" else e1 / h - 1.0)) * D1_0
            elif k == 3:
                xt = xt - (t * (e1 / h - 1.0)) * D1 - (t * ((e1 - h) / (h * h) - 0.5)) * D2
        std = s_noise * t * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta > 0 else 0.0
        if sde_eps:
            std = t * math.sqrt(math.expm1(2.0 * h))
        b.assign("x", xt, t, noise=std, noisy=noisy, aux=keep, kind=f"multistep_order{k}")
        if keep is not None:
            hist.append((keep[0], lam_s))


@register("dpmpp_2m", order=2, nfe_per_step=1, stochastic=False, family="dpm",
          summary="DPM-Solver++(2M): x_hat' = e^-h x_hat + (1 - e^-h)(D0 + (D0 - D_-1)/(2 r)), "
                  "r = h_-1/h (Lu 2022 DPM-Solver++ Alg. 2; solver_type='heun' weights "
                  "(D0 - D_-1)/r by (e^-h - 1)/h + 1); first step first order, x_hat' = D0 on "
                  "the step to sigma 0",
          options=("solver_type", "lower_order_final"), solver_type="midpoint",
          lower_order_final=True, featured=True,
          variants=(("dpmpp_2m", {}, 2, 1),
                    ("dpmpp_2m[heun]", {"solver_type": "heun"}, 2, 1)))
def dpmpp_2m(b, solver_type, lower_order_final):
    """DPM-Solver++(2M), Lu 2022b Alg. 2. ``lower_order_final``: last step first order
    (diffusers: pass ``cfg.lower_order_final and steps < 15``; k-diffusion: False)."""
    _multistep(b, max_order=2, solver_type=solver_type, lower_order_final=lower_order_final)


_3M_SUMMARY = ("x_hat' = e^-h x_hat + (1 - e^-h) D0 + phi2 D1 - {w}phi3 D2 with "
               "D1_0 = (D0 - D_-1)/r0, D1_1 = (D_-1 - D_-2)/r1, D1 = D1_0 + r0/(r0+r1)(D1_0 - "
               "D1_1), D2 = (D1_0 - D1_1)/(r0+r1), phi2 = (e^-h - 1)/h + 1, phi3 = phi2/h - 1/2")


@register("dpmpp_3m", order=2, nfe_per_step=1, stochastic=False, family="dpm",
          summary="DPM-Solver++(3M) as published: " + _3M_SUMMARY.format(w="")
          + " (Lu 2022 DPM-Solver++; k-diffusion sample_dpmpp_3m_sde eta=0, diffusers "
          "dpmsolver++ order 3). D2 ~ h^2 D''/2 has half the Taylor weight: order 2",
          options=("solver_type", "lower_order_final"), solver_type="midpoint",
          lower_order_final=True)
def dpmpp_3m(b, solver_type, lower_order_final):
    """DPM-Solver++(3M) as shipped (Lu 2022b; k-diffusion, diffusers). ``solver_type`` picks
    the second (warm-up) step: diffusers "midpoint", k-diffusion "heun"; ``lower_order_final``:
    last step order 1, the one before at most 2. D2 has half its Taylor weight: order 2
    (docs/solvers.md)."""
    _multistep(b, max_order=3, solver_type=solver_type, lower_order_final=lower_order_final)


@register("dpmpp_3m_corrected", order=3, nfe_per_step=1, stochastic=False, family="dpm",
          summary="DPM-Solver++(3M) with the Taylor-consistent second difference: "
          + _3M_SUMMARY.format(w="2 ") + " (Lu 2022 DPM-Solver++ 3M with D2 doubled); first "
          "step DPM-Solver++(2S), so n steps take n + 1 model calls",
          options=("solver_type", "lower_order_final"), solver_type="midpoint",
          lower_order_final=False)
def dpmpp_3m_corrected(b, solver_type, lower_order_final):
    """DPM-Solver++(3M) with D2 weighted 2 phi3 (the Taylor weight). The first step is
    DPM-Solver++(2S), so n steps take n + 1 model calls; keep ``lower_order_final`` False
    to keep order 3 (docs/solvers.md)."""
    _multistep(b, max_order=3, solver_type=solver_type, lower_order_final=lower_order_final,
               d2_weight=2.0, warmup_2s=True)


@register("dpmpp_2m_sde", order=1, nfe_per_step=1, stochastic=True, family="dpm",
          summary="SDE-DPM-Solver++(2M): x_hat' = e^{-(1+eta)h} x_hat + (1 - e^{-(1+eta)h})(D0 "
                  "+ D1/2) + s_noise sigma' sqrt(1 - e^{-2 eta h}) z, D1 = (D0 - D_-1)/r (Lu "
                  "2022 DPM-Solver++ SDE 2M; k-diffusion sample_dpmpp_2m_sde, diffusers "
                  "sde-dpmsolver++); eta=0 is dpmpp_2m",
          options=("eta", "s_noise", "solver_type", "lower_order_final", "stochasticity"),
          eta=1.0, s_noise=1.0, solver_type="midpoint", lower_order_final=True,
          stochasticity=None,
          variants=(("dpmpp_2m_sde[eta=0]", {"eta": 0.0}, 2, 1),))
def dpmpp_2m_sde(b, eta, s_noise, solver_type, lower_order_final, stochasticity):
    """SDE-DPM-Solver++(2M) (Lu 2022b). With eta > 0 every step draws noise, the step to
    sigma 0 too (as diffusers); eta = 0 gives exactly the plan of dpmpp_2m. Its eta is the
    SEEDS lambda: ``stochasticity`` (lambda in [0, 1], pyengine.solvers.stochasticity), when
    given, is used as eta."""
    if stochasticity is not None:
        eta = stochasticity
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    _multistep(b, max_order=2, solver_type=solver_type, lower_order_final=lower_order_final,
               eta=float(eta), s_noise=float(s_noise), noisy=eta > 0)


@register("dpm_multistep", order=2, nfe_per_step=1, stochastic=False, family="dpm",
          summary="diffusers DPMSolverMultistepScheduler: dpmsolver++ is "
                  "x_hat' = e^-h x_hat + (1 - e^-h) D0 + ..., dpmsolver (noise prediction) "
                  "x_hat' = x_hat - sigma' (e^h - 1) eps0 - ... with the 2M/3M differences "
                  "(Lu 2022 DPM-Solver multistep / DPM-Solver++); the SDE forms "
                  "sde-dpmsolver++ (h -> 2h, + sigma' sqrt(1 - e^-2h) z) and sde-dpmsolver "
                  "(twice the drift, + sigma' sqrt(e^2h - 1) z)",
          options=("order", "algorithm", "solver_type", "lower_order_final"),
          defaults=dict(order=2, algorithm="dpmsolver++", solver_type="midpoint",
                        lower_order_final=True),
          specs={"algorithm": Option("choice", choices=_ALGORITHMS)},
          variants=(("dpm_multistep[order=1]", {"order": 1}, 1, 1),
                    ("dpm_multistep[order=2]", {"order": 2}, 2, 1),
                    ("dpm_multistep[order=3]", {"order": 3}, 2, 1)))
def dpm_multistep(b, order, algorithm, solver_type, lower_order_final):
    """diffusers' DPMSolverMultistepScheduler: ``algorithm`` "dpmsolver++" (= dpmpp_2m /
    dpmpp_3m), "dpmsolver" (noise prediction), or their SDE forms "sde-dpmsolver++" (=
    dpmpp_2m_sde at order 2; order 3 with diffusers' weights) and "sde-dpmsolver" (orders
    1-2: x_hat' = x_hat - 2 sigma' (e^h - 1) eps0 - ... + sqrt(sigma^2 - sigma'^2) z). Order 3
    measures 2, as dpmpp_3m."""
    _check_choice("algorithm", algorithm, _ALGORITHMS)
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    _multistep(b, max_order=int(order), solver_type=solver_type,
               lower_order_final=lower_order_final, algorithm=algorithm)


# ---------------------------------------------------------------------------------------
# diffusers' DPMSolverSinglestepScheduler semantics
# ---------------------------------------------------------------------------------------


def diffusers_order_list(steps: int, order: int, lower_order_final: bool,
                         final_zero: bool) -> list[int]:
    """The per-step orders DPMSolverSinglestepScheduler uses for ``steps`` steps: blocks
    1, 2, ..., order, with a lower-order tail under ``lower_order_final`` (forced on, as in the
    scheduler, when ``steps % order`` or ``final_zero``); a final step to sigma 0 is order 1."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps % order != 0 or final_zero:
        lower_order_final = True
    block = list(range(1, order + 1))
    q, rem = divmod(steps, order)
    if not lower_order_final or order == 1:
        orders = block * q
    elif order == 2:
        orders = block * (q - 1) + [1, 1] if rem == 0 else block * q + [1]
    elif rem == 0:
        orders = block * (q - 1) + [1, 2] + [1]
    else:
        orders = block * q + list(range(1, rem + 1))
    if final_zero:
        orders[-1] = 1
    return orders


def _effective_orders(order_list, n: int, final_zero: bool) -> list[int]:
    try:
        orders = [o if isinstance(o, str) else int(o) if float(o).is_integer() else o
                  for o in order_list]
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"order_list must be a sequence of orders (1, 2 or 3), one per step, "
                         f"got {order_list!r}") from None
    if len(orders) != n:
        raise ValueError(f"order_list has {len(orders)} entries for {n} steps")
    out: list[int] = []
    for i, o in enumerate(orders):
        if o not in (1, 2, 3):
            raise ValueError(f"order_list entries must be 1, 2 or 3; entry {i} is {o}")
        o = min(o, i + 1)                 # the scheduler lowers orders it lacks outputs for
        if final_zero and i == n - 1:
            o = 1                         # lambda = inf at sigma 0: only order 1 is defined
        if o > 1 and o != out[-1] + 1:
            raise ValueError(f"order_list entry {i} is {o} after {out[-1]}: a block of order k "
                             f"must run 1, 2, ..., k over consecutive steps")
        out.append(o)
    return out


@register("dpm_singlestep", order=2, nfe_per_step=1, stochastic=False, family="dpm",
          summary="diffusers DPMSolverSinglestepScheduler: a block of order k spans k grid "
                  "intervals, evaluates at the grid points and ends with x_hat' = e^-h x_hat_b + "
                  "(1 - e^-h) m_b + ... from the block's start state x_hat_b (Lu 2022 "
                  "DPM-Solver / DPM-Solver++ singlestep)",
          options=("order", "algorithm", "solver_type", "lower_order_final", "order_list"),
          defaults=dict(order=2, algorithm="dpmsolver++", solver_type="midpoint",
                        lower_order_final=True, order_list=None),
          specs={"algorithm": Option("choice", choices=_ALGORITHMS[:3])},
          variants=(("dpm_singlestep[order=1]", {"order": 1}, 1, 1),
                    ("dpm_singlestep[order=2]", {"order": 2}, 2, 1),
                    ("dpm_singlestep[order=3]", {"order": 3}, 2, 1)))
def dpm_singlestep(b, order, algorithm, solver_type, lower_order_final, order_list):
    """diffusers' DPMSolverSinglestepScheduler (Lu 2022a/b singlestep updates), one model call
    per grid step: a block of order k ends with x_hat' = e^-h x_hat_b + (1 - e^-h) m_b + ...
    from the block's start state x_hat_b. ``order_list``: per-step orders (None:
    :func:`diffusers_order_list`). ``algorithm="sde-dpmsolver++"``: h -> 2h in the data
    prediction weights and sigma' sqrt(1 - e^-2h) z added on every step, intermediate ones
    too (diffusers' singlestep SDE). Order 3 measures 2 (docs/solvers.md)."""
    _check_choice("algorithm", algorithm, _ALGORITHMS[:3])
    _check_choice("solver_type", solver_type, ("midpoint", "heun"))
    sde = algorithm == "sde-dpmsolver++"
    sig = b.sigmas
    n = b.n_steps
    final_zero = sig[-1] == 0
    if order_list is None:
        order_list = diffusers_order_list(n, int(order), bool(lower_order_final),
                                          final_zero)
    orders = _effective_orders(order_list, n, final_zero)
    pp = algorithm != "dpmsolver"
    block: list[tuple[float, object]] = []   # (sigma, model output as D or eps) of the block
    cur = "x"                                # slot holding the current state
    for i in range(n):
        b.step = i
        k = orders[i]
        s_i, t = sig[i], sig[i + 1]
        if k == 1:
            block = []
            cur = "x"
        D, eps = b.evaluate(cur, s_i, dst=f"o{k - 1}")
        block.append((s_i, D if pp else eps))
        ends = i == n - 1 or orders[i + 1] == 1
        dst = "x" if ends else f"y{k}"
        sb = block[0][0]
        xb = b.xhat("x", sb)                 # the block's start state (never overwritten inside)
        m = [mo for _, mo in block]          # oldest (block start) first
        if t == 0:
            b.assign(dst, D, t, noisy=sde)
            cur = dst
            continue
        h = _lam(t) - _lam(sb)
        # weights of m_b, of the first difference (midpoint / heun form) and of the second
        if sde:
            he = 2.0 * h
            base, w0 = math.exp(-he) * xb, _phi1(he)
            w_mid, w_heun = 0.5 * _phi1(he), _phi2(he)
            w_2 = (-math.expm1(-he) - he) / (he * he) - 0.5    # diffusers' SDE D2 weight
        elif pp:
            base, w0 = math.exp(-h) * xb, _phi1(h)
            w_mid, w_heun, w_2 = 0.5 * _phi1(h), _phi2(h), -_phi3(h)
        else:
            e1 = math.expm1(h)
            base, w0 = xb, -t * e1
            w_mid, w_heun, w_2 = -0.5 * t * e1, -t * (e1 / h - 1.0), -t * ((e1 - h) / (h * h) - 0.5)
        xt = base + w0 * m[0]
        if k == 2:
            r0 = (_lam(block[1][0]) - _lam(sb)) / h
            xt = xt + (w_mid if solver_type == "midpoint" else w_heun) * ((m[1] - m[0]) / r0)
        elif k == 3:
            r1 = (_lam(block[1][0]) - _lam(sb)) / h   # the block's first intermediate level
            r0 = (_lam(block[2][0]) - _lam(sb)) / h   # its second
            D1_0 = (m[1] - m[0]) / r1
            D1_1 = (m[2] - m[0]) / r0
            if solver_type == "midpoint":
                xt = xt + w_heun * D1_1
            else:
                D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
                D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
                xt = xt + w_heun * D1 + w_2 * D2
        std = t * math.sqrt(-math.expm1(-2.0 * h)) if sde else 0.0
        b.assign(dst, xt, t, noise=std, noisy=sde, kind=f"singlestep_order{k}")
        cur = dst
