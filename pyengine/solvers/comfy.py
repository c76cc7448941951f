"""ComfyUI's samplers as plans (``comfy/k_diffusion/sampling.py``), for eps and flow models.

k-diffusion-style samplers work in ComfyUI's own state and level (:class:`ComfySpace`):
x_c = x_hat, sigma_c = sigma for eps / v / EDM models; x_c = x, sigma_c = t = sigma / (1 +
sigma) for flow (CONST) models. Half-log-SNR samplers (dpmpp_sde, dpmpp_3m_sde, er_sde, seeds,
sa_solver, lcm) are x_hat updates with lambda = -log sigma, which is ComfyUI's per-kind
lambda. Noise draws follow ComfyUI's noise_sampler call order; its ``noise_scale`` multiplies
``s_noise`` (the adapter passes the product).
"""

from __future__ import annotations

import math

from .. import parameterization as _param
from .registry import MAX_STEPS, Option, register

__all__ = ["ComfySpace", "ancestral_split", "lagrange_weights"]

_R01 = Option("real", lo=0.0, hi=1.0, lo_open=True)


def _is_flow(process) -> bool:
    return getattr(process, "name", None) == "flow"


class ComfySpace:
    """ComfyUI's sampler state on a PlanBuilder: ``c(sigma)`` ComfyUI's noise level,
    ``x(slot, sigma)`` the Lin of x_c, ``put(dst, lin, sigma)`` writes a state given as x_c."""

    def __init__(self, b):
        self.b, self.flow = b, _is_flow(b.process)

    def c(self, sigma: float) -> float:
        if not self.flow:
            return float(sigma)
        return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)

    def sigma(self, c: float) -> float:
        """pyengine sigma of ComfyUI's level c."""
        if not self.flow:
            return float(c)
        return math.inf if c >= 1.0 else c / (1.0 - c)

    def alpha(self, sigma: float) -> float:
        """x_c / x_hat: the flow's 1 - t, 1 otherwise."""
        return 1.0 / (1.0 + sigma) if self.flow else 1.0

    def x(self, slot: str, sigma: float):
        return self.b.ref(slot) if self.flow else self.b.xhat(slot, sigma)

    def put(self, dst, lin, sigma, noise: float = 0.0, **kw):
        a = self.alpha(sigma)
        return self.b.assign(dst, lin / a, sigma, noise=noise / a, **kw)


def ancestral_split(space: ComfySpace, c: float, c_next: float, eta: float):
    """(c_down, noise std, renoise factor) of one ancestral step in ComfyUI's units.

    eps models (k-diffusion get_ancestral_step): c_up = min(c', eta sqrt(c'^2 (c^2 - c'^2)/c^2)),
    c_down = sqrt(c'^2 - c_up^2), factor 1. Flow models (ComfyUI's *_RF samplers):
    c_down = c' (1 + (c'/c - 1) eta), the state is multiplied by (1 - c')/(1 - c_down) and gets
    noise of std sqrt(c'^2 - c_down^2 (1 - c')^2 / (1 - c_down)^2)."""
    if not space.flow:
        if eta == 0 or c_next == 0:
            return c_next, 0.0, 1.0
        up = min(c_next, eta * math.sqrt(c_next ** 2 * (c ** 2 - c_next ** 2) / c ** 2))
        return math.sqrt(max(c_next ** 2 - up ** 2, 0.0)), up, 1.0
    down = c_next * (1.0 + (c_next / c - 1.0) * eta)
    if c_next == 0 or eta == 0:
        return down, 0.0, 1.0
    a1, ad = 1.0 - c_next, 1.0 - down
    return down, math.sqrt(max(c_next ** 2 - down ** 2 * a1 ** 2 / ad ** 2, 0.0)), a1 / ad


def _lam(sigma: float) -> float:
    return -math.log(sigma)


def _evaluate_cfg(b, slot: str, sigma: float, dst: str = "out", cfg_pp: bool = False):
    """(D, D_u): the guided denoised and, for CFG++ (``cfg_pp``), the unconditional one,
    read from the unconditional half of the guided model call (plan guidance must be on)."""
    if cfg_pp and b.guidance_scale is None:
        raise ValueError("cfg_pp samplers read the unconditional denoised: build the plan with "
                         "guidance_scale (classifier-free guidance in the plan)")
    D, _ = b.evaluate(slot, sigma, dst=dst)
    if not cfg_pp:
        return D, D
    s = b.s(sigma)
    (dx, do), _ = _param.affine(b.prediction, s, 1.0 if math.isinf(sigma) else s * sigma)
    return D, b.ref(slot) * dx + b.ref(dst + "/u") * do


_CFG_PP = {"cfg_pp": Option("bool")}


def _noisy(eta, s_noise) -> bool:
    return eta > 0 and s_noise > 0


# ---------------------------------------------------------------------------------------
# k-diffusion-style samplers in ComfyUI's space
# ---------------------------------------------------------------------------------------


def _to_d(x, D, c):
    return (x - D) / c


@register("res_multistep", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="RES multistep (Zhang et al. 2023, arXiv:2308.02157; ComfyUI res_multistep): "
                  "x' = e^-h x + h (b1 D + b2 D_-1), b1 = phi1(-h) - phi2(-h)/c2, b2 = "
                  "phi2(-h)/c2, c2 = (lambda_-1 - lambda_down,-1)/h, lambda = -log sigma_c, "
                  "to sigma_down with ancestral noise s_noise sigma_up z; Euler first step",
          options=("eta", "s_noise", "cfg_pp"), eta=0.0, s_noise=1.0, cfg_pp=False,
          specs=_CFG_PP, variants=(("res_multistep", {}, 2, 1),))
def res_multistep(b, eta, s_noise, cfg_pp):
    """ComfyUI's ``res_multistep`` (eta = 0), ``res_multistep_ancestral`` (eta = 1) and their
    ``_cfg_pp`` forms (D_u in the exponential update and the Euler steps, x moved by D - D_u
    first) in ComfyUI's space; the first step and a step to sigma_down = 0 are Euler steps."""
    sp, sig = ComfySpace(b), b.sigmas
    old = None                      # (slot of D_-1, lambda_-1 of sigma_{i-1}, old sigma_down)
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, Du = _evaluate_cfg(b, "x", sig[i], cfg_pp=cfg_pp)
        down, up, _ = _k_ancestral(c, cn, eta)
        if down == 0 or old is None:
            xn = D + down * _to_d(x, Du, c) if cfg_pp else x + (down - c) * _to_d(x, D, c)
        else:
            h = _lam(down) - _lam(c)
            c2 = (old[1] - _lam(old[2])) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = (phi1 - phi2 / c2, phi2 / c2) if c2 != 0 else (phi1, 0.0)
            base = x + (D - Du) if cfg_pp else x
            xn = math.exp(-h) * base + (h * b1) * Du + (h * b2) * b.ref(old[0])
        keep = (f"h{i % 2}", Du) if i < b.n_steps - 1 else None
        noise = s_noise * up if cn > 0 else 0.0
        sp.put("x", xn, sig[i + 1], noise=noise, aux=keep, kind="res_multistep")
        old = (keep[0], _lam(c), down) if keep else None


def _k_ancestral(c, cn, eta):
    """k-diffusion's get_ancestral_step (res_multistep uses it for both model kinds)."""
    if eta == 0 or cn == 0:
        return cn, 0.0, 1.0
    up = min(cn, eta * math.sqrt(cn ** 2 * (c ** 2 - cn ** 2) / c ** 2))
    return math.sqrt(max(cn ** 2 - up ** 2, 0.0)), up, 1.0


@register("gradient_estimation", order=1, nfe_per_step=1, stochastic=False, family="comfy",
          summary="Gradient estimation (Permenter & Yuan 2024; ComfyUI gradient_estimation): "
                  "d = (x - D)/sigma, x' = x + (sigma' - sigma)(d + (gamma - 1)(d - d_-1)) "
                  "(first step Euler), x' = D on the step to 0",
          options=("ge_gamma", "cfg_pp"), ge_gamma=2.0, cfg_pp=False,
          specs={"ge_gamma": Option("real"), **_CFG_PP})
def gradient_estimation(b, ge_gamma, cfg_pp):
    """``cfg_pp``: d from D_u and the Euler part x' = D + sigma' d (ComfyUI's _cfg_pp)."""
    sp, sig = ComfySpace(b), b.sigmas
    d_old = None
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, Du = _evaluate_cfg(b, "x", sig[i], cfg_pp=cfg_pp)
        if cn == 0:
            sp.put("x", D, sig[i + 1], kind="denoise")
            continue
        d = _to_d(x, Du, c)
        xn = D + cn * d if cfg_pp else x + (cn - c) * d
        if d_old is not None:
            xn = xn + ((ge_gamma - 1.0) * (cn - c)) * (d - d_old)
        keep = (f"g{i % 2}", d) if i < b.n_steps - 1 else None
        sp.put("x", xn, sig[i + 1], aux=keep, kind="gradient_estimation")
        d_old = b.ref(keep[0]) if keep else None


def lagrange_weights(nodes, a: float, b_: float):
    """w_j = integral over [a, b_] of the Lagrange basis polynomial of node j, by Gauss-Legendre
    quadrature on the product form (exact for these degrees, no monomial cancellation)."""
    import numpy as np
    nodes = np.asarray(nodes, dtype=np.float64)
    g, gw = np.polynomial.legendre.leggauss(max(len(nodes), 2))
    u = 0.5 * (b_ - a) * g + 0.5 * (b_ + a)
    out = []
    for j in range(len(nodes)):
        p = np.ones_like(u)
        for k in range(len(nodes)):
            if k != j:
                p = p * (u - nodes[k]) / (nodes[j] - nodes[k])
        out.append(float(0.5 * (b_ - a) * np.dot(gw, p)))
    return out


@register("lms", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="Linear multistep (k-diffusion / ComfyUI sample_lms): x' = x + sum_j w_j d_{i-j} "
                  "with w_j the integral over [sigma, sigma'] of the Lagrange basis on the last "
                  "min(order, i+1) levels; x' = D on the step to 0 (ComfyUI)",
          options=("max_order",), defaults=dict(max_order=4),
          specs={"max_order": Option("int", lo=1, hi=6)},
          variants=(("lms", {}, 2, 1),))
def lms(b, max_order):
    sp, sig = ComfySpace(b), b.sigmas
    hist: list = []                          # (slot, c) newest last
    n_ring = max(max_order - 1, 1) + 1
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, _ = b.evaluate("x", sig[i])
        if cn == 0:
            sp.put("x", D, sig[i + 1], kind="denoise")
            continue
        d = _to_d(x, D, c)
        q = min(i + 1, max_order)
        prev = hist[-(q - 1):] if q > 1 else []
        nodes = [c] + [cc for _, cc in reversed(prev)]
        w = lagrange_weights(nodes, c, cn)
        xn = x + w[0] * d
        for wj, (slot, _) in zip(w[1:], reversed(prev)):
            xn = xn + wj * b.ref(slot)
        keep = (f"l{i % n_ring}", d) if i < b.n_steps - 1 and max_order > 1 else None
        sp.put("x", xn, sig[i + 1], aux=keep, kind=f"lms{q}")
        if keep:
            hist.append((keep[0], c))
            del hist[:-(max_order - 1)]


def _ipndm_v_coeffs(q: int, h: list[float]) -> list[float]:
    """Variable-step Adams-Bashforth weights of ComfyUI's sample_ipndm_v for order q with
    h = [h_n, h_{n-1}, h_{n-2}, h_{n-3}] (step sizes in sigma_c, newest first)."""
    if q == 1:
        return [1.0]
    hn, h1 = h[0], h[1]
    if q == 2:
        return [(2 + hn / h1) / 2, -(hn / h1) / 2]
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if q == 3:
        return [(2 + hn / h1) / 2 + t1, -(hn / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    r = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2 + hn / h1) / 2 + t1 + t2,
            -(hn / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + r) * t2,
            t1 * h1 / h2 + (h1 / h2 + r * (1 + h2 / h3)) * t2,
            -t2 * r * h1 / h2]


def _ipndm_family(b, max_order: int, variable: bool) -> None:
    sp, sig = ComfySpace(b), b.sigmas
    hist: list = []                       # slots of d_{i-1}, d_{i-2}, ... newest first
    ring = [f"p{k}" for k in range(max(max_order - 1, 1) + 1)]
    cs = [sp.c(s) for s in sig]
    for i in range(b.n_steps):
        b.step = i
        c, cn = cs[i], cs[i + 1]
        x = sp.x("x", sig[i])
        D, _ = b.evaluate("x", sig[i])
        if cn == 0:
            sp.put("x", D, sig[i + 1], kind="denoise")
            continue
        d = _to_d(x, D, c)
        q = min(max_order, i + 1)
        if variable:
            hs = [cn - c] + [cs[i - k] - cs[i - k - 1] for k in range(min(i, 3))]
            w = _ipndm_v_coeffs(q, hs)
        else:
            w = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
                 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[q]
        lin = w[0] * d
        for wj, slot in zip(w[1:], hist):
            lin = lin + wj * b.ref(slot)
        keep = (ring[i % len(ring)], d) if i < b.n_steps - 1 and max_order > 1 else None
        sp.put("x", x + (cn - c) * lin, sig[i + 1], aux=keep, kind=f"ipndm{q}")
        if keep:
            hist.insert(0, keep[0])
            del hist[max_order - 1:]


@register("ipndm_v", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="iPNDM with variable-step Adams-Bashforth weights (Zhang & Chen 2023; ComfyUI "
                  "sample_ipndm_v): x' = x + (sigma' - sigma) sum_j a_j(h) d_{i-j}, order "
                  "min(max_order, i+1); x' = D on the step to 0",
          options=("max_order",), defaults=dict(max_order=4),
          specs={"max_order": Option("int", lo=1, hi=4)},
          variants=tuple((f"ipndm_v_{q}", dict(max_order=q), 1 if q == 1 else 2, 1)
                         for q in (1, 2, 3, 4)))
def ipndm_v(b, max_order):
    _ipndm_family(b, max_order, variable=True)


@register("ipndm_comfy", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="iPNDM as ComfyUI's sample_ipndm: fixed Adams-Bashforth weights in ComfyUI's "
                  "(x, sigma) space, x' = D on the step to 0 (the registry's ipndm takes the "
                  "Adams-Bashforth step to 0 and works in x_hat for flow models)",
          options=("max_order",), defaults=dict(max_order=4),
          specs={"max_order": Option("int", lo=1, hi=4)})
def ipndm_comfy(b, max_order):
    _ipndm_family(b, max_order, variable=False)


@register("heunpp2", order=1, nfe_per_step=3, stochastic=False, family="comfy",
          summary="Heun++ (ComfyUI sample_heunpp2): x' = x + (sigma' - sigma)(w1 d + w2 d2 + w3 "
                  "d3) with d2, d3 from Euler steps to sigma', sigma'' and w_k = sigma_k / "
                  "(3 sigma_0); Heun (w2 = sigma'/(2 sigma_0)) before the last step, Euler on it",
          options=("s_churn", "s_tmin", "s_tmax", "s_noise"), s_churn=0.0, s_tmin=0.0,
          s_tmax=math.inf, s_noise=1.0)
def heunpp2(b, s_churn, s_tmin, s_tmax, s_noise):
    """Churn as in ComfyUI (Karras Alg. 2 in ComfyUI's units); ComfyUI draws the churn noise at
    every step, used or not, the plan only where gamma > 0."""
    sp, sig = ComfySpace(b), b.sigmas
    cs = [sp.c(s) for s in sig]
    end = cs[-1]
    for i in range(b.n_steps):
        b.step = i
        s_hat, c = _churned(sp, i, s_churn, s_tmin, s_tmax, s_noise)
        c1 = cs[i + 1]
        x = sp.x("x", s_hat)
        D, _ = b.evaluate("x", s_hat, dst="o1")
        d = _to_d(x, D, c)
        dt = c1 - c
        if c1 == end:
            sp.put("x", x + dt * d, sig[i + 1], kind="euler")
            continue
        sp.put("x2", x + dt * d, sig[i + 1], kind="heunpp_x2")
        x2 = sp.x("x2", sig[i + 1])
        D2, _ = b.evaluate("x2", sig[i + 1], dst="o2")
        d2 = _to_d(x2, D2, c1)
        if cs[i + 2] == end:
            w2 = c1 / (2 * cs[0])
            sp.put("x", x + dt * ((1 - w2) * d + w2 * d2), sig[i + 1], kind="heun")
            continue
        c2 = cs[i + 2]
        sp.put("x3", x2 + (c2 - c1) * d2, sig[i + 2], kind="heunpp_x3")
        x3 = sp.x("x3", sig[i + 2])
        D3, _ = b.evaluate("x3", sig[i + 2], dst="o3")
        d3 = _to_d(x3, D3, c2)
        w2, w3 = c1 / (3 * cs[0]), c2 / (3 * cs[0])
        sp.put("x", x + dt * ((1 - w2 - w3) * d + w2 * d2 + w3 * d3), sig[i + 1],
               kind="heunpp")


# ---------------------------------------------------------------------------------------
# ancestral samplers with ComfyUI's flow (RF) forms
# ---------------------------------------------------------------------------------------


@register("euler_ancestral_comfy", order=1, nfe_per_step=1, stochastic=True, family="comfy",
          summary="ComfyUI's euler_ancestral: k-diffusion's form for eps models; for flow models "
                  "(sample_euler_ancestral_RF) x_d = "
                  "(t_d/t) x + (1 - t_d/t) D with t_d = t'(1 + (t'/t - 1) eta), then x' = "
                  "(1 - t')/(1 - t_d) x_d + s_noise sqrt(t'^2 - t_d^2 (1-t')^2/(1-t_d)^2) z; "
                  "x' = D on the step to 0",
          options=("eta", "s_noise"), eta=1.0, s_noise=1.0)
def euler_ancestral_comfy(b, eta, s_noise):
    """eps models: the registry's euler_ancestral (x' = D on the step to 0, as ComfyUI);
    flow models: ComfyUI's RF form. ``eta`` = 0 is Euler for both."""
    sp, sig = ComfySpace(b), b.sigmas
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, _ = b.evaluate("x", sig[i])
        if cn == 0:
            sp.put("x", D, sig[i + 1], kind="denoise")
            continue
        down, std, f = ancestral_split(sp, c, cn, eta)
        if down == 0 and not sp.flow:
            sp.put("x", D, sig[i + 1], kind="denoise")
            continue
        r = down / c
        sp.put("x", f * (r * x + (1 - r) * D), sig[i + 1], noise=s_noise * std,
               noisy=eta > 0, kind="euler_ancestral")


@register("dpm_2_ancestral", order=2, nfe_per_step=2, stochastic=True, family="comfy",
          summary="Ancestral DPM-2 (k-diffusion / ComfyUI sample_dpm_2_ancestral, _RF for flow): "
                  "DPM-2 midpoint step to sigma_down in ComfyUI's space, then ancestral noise "
                  "(flow: the RF renoising); Euler when sigma_down = 0",
          options=("eta", "s_noise", "levels"), eta=1.0, s_noise=1.0, levels=None,
          variants=(("dpm_2_ancestral[eta=0]", {"eta": 0.0}, 2, 2),))
def dpm_2_ancestral(b, eta, s_noise, levels):
    """``levels``: per step (sigma_mid, sigma_down, sigma_up) given as a table instead of
    computed from ``eta`` (a scheduler's own rounded tables: diffusers'
    KDPM2AncestralDiscreteScheduler keeps them in float32, where sigma_down =
    sqrt(sigma'^2 - sigma_up^2) cancels); eps-type processes only."""
    sp, sig = ComfySpace(b), b.sigmas
    table = _ancestral_levels(levels, sp, [sp.c(v) for v in sig])
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, _ = b.evaluate("x", sig[i], dst="o1")
        down, std, f = ancestral_split(sp, c, cn, eta)
        if table is not None:
            mid, down, std = table[i]
        d = _to_d(x, D, c)
        if down == 0:
            sp.put("x", x + (down - c) * d, sig[i + 1], kind="euler")
            continue
        if table is None:
            mid = math.exp(0.5 * (math.log(c) + math.log(down)))
        s_mid = sp.sigma(mid)
        sp.put("x2", x + (mid - c) * d, s_mid, kind="dpm2_mid")
        x2 = sp.x("x2", s_mid)
        D2, _ = b.evaluate("x2", s_mid, dst="o2")
        xn = f * (x + (down - c) * _to_d(x2, D2, mid))
        sp.put("x", xn, sig[i + 1], noise=s_noise * std,
               noisy=(eta > 0) if table is None else std > 0, kind="dpm2_ancestral")


def _ancestral_levels(levels, sp: ComfySpace, c: list[float]):
    """``levels`` of dpm_2_ancestral checked: None, or one (mid, down, up) triple of finite
    numbers per step with 0 <= down <= c, down <= mid <= c when down > 0, 0 <= up <= c'
    (to 1e-6 relative)."""
    if levels is None:
        return None
    n = len(c) - 1
    where = "solver 'dpm_2_ancestral': levels"
    if sp.flow:
        raise ValueError(f"{where} are for eps-type processes; a flow process's ancestral "
                         f"step renoises with its own factor")
    try:
        rows = [tuple(float(v) for v in row) for row in levels]
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a sequence of (sigma_mid, sigma_down, sigma_up) "
                         f"triples, got {levels!r}") from None
    if len(rows) != n or any(len(r) != 3 for r in rows):
        raise ValueError(f"{where} must hold one (sigma_mid, sigma_down, sigma_up) triple per "
                         f"step ({n}), got {len(rows)} rows")
    for i, (mid, down, up) in enumerate(rows):
        # slack of 1e-6 relative: a float32 table's rounding
        hi, hn = c[i] * (1 + 1e-6), c[i + 1] * (1 + 1e-6)
        ok = all(math.isfinite(v) for v in (mid, down, up)) and 0 <= down <= hi and \
            0 <= up <= hn and (down == 0 or down * (1 - 1e-6) <= mid <= hi)
        if not ok:
            raise ValueError(f"{where}: step {i} ({c[i]:g} -> {c[i + 1]:g}) has (mid, down, "
                             f"up) = {(mid, down, up)}; need 0 <= down <= mid <= sigma and "
                             f"0 <= up <= sigma'")
    return rows


@register("dpmpp_2s_ancestral", order=2, nfe_per_step=2, stochastic=True, family="comfy",
          summary="Ancestral DPM-Solver++(2S) (k-diffusion / ComfyUI sample_dpmpp_2s_ancestral, "
                  "_RF for flow): u = (sigma_s/sigma) x + (1 - sigma_s/sigma) D at the lambda "
                  "midpoint to sigma_down, x' = (sigma_down/sigma) x + (1 - sigma_down/sigma) "
                  "D(u), then ancestral noise; Euler when sigma_down = 0",
          options=("eta", "s_noise", "cfg_pp"), eta=1.0, s_noise=1.0, cfg_pp=False,
          specs=_CFG_PP, variants=(("dpmpp_2s_ancestral[eta=0]", {"eta": 0.0}, 2, 2),))
def dpmpp_2s_ancestral(b, eta, s_noise, cfg_pp):
    """``cfg_pp`` (ComfyUI's _cfg_pp): the steps use the unconditional D_u (the midpoint
    call's D_u for the full step), then x += alpha' (D - D_u) of the first call (alpha' =
    1 - t' for flow models, 1 otherwise)."""
    sp, sig = ComfySpace(b), b.sigmas
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, Du = _evaluate_cfg(b, "x", sig[i], dst="o1", cfg_pp=cfg_pp)
        guide = (1.0 - cn if sp.flow else 1.0) * (D - Du) if cfg_pp else None
        down, std, f = ancestral_split(sp, c, cn, eta)
        if cn == 0 or (down == 0 and not sp.flow):
            # Euler to sigma_down; eps models still add the noise when sigma' > 0 (eta > 1)
            xn = x + (down - c) * _to_d(x, Du, c)
            sp.put("x", xn if guide is None else xn + guide, sig[i + 1],
                   noise=s_noise * std if cn > 0 else 0.0, noisy=cn > 0 and eta > 0,
                   kind="euler")
            continue
        if sp.flow:
            # midpoint in the flow's half-log-SNR log((1 - t)/t); ComfyUI uses 0.9999 at t = 1
            if c == 1.0:
                mid = 0.9999
            else:
                lm = 0.5 * (math.log((1 - c) / c) + math.log((1 - down) / down))
                mid = 1.0 / (math.exp(lm) + 1.0)
        else:
            mid = math.exp(0.5 * (math.log(c) + math.log(down)))
        s_mid = sp.sigma(mid)
        sp.put("u", (mid / c) * x + (1 - mid / c) * Du, s_mid, kind="dpmpp2s_mid")
        D2, Du2 = _evaluate_cfg(b, "u", s_mid, dst="o2", cfg_pp=cfg_pp)
        xn = f * ((down / c) * x + (1 - down / c) * (Du2 if cfg_pp else D2))
        sp.put("x", xn if guide is None else xn + guide, sig[i + 1], noise=s_noise * std,
               noisy=eta > 0, kind="dpmpp2s_ancestral")


# ---------------------------------------------------------------------------------------
# half-log-SNR samplers, in x_hat (lambda = -log sigma for every process)
# ---------------------------------------------------------------------------------------


def _ancestral_sigma(s, s_next, eta):
    """get_ancestral_step in pyengine sigma: (sigma_down, sigma_up)."""
    return _k_ancestral(s, s_next, eta)[:2]


@register("dpmpp_sde", order=2, nfe_per_step=2, stochastic=True, family="comfy",
          summary="DPM-Solver++ SDE (k-diffusion / ComfyUI sample_dpmpp_sde): ancestral "
                  "DPM-Solver++(1) to lambda_s + r h, then x' = e^-h' x + (1 - e^-h') ((1 - "
                  "1/(2r)) D + D(u)/(2r)) to the ancestral sigma_down of the full step, with "
                  "noise sigma_up z after each stage; x' = D on the step to 0",
          options=("eta", "s_noise", "r"), eta=1.0, s_noise=1.0, r=0.5,
          specs={"r": _R01},
          variants=(("dpmpp_sde[eta=0]", {"eta": 0.0}, 2, 2),))
def dpmpp_sde(b, eta, s_noise, r):
    sig = b.sigmas
    noisy = _noisy(eta, s_noise)
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D, _ = b.evaluate("x", s, dst="o1")
        if t == 0:
            b.assign("x", D, t, kind="denoise")
            continue
        h = _lam(t) - _lam(s)
        s1 = s * math.exp(-r * h)
        sd, su = _ancestral_sigma(s, s1, eta)
        hh = _lam(sd) - _lam(s)
        b.assign("u", math.exp(-hh) * x - math.expm1(-hh) * D, s1,
                 noise=s_noise * su if noisy else 0.0, noisy=noisy, kind="dpmpp_sde_1")
        D2, _ = b.evaluate("u", s1, dst="o2")
        sd, su = _ancestral_sigma(s, t, eta)
        hh = _lam(sd) - _lam(s)
        fac = 1.0 / (2.0 * r)
        Dd = (1 - fac) * D + fac * D2
        b.assign("x", math.exp(-hh) * x - math.expm1(-hh) * Dd, t,
                 noise=s_noise * su if noisy else 0.0, noisy=noisy, kind="dpmpp_sde_2")


@register("dpmpp_3m_sde", order=2, nfe_per_step=1, stochastic=True, family="comfy",
          summary="DPM-Solver++(3M) SDE (k-diffusion / ComfyUI sample_dpmpp_3m_sde): x' = "
                  "(sigma'/sigma) e^{-eta h} x + (1 - e^{-he}) D + phi2 D1 - phi3 D2 (2M: phi2 "
                  "d), phi2 = (e^{-he} - 1)/he + 1, phi3 = phi2/he - 1/2, he = (1 + eta) h, "
                  "noise s_noise sigma' sqrt(1 - e^{-2 eta h}) z; x' = D on the step to 0",
          options=("eta", "s_noise"), eta=1.0, s_noise=1.0,
          variants=(("dpmpp_3m_sde[eta=0]", {"eta": 0.0}, 2, 1),))
def dpmpp_3m_sde(b, eta, s_noise):
    sig = b.sigmas
    noisy = _noisy(eta, s_noise)
    hist: list = []                # (slot, h) of the last two steps, newest first
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D, _ = b.evaluate("x", s)
        if t == 0:
            b.assign("x", D, t, kind="denoise")
            continue
        h = _lam(t) - _lam(s)
        he = (eta + 1.0) * h
        xt = math.exp(-he) * x - math.expm1(-he) * D
        phi2 = math.expm1(-he) / he + 1.0
        if len(hist) >= 2:
            (d_1, h1), (d_2, h2) = hist[0], hist[1]
            r0, r1 = h1 / h, h2 / h
            d10 = (D - b.ref(d_1)) / r0
            d11 = (b.ref(d_1) - b.ref(d_2)) / r1
            d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
            d2 = (d10 - d11) / (r0 + r1)
            xt = xt + phi2 * d1 - (phi2 / he - 0.5) * d2
        elif hist:
            d_1, h1 = hist[0]
            xt = xt + (phi2 * h / h1) * (D - b.ref(d_1))
        std = s_noise * t * math.sqrt(-math.expm1(-2.0 * h * eta)) if noisy else 0.0
        keep = (f"m{i % 3}", D) if i < b.n_steps - 1 else None
        b.assign("x", xt, t, noise=std, noisy=noisy, aux=keep, kind="dpmpp_3m_sde")
        if keep:
            hist.insert(0, (keep[0], h))
            del hist[2:]


def _er_scaler(v: float) -> float:
    return v * (math.exp(v ** 0.3) + 10.0)


@register("er_sde", order=1, nfe_per_step=1, stochastic=True, family="comfy",
          summary="ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169; ComfyUI sample_er_sde), "
                  "in x_hat with lambda_er = sigma: x' = r x + (1 - r) D + (dt + S n(sigma')) D' + "
                  "(dt^2/2 + S_u n(sigma')) D'' + s_noise sqrt(sigma'^2 - sigma^2 r^2) z, "
                  "r = n(sigma')/n(sigma), n(v) = v (e^{v^0.3} + 10), S, S_u 200-point sums",
          options=("s_noise", "max_stage"), s_noise=1.0, max_stage=3,
          specs={"max_stage": Option("int", lo=1, hi=3)})
def er_sde(b, s_noise, max_stage):
    """D', D'' are linear in the last three D (rotating buffers). The drift is the reverse
    SDE's: at s_noise = 0 it does not solve the PF-ODE (no ODE order claimed)."""
    sig = b.sigmas
    pts = 200
    hist: list = []          # slots of D_{i-1}, D_{i-2} (newest first)
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D, _ = b.evaluate("x", s)
        stage = min(max_stage, i + 1)
        if t == 0:
            b.assign("x", D, t, kind="denoise")
            continue
        r = _er_scaler(t) / _er_scaler(s)
        xt = r * x + (1 - r) * D
        if stage >= 2:
            dt = t - s
            step = -dt / pts
            pos = [t + k * step for k in range(pts)]
            S = sum(1.0 / _er_scaler(p) for p in pos) * step
            dd = (D - b.ref(hist[0])) / (s - sig[i - 1])
            xt = xt + (dt + S * _er_scaler(t)) * dd
            if stage >= 3:
                dd_old = (b.ref(hist[0]) - b.ref(hist[1])) / (sig[i - 1] - sig[i - 2])
                Su = sum((p - s) / _er_scaler(p) for p in pos) * step
                du = (dd - dd_old) / ((s - sig[i - 2]) / 2.0)
                xt = xt + (dt * dt / 2.0 + Su * _er_scaler(t)) * du
        std = s_noise * math.sqrt(max(t * t - s * s * r * r, 0.0))
        keep = None if i == b.n_steps - 1 else (f"e{i % 3}", D)
        b.assign("x", xt, t, noise=std, noisy=s_noise > 0, aux=keep, kind="er_sde")
        if keep:
            hist.insert(0, keep[0])
            del hist[2:]


def _seeds(b, eta, s_noise, rs, solver_type: str) -> None:
    """SEEDS-2 (rs = (r,)) / SEEDS-3 (rs = (r1, r2)) in x_hat. Correlated stage noise: n_k is
    recovered from the stage buffer (x_k = mean_k + sigma_k s_noise n_k); the next stage adds
    e^{(r_k - r_k+1) h eta} n_k + sqrt(1 - e^{2 (r_k - r_k+1) h eta}) z."""
    sig = b.sigmas
    noisy = _noisy(eta, s_noise)
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.xhat("x", s)
        D0, _ = b.evaluate("x", s, dst="o0")
        if t == 0:
            b.assign("x", D0, t, kind="denoise")
            continue
        h = _lam(t) - _lam(s)
        he = h * (eta + 1.0)

        noise_lin, noise_r = None, 0.0          # n_k as a Lin, and its r
        Ds = [D0]
        levels = list(rs) + [1.0]
        for k, r in enumerate(levels):
            last = k == len(levels) - 1
            sk = t if last else s * math.exp(-r * h)
            if last:
                if len(rs) == 1 and solver_type == "phi_1":
                    fac = 1.0 / (2.0 * rs[0])
                    w = [(math.expm1(-he), (1 - fac) * D0 + fac * Ds[1])]
                else:
                    rl = rs[-1]
                    bb = (math.expm1(-he) + he) / -he / rl
                    w = [(math.expm1(-he) - bb, D0), (bb, Ds[-1])]
            elif k == 0:
                w = [(math.expm1(-r * he), D0)]
            else:
                a2 = r / rs[0] * (math.expm1(-r * he) + r * he) / (-r * he)
                w = [(math.expm1(-r * he) - a2, D0), (a2, Ds[1])]
            mean = math.exp(-r * he) * x
            for wk, Dk in w:
                mean = mean - wk * Dk
            if noisy:
                seg = (noise_r - r) * h * eta
                std = math.sqrt(-math.expm1(2.0 * seg))
                carry = None if noise_lin is None else noise_lin * math.exp(seg)
                lin = mean if carry is None else mean + (sk * s_noise) * carry
            else:
                std, lin = 0.0, mean
            dst = "x" if last else f"u{k}"
            out = b.assign(dst, lin, sk, noise=sk * s_noise * std, noisy=noisy,
                           kind=f"seeds_stage{k}")
            if last:
                break
            if noisy:
                # n_k = (x_k - mean_k) / (sigma_k s_noise), from the buffer just written
                noise_lin = (out / b.s(sk) - mean) / (sk * s_noise)
                noise_r = r
            Dk, _ = b.evaluate(dst, sk, dst=f"o{k + 1}")
            Ds.append(Dk)


@register("seeds_2", order=2, nfe_per_step=2, stochastic=True, family="comfy",
          summary="SEEDS-2 (Gonzalez et al. 2023, arXiv:2305.14267; ComfyUI sample_seeds_2): "
                  "u = e^{-r he} x + (1 - e^{-r he}) D + noise, x' = e^{-he} x + (1 - e^{-he}) "
                  "((1 - 1/(2r)) D + D(u)/(2r)) (phi_1) + correlated noise, he = (1 + eta) h",
          options=("eta", "s_noise", "r", "solver_type"), eta=1.0, s_noise=1.0, r=0.5,
          solver_type="phi_1",
          specs={"r": _R01, "solver_type": Option("choice", choices=("phi_1", "phi_2"))},
          variants=(("seeds_2[eta=0]", {"eta": 0.0}, 2, 2),
                    ("seeds_2[eta=0,phi_2]", {"eta": 0.0, "solver_type": "phi_2"}, 2, 2)))
def seeds_2(b, eta, s_noise, r, solver_type):
    _seeds(b, eta, s_noise, (r,), solver_type)


@register("exp_heun_2_x0", order=2, nfe_per_step=2, stochastic=False, family="comfy",
          summary="Exponential Heun in x0 and lambda (ComfyUI sample_exp_heun_2_x0[_sde]): "
                  "SEEDS-2 with r = 1 and phi_2 weights; eta = 0 is deterministic",
          options=("eta", "s_noise", "solver_type"), eta=0.0, s_noise=1.0, solver_type="phi_2",
          specs={"solver_type": Option("choice", choices=("phi_1", "phi_2"))},
          variants=(("exp_heun_2_x0", {}, 2, 2),))
def exp_heun_2_x0(b, eta, s_noise, solver_type):
    _seeds(b, eta, s_noise, (1.0,), solver_type)


@register("seeds_3", order=3, nfe_per_step=3, stochastic=True, family="comfy",
          summary="SEEDS-3 (Gonzalez et al. 2023; ComfyUI sample_seeds_3): stages at lambda_s + "
                  "r1 h, r2 h with phi_1/phi_2 weights, x' = e^{-he} x + (1 - e^{-he} - b3) D "
                  "... + b3 D(u2), b3 = h phi_2(-he)/r2, correlated stage noise",
          options=("eta", "s_noise", "r_1", "r_2"), eta=1.0, s_noise=1.0, r_1=1.0 / 3,
          r_2=2.0 / 3, specs={"r_1": _R01, "r_2": _R01},
          variants=(("seeds_3[eta=0]", {"eta": 0.0}, 3, 3),))
def seeds_3(b, eta, s_noise, r_1, r_2):
    if not r_1 < r_2:
        raise ValueError(f"seeds_3 needs r_1 < r_2, got r_1={r_1!r}, r_2={r_2!r}")
    _seeds(b, eta, s_noise, (r_1, r_2), "phi_2")


@register("lcm", order=1, nfe_per_step=1, stochastic=True, family="comfy",
          summary="LCM multistep sampling (Luo et al. 2023; ComfyUI sample_lcm): x' = D + "
                  "s_noise_i sigma' z (the model's own noising), s_noise_i linear from s_noise "
                  "to s_noise_end; x' = D on the step to 0",
          options=("s_noise", "s_noise_end"), s_noise=1.0, s_noise_end=-1.0,
          specs={"s_noise_end": Option("real")})
def lcm(b, s_noise, s_noise_end):
    """``s_noise_end`` < 0 (the default) means "equal to s_noise" (ComfyUI's None)."""
    sig = b.sigmas
    n = b.n_steps
    end = s_noise if s_noise_end < 0 else s_noise_end
    for i in range(n):
        b.step = i
        D, _ = b.evaluate("x", sig[i])
        if sig[i + 1] == 0:
            b.assign("x", D, 0.0, kind="denoise")
            continue
        frac = i / (n - 1) if n > 1 else 0.0
        b.assign("x", D, sig[i + 1], noise=(s_noise + (end - s_noise) * frac) * sig[i + 1],
                 noisy=True, kind="lcm")


# ---------------------------------------------------------------------------------------
# k-diffusion's ODE samplers in ComfyUI's space (they differ from the x_hat solvers of the
# same math on flow models, where ComfyUI integrates in (x, t))
# ---------------------------------------------------------------------------------------

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_CHURN_DEFAULTS = dict(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0)


def _churned(sp, i, s_churn, s_tmin, s_tmax, s_noise):
    """ComfyUI's Algorithm 2 churn in its own units: c_hat = c (1 + gamma), x += s_noise
    sqrt(c_hat^2 - c^2) z; returns (pyengine sigma of c_hat, c_hat)."""
    b, sig = sp.b, sp.b.sigmas
    c = sp.c(sig[i])
    gamma = min(s_churn / b.n_steps, math.sqrt(2.0) - 1.0) if s_tmin <= c <= s_tmax else 0.0
    if gamma <= 0:
        return sig[i], c
    c_hat = c * (1.0 + gamma)
    if sp.flow and c_hat >= 1.0:
        raise ValueError(f"s_churn={s_churn!r} raises the flow time {c:.4g} to {c_hat:.4g} >= 1 "
                         f"(beyond pure noise); lower s_churn or s_tmax")
    s_hat = sp.sigma(c_hat)
    sp.put("x", sp.x("x", sig[i]), s_hat, noise=s_noise * math.sqrt(c_hat ** 2 - c ** 2),
           kind="churn")
    return s_hat, c_hat


@register("euler_comfy", order=1, nfe_per_step=1, stochastic=False, family="comfy",
          summary="Euler as ComfyUI's sample_euler: x' = x + (c' - c_hat)(x - D)/c_hat in "
                  "ComfyUI's space (x, t for flow models; churn in those units)",
          options=_CHURN, **_CHURN_DEFAULTS)
def euler_comfy(b, s_churn, s_tmin, s_tmax, s_noise):
    sp, sig = ComfySpace(b), b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s_hat, c_hat = _churned(sp, i, s_churn, s_tmin, s_tmax, s_noise)
        x = sp.x("x", s_hat)
        D, _ = b.evaluate("x", s_hat)
        sp.put("x", x + (sp.c(sig[i + 1]) - c_hat) * _to_d(x, D, c_hat), sig[i + 1])


@register("heun_comfy", order=2, nfe_per_step=2, stochastic=False, family="comfy",
          summary="Heun as ComfyUI's sample_heun (Karras 2022 Alg. 2) in ComfyUI's space (x, t "
                  "for flow models); Euler on the step to 0",
          options=_CHURN, **_CHURN_DEFAULTS)
def heun_comfy(b, s_churn, s_tmin, s_tmax, s_noise):
    sp, sig = ComfySpace(b), b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s_hat, c_hat = _churned(sp, i, s_churn, s_tmin, s_tmax, s_noise)
        cn = sp.c(sig[i + 1])
        x = sp.x("x", s_hat)
        D, _ = b.evaluate("x", s_hat, dst="o1")
        d = _to_d(x, D, c_hat)
        if cn == 0:
            sp.put("x", x + (cn - c_hat) * d, sig[i + 1])
            continue
        sp.put("x2", x + (cn - c_hat) * d, sig[i + 1], kind="heun_predict")
        x2 = sp.x("x2", sig[i + 1])
        D2, _ = b.evaluate("x2", sig[i + 1], dst="o2")
        sp.put("x", x + (0.5 * (cn - c_hat)) * (d + _to_d(x2, D2, cn)), sig[i + 1],
               kind="heun_correct")


@register("dpm_2_comfy", order=2, nfe_per_step=2, stochastic=False, family="comfy",
          summary="DPM-2 as ComfyUI's sample_dpm_2: midpoint c_mid = sqrt(c_hat c') in "
                  "ComfyUI's space (x, t for flow models); Euler on the step to 0",
          options=_CHURN, **_CHURN_DEFAULTS)
def dpm_2_comfy(b, s_churn, s_tmin, s_tmax, s_noise):
    sp, sig = ComfySpace(b), b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s_hat, c_hat = _churned(sp, i, s_churn, s_tmin, s_tmax, s_noise)
        cn = sp.c(sig[i + 1])
        x = sp.x("x", s_hat)
        D, _ = b.evaluate("x", s_hat, dst="o1")
        d = _to_d(x, D, c_hat)
        if cn == 0:
            sp.put("x", x + (cn - c_hat) * d, sig[i + 1])
            continue
        mid = math.exp(0.5 * (math.log(c_hat) + math.log(cn)))
        s_mid = sp.sigma(mid)
        sp.put("x2", x + (mid - c_hat) * d, s_mid, kind="dpm2_mid")
        x2 = sp.x("x2", s_mid)
        D2, _ = b.evaluate("x2", s_mid, dst="o2")
        sp.put("x", x + (cn - c_hat) * _to_d(x2, D2, mid), sig[i + 1])


@register("dpmpp_2m_comfy", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="DPM-Solver++(2M) as ComfyUI's sample_dpmpp_2m: lambda = -log c in ComfyUI's "
                  "space (x, t for flow models), x' = (c'/c) x - (e^-h - 1)((1 + 1/(2r)) D - "
                  "D_-1/(2r)); first step and the step to 0 first order",
          options=("cfg_pp",), cfg_pp=False, specs=_CFG_PP)
def dpmpp_2m_comfy(b, cfg_pp):
    """``cfg_pp`` (ComfyUI's sample_dpmpp_2m_cfg_pp): x' = D + e^-h (x - D_u) - (e^-h - 1)
    (D - D_u,-1)/(2r) (the correction from the second step on)."""
    sp, sig = ComfySpace(b), b.sigmas
    old = None                         # (slot of D_-1 (D_u,-1 for cfg_pp), h_-1)
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, Du = _evaluate_cfg(b, "x", sig[i], cfg_pp=cfg_pp)
        if cn == 0:
            sp.put("x", D, sig[i + 1], kind="denoise")
            continue
        h = _lam(cn) - _lam(c)
        if cfg_pp:
            xn = D + math.exp(-h) * (x - Du)
            if old is not None:
                xn = xn - (math.expm1(-h) / (2 * (old[1] / h))) * (D - b.ref(old[0]))
        else:
            Dd = D
            if old is not None:
                r = old[1] / h
                Dd = (1 + 1 / (2 * r)) * D - (1 / (2 * r)) * b.ref(old[0])
            xn = (cn / c) * x - math.expm1(-h) * Dd
        keep = (f"q{i % 2}", Du) if i < b.n_steps - 1 else None
        sp.put("x", xn, sig[i + 1], aux=keep, kind="dpmpp_2m")
        old = (keep[0], h) if keep else None


@register("ddpm_comfy", order=1, nfe_per_step=1, stochastic=True, family="comfy",
          summary="ComfyUI's sample_ddpm: the DDPM ancestral step with alpha_bar = 1/(c^2 + 1) "
                  "on x / sqrt(1 + c^2), eps = (x - D)/c, in ComfyUI's space; mean on the step "
                  "to 0")
def ddpm_comfy(b):
    sp, sig = ComfySpace(b), b.sigmas
    for i in range(b.n_steps):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        x = sp.x("x", sig[i])
        D, _ = b.evaluate("x", sig[i])
        ac, acp = 1.0 / (c * c + 1.0), 1.0 / (cn * cn + 1.0)
        a = ac / acp
        eps = _to_d(x, D, c)
        mu = math.sqrt(1.0 / a) * (math.sqrt(ac) * x - ((1 - a) / math.sqrt(1 - ac)) * eps)
        if cn > 0:
            std = math.sqrt((1 - a) * (1 - acp) / (1 - ac))
            k = math.sqrt(1.0 + cn * cn)
            sp.put("x", k * mu, sig[i + 1], noise=k * std, noisy=True, kind="ddpm")
        else:
            sp.put("x", mu, sig[i + 1], kind="ddpm_mean")


def dpm_fast_sigmas(sigma_min: float, sigma_max: float, nfe: int):
    """The grid of k-diffusion's DPM-Solver-fast: m = nfe // 3 + 1 steps uniform in
    lambda = -log sigma from sigma_max to sigma_min (m + 1 levels, no final 0)."""
    import numpy as np
    if isinstance(nfe, bool) or int(nfe) != nfe or nfe < 1:
        raise ValueError(f"n (model evaluations) must be a positive integer, got {nfe!r}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r}")
    m = int(nfe) // 3 + 1
    return np.exp(-np.linspace(-math.log(sigma_max), -math.log(sigma_min), m + 1))


def dpm_fast_orders(nfe: int) -> list[int]:
    """Per-step orders of DPM-Solver-fast (Lu et al. 2022 Sec. 3.4): 3, ..., 3 then 2, 1 when
    3 divides nfe, else 3, ..., 3, nfe mod 3."""
    m = int(nfe) // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


@register("dpm_fast", order=3, nfe_per_step=3, stochastic=False, family="comfy",
          summary="DPM-Solver-fast (Lu et al. 2022 Sec. 3.4; k-diffusion / ComfyUI "
                  "sample_dpm_fast): DPM-Solver-3 steps (2, 1 at the end) uniform in lambda "
                  "over dpm_fast_sigmas(sigma_min, sigma_max, nfe), eps-form, in ComfyUI's "
                  "space; ancestral noise with eta > 0",
          options=("nfe", "eta", "s_noise"), nfe=0, eta=0.0, s_noise=1.0,
          specs={"nfe": Option("int", lo=0, hi=3 * MAX_STEPS)},
          variants=(("dpm_fast", {}, 3, 3),))
def dpm_fast(b, nfe, eta, s_noise):
    """The plan's grid is :func:`dpm_fast_sigmas` (k-diffusion's; a final step to 0, not part
    of it, returns D); ``nfe`` = 0 takes 3 evaluations per step (all third order), else the
    per-step orders of :func:`dpm_fast_orders`."""
    sp, sig = ComfySpace(b), b.sigmas
    n = b.n_steps
    orders = [3] * n if nfe == 0 else dpm_fast_orders(nfe)
    if len(orders) != n:
        raise ValueError(f"dpm_fast: nfe={nfe} needs {len(orders)} steps, the grid has {n} "
                         f"(build it with dpm_fast_sigmas)")
    for i in range(n):
        b.step = i
        c, cn = sp.c(sig[i]), sp.c(sig[i + 1])
        if cn == 0:
            # not part of DPM-Solver-fast's grid: a step to 0 returns the denoised value
            D0, _ = b.evaluate("x", sig[i], dst="o0")
            sp.put("x", D0, sig[i + 1], kind="denoise")
            continue
        if eta:
            sd, _ = _k_ancestral(c, cn, eta)[:2]
            t_to = min(_lam(sd), _lam(sp.c(sig[-1]))) if sig[-1] > 0 else _lam(sd)
            # 0 exactly when clamped to the end level (ComfyUI's t_next_ = t_next there),
            # not the rounding of cn^2 - exp(-2 lam(cn))
            su = 0.0 if t_to == _lam(cn) else math.sqrt(max(cn ** 2 - math.exp(-2 * t_to), 0.0))
        else:
            t_to, su = _lam(cn), 0.0
        t0 = _lam(c)
        h = t_to - t0
        x = sp.x("x", sig[i])
        D0, _ = b.evaluate("x", sig[i], dst="o0")
        e0 = _to_d(x, D0, c)
        c_to = math.exp(-t_to)
        k = orders[i]
        xt = x - c_to * math.expm1(h) * e0
        if k >= 2:
            r1 = 0.5 if k == 2 else 1.0 / 3
            c1 = math.exp(-(t0 + r1 * h))
            s1 = sp.sigma(c1)
            sp.put("u1", x - c1 * math.expm1(r1 * h) * e0, s1, kind="dpm_fast_u1")
            u1 = sp.x("u1", s1)
            D1, _ = b.evaluate("u1", s1, dst="o1")
            e1 = _to_d(u1, D1, c1)
            if k == 2:
                xt = xt - (c_to / (2 * r1)) * math.expm1(h) * (e1 - e0)
            else:
                r2 = 2.0 / 3
                c2 = math.exp(-(t0 + r2 * h))
                s2 = sp.sigma(c2)
                sp.put("u2", x - c2 * math.expm1(r2 * h) * e0
                       - (c2 * r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0), s2,
                       kind="dpm_fast_u2")
                u2 = sp.x("u2", s2)
                D2, _ = b.evaluate("u2", s2, dst="o2")
                e2 = _to_d(u2, D2, c2)
                xt = xt - (c_to / r2) * (math.expm1(h) / h - 1) * (e2 - e0)
        sp.put("x", xt, sig[i + 1], noise=su * s_noise, noisy=bool(eta), kind=f"dpm_fast{k}")


def deis_tab_coefficients(levels, max_order: int, n_points: int = 10000) -> list[list[float]]:
    """ComfyUI's DEIS "tab" coefficients (Zhang & Chen 2023, the exponential integrator with
    polynomial extrapolation of eps in VP time): levels map to VP times t of the VP SDE through
    sigma 0.002 (t = 1e-3) and 80 (t = 1); step i of order q = min(i + 1, max_order) > 1 has
    C_j = sum_k g(tau_k) L_j(tau_k) dtau over tau = linspace(t_i, t_{i+1}, n_points), dtau =
    (t_{i+1} - t_i)/n_points, g = -1/2 dlog(alpha)/dtau / sqrt(alpha (1 - alpha)), L_j the
    Lagrange basis on t_i, ..., t_{i-q+1} (the same Riemann sum as ComfyUI's deis.py)."""
    import numpy as np
    lv = np.asarray(levels, dtype=np.float64)
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    bd = 2.0 * (math.log(smin ** 2 + 1) / eps_s - math.log(smax ** 2 + 1)) / (eps_s - 1)
    bmin = math.log(smax ** 2 + 1) - 0.5 * bd
    t = (np.sqrt(bmin ** 2 + 2 * bd * np.log(lv ** 2 + 1)) - bmin) / bd
    b0, b1 = bmin, bd + bmin
    out = []
    for i in range(lv.size - 1):
        q = min(i + 1, max_order)
        if q == 1 or lv[i + 1] <= 0:
            out.append([])
            continue
        taus = np.linspace(t[i], t[i + 1], n_points)
        dtau = (t[i + 1] - t[i]) / n_points
        alpha = np.exp(-0.5 * taus ** 2 * (b1 - b0) - taus * b0)
        g = -0.5 * (-taus * (b1 - b0) - b0) / np.sqrt(alpha * (1 - alpha))
        prev = [t[i - k] for k in range(q)]
        row = []
        for j in range(q):
            p = np.ones_like(taus)
            for k in range(q):
                if k != j:
                    p = p * (taus - prev[k]) / (prev[j] - prev[k])
            row.append(float(np.sum(g * p) * dtau))
        out.append(row)
    return out


@register("deis", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="DEIS (Zhang & Chen 2023; ComfyUI sample_deis, deis_mode 'tab'): x' = x + "
                  "sum_j C_j d_{i-j} with d = (x - D)/sigma and the tabulated exponential-"
                  "integrator weights C of deis_tab_coefficients; Euler on the first step and "
                  "on the step to 0",
          options=("max_order",), defaults=dict(max_order=3),
          specs={"max_order": Option("int", lo=1, hi=4)},
          variants=(("deis", {}, 2, 1),))
def deis(b, max_order):
    """Coefficients from ComfyUI's levels through a fixed VP time map (sigma 0.002..80,
    whatever the model), by a 10^4-point Riemann sum as ComfyUI computes them."""
    sp, sig = ComfySpace(b), b.sigmas
    cs = [sp.c(s) for s in sig]
    coeffs = deis_tab_coefficients(cs, max_order)
    hist: list = []
    ring = [f"s{k}" for k in range(max(max_order - 1, 1) + 1)]
    for i in range(b.n_steps):
        b.step = i
        c, cn = cs[i], cs[i + 1]
        x = sp.x("x", sig[i])
        D, _ = b.evaluate("x", sig[i])
        d = _to_d(x, D, c)
        q = min(max_order, i + 1)
        if cn <= 0 or q == 1:
            xn = x + (cn - c) * d
        else:
            row = coeffs[i]
            xn = x + row[0] * d
            for w, slot in zip(row[1:], hist):
                xn = xn + w * b.ref(slot)
        keep = (ring[i % len(ring)], d) if i < b.n_steps - 1 and max_order > 1 else None
        sp.put("x", xn, sig[i + 1], aux=keep, kind=f"deis{q}")
        if keep:
            hist.insert(0, keep[0])
            del hist[max_order - 1:]


# ---------------------------------------------------------------------------------------
# SA-Solver (stochastic Adams predictor-corrector), in x_hat
# ---------------------------------------------------------------------------------------


def sa_weights(lams, lam_s: float, lam_t: float, tau: float) -> list[float]:
    """w_j = (1 + tau^2) int_{lam_s}^{lam_t} e^{-(1 + tau^2)(lam_t - l)} L_j(l) dl, L_j the
    Lagrange basis on ``lams`` (Xue et al. 2023, SA-Solver eqs. 15 / 18, data prediction, in
    x_hat), by 24-point Gauss-Legendre quadrature."""
    import numpy as np
    k = 1.0 + tau * tau
    g, gw = np.polynomial.legendre.leggauss(24)
    u = 0.5 * (lam_t - lam_s) * g + 0.5 * (lam_t + lam_s)
    base = k * np.exp(-k * (lam_t - u)) * 0.5 * (lam_t - lam_s) * gw
    out = []
    for j in range(len(lams)):
        p = np.ones_like(u)
        for m in range(len(lams)):
            if m != j:
                p = p * (u - lams[m]) / (lams[j] - lams[m])
        out.append(float(np.dot(base, p)))
    return out


def _sa_simple(lams, lam_s, lam_t, tau, corrector: bool) -> list[float]:
    """SA-Solver's simple order-2 weights (its App. D), oldest first."""
    k = 1.0 + tau * tau
    h = lam_t - lam_s
    total = -math.expm1(-h * k)
    if corrector:
        w_new = 0.5 * k * h
        return [total - w_new, w_new]
    w_old = 0.5 * k * h * h / (lams[-2] - lam_s)
    return [w_old, total - w_old]


@register("sa_solver", order=3, nfe_per_step=1, stochastic=True, family="comfy",
          summary="SA-Solver (Xue et al. 2023, arXiv:2309.05019; ComfyUI sample_sa_solver): "
                  "stochastic Adams predictor x_p' = e^{-(1+tau^2) h} x + sum_j w_j D_j + "
                  "sigma' sqrt(1 - e^{-2 tau^2 h}) z and corrector with the new D, the same "
                  "noise; tau = eta inside [percent 0.2, 0.8] of the model's levels",
          options=("eta", "s_noise", "predictor_order", "corrector_order", "use_pece",
                   "simple_order_2", "tau_start", "tau_end"),
          eta=1.0, s_noise=1.0, predictor_order=3, corrector_order=4, use_pece=False,
          simple_order_2=False, tau_start=0.2, tau_end=0.8,
          specs={"predictor_order": Option("int", lo=1, hi=6),
                 "corrector_order": Option("int", lo=1, hi=6),
                 "use_pece": Option("bool"), "simple_order_2": Option("bool"),
                 "tau_start": Option("real", lo=0.0, hi=1.0),
                 "tau_end": Option("real", lo=0.0, hi=1.0)},
          variants=(("sa_solver[eta=0]", {"eta": 0.0}, 3, 1),
                    ("sa_solver[eta=0,pece]", {"eta": 0.0, "use_pece": True}, 3, 2)))
def sa_solver(b, eta, s_noise, predictor_order, corrector_order, use_pece, simple_order_2,
              tau_start, tau_end):
    """tau = eta between percent_to_sigma(tau_start) and (tau_end) of the process's ComfyUI
    model sampling. The corrector re-adds the predictor's noise, recovered from the predicted
    buffer (x_p - its mean). Lower orders near the end when the grid ends at 0."""
    from ..schedules import model_sampling_for
    sp, sig = ComfySpace(b), b.sigmas
    n = b.n_steps
    ms = model_sampling_for(b.process)
    hi, lo = ms.percent_to_sigma(tau_start), ms.percent_to_sigma(tau_end)

    def tau_of(sigma):
        c = sp.c(sigma)
        return eta if eta > 0 and hi >= c >= lo else 0.0

    lams = [_lam(s) if s > 0 else math.inf for s in sig]
    to_end = sig[-1] == 0
    noisy = eta > 0 and s_noise > 0
    ring = [f"d{k}" for k in range(max(predictor_order, corrector_order) + 1)]
    Ds: list = []                 # (slot, lambda index) of kept D's, oldest first
    cur, pred = "x", "x"          # slots of the corrected and the predicted state
    last_pred = None              # (mean Lin of the previous prediction, its noise std)
    tau_t, h = 0.0, 0.0
    for i in range(n):
        b.step = i
        D, _ = b.evaluate(pred, sig[i])
        # D's Lin reads the model output (and the predicted state): the first update of the
        # step copies it into the ring
        hist = [b.ref(slot) for slot, _ in Ds]
        keep = (ring[i % len(ring)], D) if i < n - 1 else None
        po = min(predictor_order, len(Ds) + 1)
        co = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else \
            min(corrector_order, len(Ds) + 1)
        if to_end:
            po = min(po, n - 1 - i)
            co = min(co, n - i)
        aux_done = False
        if co == 0:
            cur = pred
        else:
            lam_pts = [lams[j] for j in range(i - co + 1, i + 1)]
            w = (_sa_simple(lam_pts, lams[i - 1], lams[i], tau_t, True)
                 if simple_order_2 and co == 2 else sa_weights(lam_pts, lams[i - 1], lams[i],
                                                               tau_t))
            terms = (hist + [D])[-co:]
            lin = math.exp(-(1.0 + tau_t * tau_t) * h) * b.xhat(cur, sig[i - 1])
            for wj, Dj in zip(w, terms):
                lin = lin + wj * Dj
            if last_pred is not None and last_pred[1] > 0:
                lin = lin + (b.xhat(pred, sig[i]) - last_pred[0])
            dst = cur if cur != pred else "x"
            b.assign(dst, lin, sig[i], aux=keep, kind=f"sa_corrector{co}")
            aux_done = keep is not None
            cur = dst
            if use_pece:
                D, _ = b.evaluate(cur, sig[i])
                keep = (keep[0], D) if keep else None
                aux_done = False
        if aux_done:
            hist = [b.ref(slot) for slot, _ in Ds] + [b.ref(keep[0])]
        else:
            hist = hist + [D]
        # predictor
        last = i == n - 1
        free = [s for s in ("x", "p0", "p1") if s not in (cur, pred)]
        dst = "x" if last else free[0]
        if sig[i + 1] == 0:
            b.assign(dst, D if not aux_done else hist[-1], sig[i + 1],
                     aux=None if aux_done or last else keep, kind="denoise")
            last_pred = None
        else:
            tau_t = tau_of(sig[i + 1])
            h = lams[i + 1] - lams[i]
            lam_pts = [lams[j] for j in range(i - po + 1, i + 1)]
            w = (_sa_simple(lam_pts, lams[i], lams[i + 1], tau_t, False)
                 if simple_order_2 and po == 2 else sa_weights(lam_pts, lams[i], lams[i + 1],
                                                               tau_t))
            mean = math.exp(-(1.0 + tau_t * tau_t) * h) * b.xhat(cur, sig[i])
            for wj, Dj in zip(w, hist[-po:]):
                mean = mean + wj * Dj
            std = sig[i + 1] * math.sqrt(-math.expm1(-2.0 * tau_t * tau_t * h)) * s_noise \
                if noisy and tau_t > 0 else 0.0
            copy = None if aux_done or last else keep
            b.assign(dst, mean, sig[i + 1], noise=std, noisy=noisy and tau_t > 0, aux=copy,
                     kind=f"sa_predictor{po}")
            if copy is not None:
                # the next corrector reads this mean again: the D written by this update's
                # aux replaces the model-output Lin, which the next model call overwrites
                mean = mean - w[-1] * hist[-1] + w[-1] * b.ref(copy[0])
            last_pred = (mean, std)
        if keep is not None:
            Ds.append((keep[0], i))
            del Ds[:-max(predictor_order, corrector_order)]
        pred = dst


@register("euler_ancestral_cfg_pp", order=1, nfe_per_step=1, stochastic=True, family="comfy",
          summary="CFG++ Euler ancestral (Chung et al. 2024; ComfyUI "
                  "sample_euler_ancestral_cfg_pp), in x_hat: x_hat' = D + sigma_down (x_hat - "
                  "D_u)/sigma + s_noise sigma_up z with the ancestral split of (sigma, sigma'); "
                  "x' = D on the step to 0; eta = 0 is euler_cfg_pp",
          options=("eta", "s_noise"), eta=1.0, s_noise=1.0,
          variants=(("euler_ancestral_cfg_pp[eta=0]", {"eta": 0.0}, 1, 1),))
def euler_ancestral_cfg_pp(b, eta, s_noise):
    """Needs plan guidance (the unconditional D_u); without it D_u = D and the update is
    euler_ancestral (the order test runs it that way)."""
    sig = b.sigmas
    for i in range(b.n_steps):
        b.step = i
        s, t = sig[i], sig[i + 1]
        x = b.ref("x") if math.isinf(s) else b.xhat("x", s)
        D, Du = _evaluate_cfg(b, "x", s, cfg_pp=b.guidance_scale is not None)
        if t == 0:
            b.assign("x", D, t, kind="denoise")
            continue
        noisy = eta > 0 and s_noise > 0
        if math.isinf(s):
            # flow t = 1 (ComfyUI: alpha_s = 0, d = x, get_ancestral_step(inf, sigma')):
            # x_hat' = D + sigma' x (eta = 0) or D + s_noise sigma' z (eta > 0)
            down, up = (t, 0.0) if eta == 0 else (0.0, t)
            b.assign("x", D + down * x, t, noise=s_noise * up if noisy else 0.0,
                     noisy=noisy, kind="euler_ancestral_cfg_pp")
            continue
        down, up, _ = _k_ancestral(s, t, eta)
        b.assign("x", D + (down / s) * (x - Du), t, noise=s_noise * up if noisy else 0.0,
                 noisy=noisy, kind="euler_ancestral_cfg_pp")


# ---------------------------------------------------------------------------------------
# UniPC as ComfyUI runs it (comfy/extra_samplers/uni_pc.py: the official UniPC loop)
# ---------------------------------------------------------------------------------------


def _unipc_rhos(rks, h: float, order: int, variant: str, predictor: bool):
    """UniPC's rho weights (Zhao et al. 2023, Alg. 2/3) for data prediction, hh = -h: R_ik =
    r_k^(i-1), b_i = i! phi_(i+1)(hh) / B(hh); predictor: order 2 -> 1/2, else R[:-1,:-1]^-1 b;
    corrector: order 1 -> 1/2, else R^-1 b."""
    import numpy as np
    hh = -h
    bh = hh if variant == "bh1" else math.expm1(hh)
    R, bvec = [], []
    hpk = math.expm1(hh) / hh - 1.0
    fact = 1
    rk = np.array(list(rks) + [1.0])
    for i in range(1, order + 1):
        R.append(rk ** (i - 1))
        bvec.append(hpk * fact / bh)
        fact *= i + 1
        hpk = hpk / hh - 1.0 / fact
    R, bvec = np.array(R), np.array(bvec)
    if predictor:
        if order == 2:
            return [0.5], bh
        return list(np.linalg.solve(R[:-1, :-1], bvec[:-1])), bh
    if order == 1:
        return [0.5], bh
    return list(np.linalg.solve(R, bvec)), bh


@register("unipc_comfy", order=2, nfe_per_step=1, stochastic=False, family="comfy",
          summary="UniPC as ComfyUI's sample_unipc (Zhao et al. 2023, official multistep loop): "
                  "data prediction in ComfyUI's space with lambda = -log sigma_c, order min(3, "
                  "levels - 2), lower orders at the end, corrector with the next model output "
                  "except on the last step; a final level below 0.001 becomes 0.001",
          options=("variant",), variant="bh1",
          specs={"variant": Option("choice", choices=("bh1", "bh2"))},
          variants=(("unipc_comfy[bh1]", {}, 2, 1), ("unipc_comfy[bh2]", {"variant": "bh2"}, 2, 1)))
def unipc_comfy(b, variant):
    """ComfyUI stops at 0.001 instead of 0 and returns that state (no denoising step); a
    single-step grid is refused (ComfyUI takes no step there and returns the scaled input).
    Measured order 2: the lower-order final steps end with a first-order predictor-only step."""
    sp, sig = ComfySpace(b), b.sigmas
    n = b.n_steps
    if n < 2:
        raise ValueError("unipc_comfy needs at least 2 steps (ComfyUI's uni_pc takes no step "
                         "on a one-step grid)")
    cs = [sp.c(s) for s in sig]
    cs[-1] = max(cs[-1], 0.001)
    order = min(3, n - 1)
    lams = [_lam(c) for c in cs]
    ring = [f"u{k}" for k in range(order + 2)]
    b.step = 0
    first, _ = b.evaluate("x", sig[0])
    hist: list = []                      # (Lin of a kept model output, level index)
    for j in range(1, n + 1):            # the update to level j
        b.step = j - 1
        k = j if j < order else min(order, n + 1 - j)
        x = sp.x("x", sig[j - 1])
        m0, i0 = hist[-1] if hist else (first, 0)
        h = lams[j] - lams[i0]
        rks, D1s = [], []
        for q in range(1, k):
            mi, ii = hist[-(q + 1)]
            rks.append((lams[ii] - lams[i0]) / h)
            D1s.append((mi - m0) / rks[-1])
        xt = (cs[j] / cs[i0]) * x - math.expm1(-h) * m0
        if D1s:
            rho_p, bh = _unipc_rhos(rks, h, k, variant, predictor=True)
            for r, d1 in zip(rho_p, D1s):
                xt = xt - (bh * r) * d1
        if j == n:                       # no corrector, no model call on the last step
            sp.put("x", xt, sig[j], kind=f"unipc{k}")
            break
        # the first model output is copied out of the state it was computed from
        keep = ("u_first", first) if not hist else None
        sp.put("xp", xt, sig[j], aux=keep, kind=f"unipc_predict{k}")
        if keep:
            hist = [(b.ref("u_first"), 0)]
            m0 = hist[-1][0]
            D1s = [(mi - m0) / r for (mi, _), r in zip(hist[-2::-1], rks)]
        Dt, _ = b.evaluate("xp", sig[j], dst=f"o{j % 2}")
        rho_c, bh = _unipc_rhos(rks, h, k, variant, predictor=False)
        xc = (cs[j] / cs[i0]) * x - math.expm1(-h) * m0
        for r, d1 in zip(rho_c[:-1], D1s):
            xc = xc - (bh * r) * d1
        xc = xc - (bh * rho_c[-1]) * (Dt - m0)
        slot = ring[j % len(ring)]
        sp.put("x", xc, sig[j], aux=(slot, Dt), kind=f"unipc_correct{k}")
        hist = (hist + [(b.ref(slot), j)])[-order:]
