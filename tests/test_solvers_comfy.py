"""ComfyUI's samplers (pyengine/solvers/comfy.py) against independent float64 statements of
ComfyUI's own loops, for an eps-kind model (discrete VP: ComfyUI's state is x / s, its sigma
pyengine's) and a flow model (ComfyUI's state is x itself, its sigma the flow time t), with
the same noise sequence given to both.

The references below restate, in plain torch float64 over ComfyUI's (x, sigma), the loops of
ComfyUI ``comfy/k_diffusion/sampling.py`` (read, not copied): sample_euler_ancestral and
sample_euler_ancestral_RF, sample_dpm_2_ancestral(_RF), sample_dpmpp_2s_ancestral(_RF),
sample_dpmpp_sde, sample_dpmpp_3m_sde, res_multistep, sample_gradient_estimation, sample_lms,
sample_ipndm, sample_ipndm_v, sample_heunpp2, sample_er_sde, sample_seeds_2, sample_seeds_3,
sample_lcm; sigma_to_half_log_snr / half_log_snr_to_sigma for the model-kind-aware ones. The
plan is run by a ten-line walker over its ops (model calls and linear updates with the
listed noise), so these tests check the solver math alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.plan import Eval, Update

B, D = 3, 6


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(d=D, M=3, seed=4)


def walk(plan, x0, denoise, Z):
    """Run ``plan`` from process-space state x0: model calls D(x / s, sigma), updates with the
    noise draw k taken from Z[k]."""
    slots = {"x": x0}
    for op in plan.ops:
        if isinstance(op, Eval):
            slots[op.dst] = denoise(slots[op.src] / op.s, op.sigma)
        elif isinstance(op, Update):
            val = sum(c * slots[b] for c, b in zip(op.coefs, op.bufs))
            aux = None
            if op.aux_dst is not None:
                aux = sum(c * slots[b] for c, b in zip(op.aux_coefs, op.bufs))
            if op.noise_index >= 0:
                val = val + op.noise * Z[op.noise_index]
            slots[op.dst] = val
            if aux is not None:
                slots[op.aux_dst] = aux
        else:
            raise AssertionError(f"unexpected custom op {op!r}")
    return slots[plan.output]


class Noise:
    """ComfyUI's noise_sampler(sigma, sigma_next): the next entry of a fixed list."""

    def __init__(self, Z):
        self.Z, self.k = Z, 0

    def __call__(self, *_):
        z = self.Z[self.k]
        self.k += 1
        return z


# ---------------------------------------------------------------------------------------
# references in ComfyUI's space: m(x, sigma) -> denoised, flow: is the model CONST
# ---------------------------------------------------------------------------------------


def lam_fn(s, flow):
    return math.log((1 - s) / s) if flow else -math.log(s)


def sig_fn(lam, flow):
    return 1.0 / (1.0 + math.exp(lam)) if flow else math.exp(-lam)


def anc(s, sn, eta):
    if not eta:
        return sn, 0.0
    up = min(sn, eta * (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5)
    return (sn ** 2 - up ** 2) ** 0.5, up


def rf_anc(s, sn, eta):
    down = sn * (1 + (sn / s - 1) * eta)
    a1, ad = 1 - sn, 1 - down
    return down, (sn ** 2 - down ** 2 * a1 ** 2 / ad ** 2) ** 0.5, a1 / ad


def ref_euler_ancestral(m, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        if flow:
            if sig[i + 1] == 0:
                x = d0
                continue
            down, renoise, f = rf_anc(sig[i], sig[i + 1], eta)
            x = (down / sig[i]) * x + (1 - down / sig[i]) * d0
            if eta > 0:
                x = f * x + ns() * s_noise * renoise
        else:
            down, up = anc(sig[i], sig[i + 1], eta)
            if down == 0:
                x = d0
            else:
                x = x + (x - d0) / sig[i] * (down - sig[i]) + ns() * s_noise * up
    return x


def ref_dpm_2_ancestral(m, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        if flow:
            down, renoise, f = rf_anc(sig[i], sig[i + 1], eta)
        else:
            (down, renoise), f = anc(sig[i], sig[i + 1], eta), 1.0
        d = (x - d0) / sig[i]
        if down == 0:
            x = x + d * (down - sig[i])
            continue
        mid = math.exp((math.log(sig[i]) + math.log(down)) / 2)
        x2 = x + d * (mid - sig[i])
        d2 = (x2 - m(x2, mid)) / mid
        x = f * (x + d2 * (down - sig[i])) + ns() * s_noise * renoise
    return x


def ref_dpmpp_2s_ancestral(m, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        if flow:
            down, renoise, f = rf_anc(sig[i], sig[i + 1], eta)
            if sig[i + 1] == 0:
                x = x + (x - d0) / sig[i] * (down - sig[i])
                continue
            lm = (lam_fn(sig[i], True) + lam_fn(down, True)) / 2
            s = 0.9999 if sig[i] == 1.0 else sig_fn(lm, True)
            u = (s / sig[i]) * x + (1 - s / sig[i]) * d0
            x = (down / sig[i]) * x + (1 - down / sig[i]) * m(u, s)
            if eta > 0:
                x = f * x + ns() * s_noise * renoise
        else:
            down, up = anc(sig[i], sig[i + 1], eta)
            if down == 0:
                x = x + (x - d0) / sig[i] * (down - sig[i])
            else:
                t, tn = -math.log(sig[i]), -math.log(down)
                h = tn - t
                s = math.exp(-(t + h / 2))
                x2 = (s / sig[i]) * x - math.expm1(-h / 2) * d0
                x = (down / sig[i]) * x - math.expm1(-h) * m(x2, s)
            if sig[i + 1] > 0:
                x = x + ns() * s_noise * up
    return x


def ref_dpmpp_sde(m, x, sig, ns, flow, eta=1.0, s_noise=1.0, r=0.5):
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        if sig[i + 1] == 0:
            x = d0
            continue
        ls, lt = lam_fn(sig[i], flow), lam_fn(sig[i + 1], flow)
        h = lt - ls
        ls1 = ls + r * h
        s1 = sig_fn(ls1, flow)
        a_s, a_s1, a_t = sig[i] * math.exp(ls), s1 * math.exp(ls1), sig[i + 1] * math.exp(lt)
        sd, su = anc(math.exp(-ls), math.exp(-ls1), eta)
        hh = -math.log(sd) - ls
        x2 = (a_s1 / a_s) * math.exp(-hh) * x - a_s1 * math.expm1(-hh) * d0
        x2 = x2 + a_s1 * ns() * s_noise * su
        d2 = m(x2, s1)
        sd, su = anc(math.exp(-ls), math.exp(-lt), eta)
        hh = -math.log(sd) - ls
        dd = (1 - 1 / (2 * r)) * d0 + 1 / (2 * r) * d2
        x = (a_t / a_s) * math.exp(-hh) * x - a_t * math.expm1(-hh) * dd
        x = x + a_t * ns() * s_noise * su
    return x


def ref_dpmpp_3m_sde(m, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    d1 = d2 = h1 = h2 = None
    h = None
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        if sig[i + 1] == 0:
            x = d0
        else:
            ls, lt = lam_fn(sig[i], flow), lam_fn(sig[i + 1], flow)
            h = lt - ls
            he = h * (eta + 1)
            a_t = sig[i + 1] * math.exp(lt)
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - a_t * math.expm1(-he) * d0
            p2 = math.expm1(-he) / he + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                a = (d0 - d1) / r0
                bb = (d1 - d2) / r1
                x = x + a_t * p2 * (a + (a - bb) * r0 / (r0 + r1)) \
                    - a_t * (p2 / he - 0.5) * (a - bb) / (r0 + r1)
            elif h1 is not None:
                x = x + a_t * p2 * (d0 - d1) / (h1 / h)
            x = x + ns() * sig[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise
        d1, d2 = d0, d1
        h1, h2 = h, h1
    return x


def ref_res_multistep(m, x, sig, ns, flow, eta=0.0, s_noise=1.0):
    old_d = old_down = None
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        down, up = anc(sig[i], sig[i + 1], eta) if sig[i + 1] > 0 else (0.0, 0.0)
        if down == 0 or old_d is None:
            x = x + (x - d0) / sig[i] * (down - sig[i])
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (sig[i], old_down, down,
                                                                 sig[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            p1 = math.expm1(-h) / -h
            p2 = (p1 - 1) / -h
            x = math.exp(-h) * x + h * ((p1 - p2 / c2) * d0 + p2 / c2 * old_d)
        if sig[i + 1] > 0 and eta > 0:
            x = x + ns() * s_noise * up
        old_d, old_down = d0, down
    return x


def ref_gradient_estimation(m, x, sig, ns, flow, ge_gamma=2.0):
    old = None
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        d = (x - d0) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = d0
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old) * dt
        old = d
    return x


def _lagrange_int(ts, j, a, b, n=4001):
    """Integral over [a, b] of the Lagrange basis polynomial j on nodes ts (Simpson, exact
    for these low degrees to rounding)."""
    u = np.linspace(a, b, n)
    p = np.ones_like(u)
    for k, tk in enumerate(ts):
        if k != j:
            p *= (u - tk) / (ts[j] - tk)
    w = np.ones(n)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((b - a) / (n - 1) / 3 * np.dot(w, p))


def ref_lms(m, x, sig, ns, flow, max_order=4):
    ds = []
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        ds.append((x - d0) / sig[i])
        ds = ds[-max_order:]
        if sig[i + 1] == 0:
            x = d0
            continue
        q = min(i + 1, max_order)
        nodes = [sig[i - k] for k in range(q)]
        x = x + sum(_lagrange_int(nodes, j, sig[i], sig[i + 1]) * dj
                    for j, dj in enumerate(reversed(ds[-q:])))
    return x


def ref_ipndm(m, x, sig, ns, flow, max_order=4, variable=False):
    buf = []
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        d = (x - d0) / sig[i]
        q = min(max_order, i + 1)
        hn = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = d0
        elif q == 1:
            x = x + hn * d
        elif not variable:
            w = {2: (3, -1, 2), 3: (23, -16, 5, 12), 4: (55, -59, 37, -9, 24)}[q]
            x = x + hn * sum(wk * dk for wk, dk in zip(w[:-1], [d] + buf[::-1])) / w[-1]
        else:
            # sample_ipndm_v's variable-step weights: q = 2 is the Adams-Bashforth integral
            # (checked against the Lagrange integral), q = 3, 4 its closed forms
            p = [d] + buf[::-1]
            h1 = sig[i] - sig[i - 1]
            if q == 2:
                w = [(2 + hn / h1) / 2, -(hn / h1) / 2]
                nodes = [sig[i], sig[i - 1]]
                lag = [_lagrange_int(nodes, j, sig[i], sig[i + 1]) / hn for j in range(2)]
                assert np.allclose(w, lag, rtol=1e-10)
            else:
                h2 = sig[i - 1] - sig[i - 2]
                k1 = hn / h1
                tmp = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
                w = [(2 + k1) / 2 + tmp, -k1 / 2 - (1 + h1 / h2) * tmp, tmp * h1 / h2]
                if q == 4:
                    h3 = sig[i - 2] - sig[i - 3]
                    g = h1 * (h1 + h2) / (h2 * (h2 + h3))
                    tmp2 = ((1 - hn / (3 * (hn + h1))) / 2
                            + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2))) \
                        * (hn * (hn + h1) * (hn + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
                    w = [w[0] + tmp2, w[1] - (1 + h1 / h2 + g) * tmp2,
                         w[2] + (h1 / h2 + g * (1 + h2 / h3)) * tmp2, -tmp2 * g * h1 / h2]
            x = x + hn * sum(wk * pk for wk, pk in zip(w, p))
        buf.append(d)
        buf = buf[-(max_order - 1):] if max_order > 1 else []
    return x


def ref_heunpp2(m, x, sig, ns, flow, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                s_noise=1.0):
    end = sig[-1]
    for i in range(len(sig) - 1):
        x, sh = _churn(x, sig, i, ns, s_churn, s_tmin, s_tmax, s_noise)
        d0 = m(x, sh)
        d = (x - d0) / sh
        dt = sig[i + 1] - sh
        if sig[i + 1] == end:
            x = x + d * dt
        elif sig[i + 2] == end:
            x2 = x + d * dt
            d2 = (x2 - m(x2, sig[i + 1])) / sig[i + 1]
            w2 = sig[i + 1] / (2 * sig[0])
            x = x + (d * (1 - w2) + d2 * w2) * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - m(x2, sig[i + 1])) / sig[i + 1]
            x3 = x2 + d2 * (sig[i + 2] - sig[i + 1])
            d3 = (x3 - m(x3, sig[i + 2])) / sig[i + 2]
            w2, w3 = sig[i + 1] / (3 * sig[0]), sig[i + 2] / (3 * sig[0])
            x = x + ((1 - w2 - w3) * d + w2 * d2 + w3 * d3) * dt
    return x


def ref_er_sde(m, x, sig, ns, flow, s_noise=1.0, max_stage=3):
    def nsc(v):
        return v * (math.exp(v ** 0.3) + 10.0)
    lams = [math.exp(-lam_fn(s, flow)) if s > 0 else 0.0 for s in sig]
    old = old_dd = None
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        st = min(max_stage, i + 1)
        if sig[i + 1] == 0:
            x = d0
        else:
            ls, lt = lams[i], lams[i + 1]
            a_s, a_t = sig[i] / ls, sig[i + 1] / lt
            r = nsc(lt) / nsc(ls)
            x = a_t / a_s * r * x + a_t * (1 - r) * d0
            if st >= 2:
                dt = lt - ls
                step = -dt / 200
                pos = [lt + k * step for k in range(200)]
                S1 = sum(1 / nsc(p) for p in pos) * step
                dd = (d0 - old) / (ls - lams[i - 1])
                x = x + a_t * (dt + S1 * nsc(lt)) * dd
                if st >= 3:
                    S2 = sum((p - ls) / nsc(p) for p in pos) * step
                    du = (dd - old_dd) / ((ls - lams[i - 2]) / 2)
                    x = x + a_t * (dt ** 2 / 2 + S2 * nsc(lt)) * du
                old_dd = dd
            x = x + a_t * ns() * s_noise * max(lt ** 2 - ls ** 2 * r ** 2, 0.0) ** 0.5
        old = d0
    return x


def _phi1(v):
    return math.expm1(v)


def _phi2(v):
    return (math.expm1(v) - v) / v


def ref_seeds(m, x, sig, ns, flow, eta=1.0, s_noise=1.0, rs=(0.5,), solver_type="phi_1"):
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        if sig[i + 1] == 0:
            x = d0
            continue
        ls, lt = lam_fn(sig[i], flow), lam_fn(sig[i + 1], flow)
        h = lt - ls
        he = h * (eta + 1)
        at = sig[i + 1] * math.exp(lt)
        r1 = rs[0]
        l1 = ls + r1 * h
        s1 = sig_fn(l1, flow)
        a1 = s1 * math.exp(l1)
        x2 = s1 / sig[i] * math.exp(-r1 * h * eta) * x - a1 * _phi1(-r1 * he) * d0
        noise = None
        if eta > 0 and s_noise > 0:
            noise = (-math.expm1(-2 * r1 * h * eta)) ** 0.5 * ns()
            x2 = x2 + noise * s1 * s_noise
        dm1 = m(x2, s1)
        if len(rs) == 1:
            if solver_type == "phi_1":
                dd = d0 + (dm1 - d0) / (2 * r1)
                xn = sig[i + 1] / sig[i] * math.exp(-h * eta) * x - at * _phi1(-he) * dd
            else:
                b2 = _phi2(-he) / r1
                xn = sig[i + 1] / sig[i] * math.exp(-h * eta) * x \
                    - at * ((_phi1(-he) - b2) * d0 + b2 * dm1)
            last_r = r1
        else:
            r2 = rs[1]
            l2 = ls + r2 * h
            s2 = sig_fn(l2, flow)
            a2 = s2 * math.exp(l2)
            c2 = r2 / r1 * _phi2(-r2 * he)
            x3 = s2 / sig[i] * math.exp(-r2 * h * eta) * x \
                - a2 * ((_phi1(-r2 * he) - c2) * d0 + c2 * dm1)
            if noise is not None:
                seg = (r1 - r2) * h * eta
                noise = noise * math.exp(seg) + (-math.expm1(2 * seg)) ** 0.5 * ns()
                x3 = x3 + noise * s2 * s_noise
            dm2 = m(x3, s2)
            b3 = _phi2(-he) / r2
            xn = sig[i + 1] / sig[i] * math.exp(-h * eta) * x \
                - at * ((_phi1(-he) - b3) * d0 + b3 * dm2)
            last_r = r2
        if noise is not None:
            seg = (last_r - 1) * h * eta
            noise = noise * math.exp(seg) + (-math.expm1(2 * seg)) ** 0.5 * ns()
            xn = xn + noise * sig[i + 1] * s_noise
        x = xn
    return x


def ref_lcm(m, x, sig, ns, flow, s_noise=1.0, s_noise_end=None):
    n = len(sig) - 1
    end = s_noise if s_noise_end is None else s_noise_end
    for i in range(n):
        x = m(x, sig[i])
        if sig[i + 1] > 0:
            z = ns() * (s_noise + (end - s_noise) * (i / (n - 1) if n > 1 else 0.0))
            x = sig[i + 1] * z + (1 - sig[i + 1]) * x if flow else x + sig[i + 1] * z
    return x


def _churn(x, sig, i, ns, s_churn, s_tmin, s_tmax, s_noise):
    n = len(sig) - 1
    gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
    sh = sig[i] * (gamma + 1)
    if gamma > 0:
        x = x + ns() * s_noise * (sh ** 2 - sig[i] ** 2) ** 0.5
    return x, sh


def ref_euler(m, x, sig, ns, flow, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    for i in range(len(sig) - 1):
        x, sh = _churn(x, sig, i, ns, s_churn, s_tmin, s_tmax, s_noise)
        x = x + (x - m(x, sh)) / sh * (sig[i + 1] - sh)
    return x


def ref_heun(m, x, sig, ns, flow, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    for i in range(len(sig) - 1):
        x, sh = _churn(x, sig, i, ns, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - m(x, sh)) / sh
        dt = sig[i + 1] - sh
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - m(x2, sig[i + 1])) / sig[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


def ref_dpm_2(m, x, sig, ns, flow, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    for i in range(len(sig) - 1):
        x, sh = _churn(x, sig, i, ns, s_churn, s_tmin, s_tmax, s_noise)
        d = (x - m(x, sh)) / sh
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sh)
        else:
            mid = math.exp((math.log(sh) + math.log(sig[i + 1])) / 2)
            x2 = x + d * (mid - sh)
            x = x + (x2 - m(x2, mid)) / mid * (sig[i + 1] - sh)
    return x


def ref_dpmpp_2m(m, x, sig, ns, flow):
    old = None
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        tn = math.inf if sig[i + 1] == 0 else -math.log(sig[i + 1])
        t = -math.log(sig[i])
        h = tn - t
        if old is None or sig[i + 1] == 0:
            x = (math.exp(-tn) / math.exp(-t)) * x - math.expm1(-h) * d0
        else:
            r = (t + math.log(sig[i - 1])) / h
            x = (math.exp(-tn) / math.exp(-t)) * x \
                - math.expm1(-h) * ((1 + 1 / (2 * r)) * d0 - (1 / (2 * r)) * old)
        old = d0
    return x


def ref_ddpm(m, x, sig, ns, flow):
    for i in range(len(sig) - 1):
        s, sp_ = sig[i], sig[i + 1]
        d0 = m(x, s)
        ac, acp = 1 / (s * s + 1), 1 / (sp_ * sp_ + 1)
        a = ac / acp
        mu = (1 / a) ** 0.5 * (x / (1 + s * s) ** 0.5 - (1 - a) * ((x - d0) / s) / (1 - ac) ** 0.5)
        if sp_ > 0:
            mu = mu + ((1 - a) * (1 - acp) / (1 - ac)) ** 0.5 * ns()
            mu = mu * (1 + sp_ * sp_) ** 0.5
        x = mu
    return x


def ref_deis(m, x, sig, ns, flow, max_order=3):
    """sample_deis with get_deis_coeff_list(deis_mode='tab'): VP time map through sigma
    0.002 / 80, integrand from autograd of log alpha, 10^4-point sums."""
    sg = torch.tensor(sig, dtype=torch.float64)
    eps_s, smin, smax = 1e-3, torch.tensor(0.002, dtype=torch.float64), torch.tensor(80.0,
                                                                                   dtype=torch.float64)
    bd = 2 * (torch.log(smin ** 2 + 1) / eps_s - torch.log(smax ** 2 + 1)) / (eps_s - 1)
    bmin = torch.log(smax ** 2 + 1) - 0.5 * bd
    ts = ((bmin ** 2 + 2 * bd * (sg ** 2 + 1).log()).sqrt() - bmin) / bd
    b0, b1 = bmin, bd + bmin
    C = []
    for i in range(len(sig) - 1):
        q = min(i + 1, max_order)
        if q == 1:
            C.append([])
            continue
        taus = torch.linspace(float(ts[i]), float(ts[i + 1]), 10000,
                              dtype=torch.float64).requires_grad_(True)
        alpha = torch.exp(-0.5 * taus ** 2 * (b1 - b0) - taus * b0)
        alpha.log().sum().backward()
        with torch.no_grad():
            g = -0.5 * taus.grad / torch.sqrt(alpha * (1 - alpha))
            prev = ts[[i - k for k in range(q)]]
            row = []
            for j in range(q):
                poly = torch.ones_like(taus)
                for k in range(q):
                    if k != j:
                        poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
                row.append(float((g * poly).sum() * (ts[i + 1] - ts[i]) / 10000))
        C.append(row)
    buf = []
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        d = (x - d0) / sig[i]
        q = min(max_order, i + 1)
        if sig[i + 1] <= 0 or q == 1:
            x = x + (sig[i + 1] - sig[i]) * d
        else:
            x = x + sum(cj * dj for cj, dj in zip(C[i], [d] + buf[::-1]))
        buf.append(d)
        buf = buf[-(max_order - 1):]
    return x


CASES = [
    ("euler_ancestral_comfy", {"eta": 1.0}, ref_euler_ancestral, {}),
    ("euler_ancestral_comfy", {"eta": 0.6, "s_noise": 0.8}, ref_euler_ancestral,
     {"eta": 0.6, "s_noise": 0.8}),
    ("dpm_2_ancestral", {}, ref_dpm_2_ancestral, {}),
    ("dpm_2_ancestral", {"eta": 0.5}, ref_dpm_2_ancestral, {"eta": 0.5}),
    ("dpmpp_2s_ancestral", {}, ref_dpmpp_2s_ancestral, {}),
    ("dpmpp_2s_ancestral", {"eta": 0.7, "s_noise": 1.2}, ref_dpmpp_2s_ancestral,
     {"eta": 0.7, "s_noise": 1.2}),
    ("dpmpp_sde", {}, ref_dpmpp_sde, {}),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}, ref_dpmpp_sde, {"eta": 0.5, "r": 0.3}),
    ("dpmpp_3m_sde", {}, ref_dpmpp_3m_sde, {}),
    ("dpmpp_3m_sde", {"eta": 0.0}, ref_dpmpp_3m_sde, {"eta": 0.0}),
    ("res_multistep", {}, ref_res_multistep, {}),
    ("res_multistep", {"eta": 1.0}, ref_res_multistep, {"eta": 1.0}),
    ("gradient_estimation", {}, ref_gradient_estimation, {}),
    ("gradient_estimation", {"ge_gamma": 1.5}, ref_gradient_estimation, {"ge_gamma": 1.5}),
    ("lms", {}, ref_lms, {}),
    ("lms", {"max_order": 2}, ref_lms, {"max_order": 2}),
    ("ipndm_comfy", {}, ref_ipndm, {}),
    ("ipndm_comfy", {"max_order": 2}, ref_ipndm, {"max_order": 2}),
    ("ipndm_v", {}, ref_ipndm, {"max_order": 4, "variable": True}),
    ("ipndm_v", {"max_order": 3}, ref_ipndm, {"max_order": 3, "variable": True}),
    ("ipndm_v", {"max_order": 2}, ref_ipndm, {"max_order": 2, "variable": True}),
    ("heunpp2", {}, ref_heunpp2, {}),
    ("heunpp2", {"s_churn": 1.5, "s_tmax": 0.7}, ref_heunpp2, {"s_churn": 1.5, "s_tmax": 0.7}),
    ("er_sde", {}, ref_er_sde, {}),
    ("er_sde", {"max_stage": 2, "s_noise": 0.5}, ref_er_sde, {"max_stage": 2, "s_noise": 0.5}),
    ("seeds_2", {}, ref_seeds, {}),
    ("seeds_2", {"solver_type": "phi_2", "r": 0.4}, ref_seeds,
     {"solver_type": "phi_2", "rs": (0.4,)}),
    ("seeds_3", {}, ref_seeds, {"rs": (1 / 3, 2 / 3), "solver_type": "phi_2"}),
    ("seeds_3", {"eta": 0.0}, ref_seeds, {"eta": 0.0, "rs": (1 / 3, 2 / 3),
                                          "solver_type": "phi_2"}),
    ("exp_heun_2_x0", {}, ref_seeds, {"eta": 0.0, "s_noise": 0.0, "rs": (1.0,),
                                      "solver_type": "phi_2"}),
    ("exp_heun_2_x0", {"eta": 1.0}, ref_seeds, {"eta": 1.0, "rs": (1.0,),
                                                "solver_type": "phi_2"}),
    ("lcm", {}, ref_lcm, {}),
    ("euler_comfy", {}, ref_euler, {}),
    ("euler_comfy", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 0.7, "s_noise": 1.1}, ref_euler,
     {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 0.7, "s_noise": 1.1}),
    ("heun_comfy", {}, ref_heun, {}),
    ("heun_comfy", {"s_churn": 1.0, "s_tmax": 0.7}, ref_heun, {"s_churn": 1.0, "s_tmax": 0.7}),
    ("dpm_2_comfy", {}, ref_dpm_2, {}),
    ("dpm_2_comfy", {"s_churn": 1.5, "s_tmax": 0.7}, ref_dpm_2, {"s_churn": 1.5, "s_tmax": 0.7}),
    ("dpmpp_2m_comfy", {}, ref_dpmpp_2m, {}),
    ("ddpm_comfy", {}, ref_ddpm, {}),
    ("deis", {}, ref_deis, {}),
    ("deis", {"max_order": 4}, ref_deis, {"max_order": 4}),
    ("deis", {"max_order": 2}, ref_deis, {"max_order": 2}),
    ("lcm", {"s_noise": 0.5, "s_noise_end": 1.5}, ref_lcm, {"s_noise": 0.5, "s_noise_end": 1.5}),
]


def _grid(kind, n, to_zero):
    """ComfyUI-unit levels: eps kind from sigma 9 down, flow from t = 0.97 down."""
    if kind == "eps":
        c = np.exp(np.linspace(math.log(9.0), math.log(0.05), n + (0 if to_zero else 1)))
    else:
        c = np.linspace(0.97, 0.03, n + (0 if to_zero else 1)) ** 1.3
    return np.concatenate([c, [0.0]]) if to_zero else c


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("n,to_zero", [(7, True), (5, False), (2, True), (1, True)])
@pytest.mark.parametrize("name,opts,ref,ref_kw", CASES,
                         ids=[f"{c[0]}{c[1] or ''}" for c in CASES])
def test_matches_comfyui_loop(gmm, kind, n, to_zero, name, opts, ref, ref_kw):
    flow = kind == "flow"
    proc = pe.processes.RectifiedFlow(shift=2.0) if flow else \
        pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = _grid(kind, n, to_zero)
    sig = c / np.where(c < 1, 1 - c, 1.0) if flow else c
    sig[-1] = 0.0 if to_zero else sig[-1]
    g = torch.Generator().manual_seed(hash((name, kind, n)) % 2 ** 31)
    Z = torch.randn(64, B, D, generator=g, dtype=torch.float64)
    xc0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if flow else c[0])

    def m(xc, cc):          # ComfyUI's model call: the denoised of x_c at level c
        if flow:
            return gmm.denoise(xc / (1 - cc), cc / (1 - cc))
        return gmm.denoise(xc, cc)
    want = ref(m, xc0, [float(v) for v in c], Noise(Z), flow, **ref_kw)

    plan = pe.build_plan(proc, name, sig, "sample", **opts)
    s0 = float(proc.s_of_sigma(sig[0]))
    x0 = xc0 if flow else xc0 * s0
    got = walk(plan, x0, gmm.denoise, Z)
    if not flow:
        got = got / float(proc.s_of_sigma(sig[-1]))
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max()) / scale
    # everything is float64; the Simpson reference of lms is exact to ~1e-13
    assert err < 1e-9, f"{name}{opts} on {kind}: {err:.2e}"


def test_noise_draw_counts_follow_comfyui():
    """One draw per noise_sampler call of ComfyUI (the adapters feed the caller's sampler in
    this order): dpmpp_sde and seeds_2 call twice per step, seeds_3 three times, none on the
    step to 0."""
    proc = pe.processes.EDM()
    sig = np.array([5.0, 2.0, 1.0, 0.3, 0.0])
    count = {name: pe.build_plan(proc, name, sig, "sample").n_noise
             for name in ("dpmpp_sde", "seeds_2", "seeds_3", "er_sde", "lcm",
                          "euler_ancestral_comfy", "dpmpp_3m_sde")}
    assert count == {"dpmpp_sde": 6, "seeds_2": 6, "seeds_3": 9, "er_sde": 3, "lcm": 3,
                     "euler_ancestral_comfy": 3, "dpmpp_3m_sde": 3}
    for name in ("res_multistep", "gradient_estimation", "lms", "ipndm_v", "heunpp2",
                 "exp_heun_2_x0"):
        assert pe.build_plan(proc, name, sig, "sample").n_noise == 0


def test_lagrange_weights_integrate_polynomials():
    from pyengine.solvers.comfy import lagrange_weights
    rng = np.random.default_rng(2)
    nodes = sorted(rng.random(4) * 5, reverse=True)
    a, b = nodes[0], nodes[0] - 0.7
    w = lagrange_weights(nodes, a, b)
    for deg in range(4):                     # exact on polynomials of degree < 4
        want = (b ** (deg + 1) - a ** (deg + 1)) / (deg + 1)
        assert sum(wj * t ** deg for wj, t in zip(w, nodes)) == pytest.approx(want, rel=1e-12)


def test_option_errors_name_the_option():
    proc = pe.processes.EDM()
    sig = np.array([5.0, 2.0, 1.0, 0.0])
    for name, bad in [("seeds_2", {"r": 0.0}), ("seeds_2", {"solver_type": "phi_3"}),
                      ("er_sde", {"max_stage": 4}), ("lms", {"max_order": 0}),
                      ("ipndm_v", {"max_order": 5}), ("dpmpp_sde", {"r": 1.5}),
                      ("gradient_estimation", {"ge_gamma": float("nan")})]:
        key = next(iter(bad))
        with pytest.raises(ValueError, match=key):
            pe.build_plan(proc, name, sig, "sample", **bad)
    with pytest.raises(ValueError, match="r_1"):
        pe.build_plan(proc, "seeds_3", sig, "sample", r_1=0.8, r_2=0.5)
    with pytest.raises(ValueError, match="s_churn"):
        pe.build_plan(pe.processes.RectifiedFlow(), "heun_comfy",
                      np.array([99.0, 9.0, 1.0, 0.0]), "sample", s_churn=3.0)


def test_comfy_names_resolve():
    from pyengine.integrations import comfy_names as C
    from pyengine.solvers import registry
    for cname, (solver, fixed, own) in C.SAMPLERS.items():
        info = registry.get(solver)
        assert set(fixed) <= set(info.options), cname
        assert {o for o in own if o != "noise_sampler"} <= set(info.options), cname
    assert C.solver_for("res_multistep_ancestral", eta=0.5) == ("res_multistep", {"eta": 0.5})
    assert C.solver_for("dpmpp_2m_sde_heun", noise_sampler=None)[1]["solver_type"] == "heun"
    with pytest.raises(NotImplementedError, match="adaptive"):
        C.solver_for("dpm_adaptive")
    with pytest.raises(ValueError, match="r_2"):
        C.solver_for("dpmpp_sde", r_2=0.3)
    with pytest.raises(ValueError, match="unknown"):
        C.solver_for("eulr")
    # every ComfyUI name is mapped or refused with a reason; every scheduler is mapped
    for cname in C.COMFY_SAMPLER_NAMES:
        assert cname in C.SAMPLERS or cname in C.NOT_PROVIDED, cname
    assert len(C.COMFY_SAMPLER_NAMES) == 44
    assert set(C.COMFY_SCHEDULER_NAMES) == set(C.SCHEDULERS)
    ms = pe.schedules.ModelSampling.flow_shift(3.0)
    np.testing.assert_array_equal(C.scheduler_sigmas("simple", ms, 6, 0.5),
                                  pe.schedules.simple(ms, 12)[-7:])


def ref_dpm_fast(m, x, c_levels, orders, ns, eta=0.0, s_noise=1.0):
    """k-diffusion's DPMSolver.dpm_solver_fast over the given lambda-uniform levels."""
    def eps(x, c):
        return (x - m(x, c)) / c
    t_end = -math.log(c_levels[-1])
    for i, k in enumerate(orders):
        t, tn = -math.log(c_levels[i]), -math.log(c_levels[i + 1])
        if eta:
            sd, _ = anc(math.exp(-t), math.exp(-tn), eta)
            tn_ = min(t_end, -math.log(sd))
            su = (math.exp(-2 * tn) - math.exp(-2 * tn_)) ** 0.5
        else:
            tn_, su = tn, 0.0
        h = tn_ - t
        e0 = eps(x, math.exp(-t))
        if k == 1:
            xn = x - math.exp(-tn_) * math.expm1(h) * e0
        elif k == 2:
            s1 = t + h / 2
            u1 = x - math.exp(-s1) * math.expm1(h / 2) * e0
            e1 = eps(u1, math.exp(-s1))
            xn = x - math.exp(-tn_) * math.expm1(h) * e0 \
                - math.exp(-tn_) * math.expm1(h) * (e1 - e0)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - math.exp(-s1) * math.expm1(r1 * h) * e0
            e1 = eps(u1, math.exp(-s1))
            u2 = x - math.exp(-s2) * math.expm1(r2 * h) * e0 \
                - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0)
            e2 = eps(u2, math.exp(-s2))
            xn = x - math.exp(-tn_) * math.expm1(h) * e0 \
                - math.exp(-tn_) / r2 * (math.expm1(h) / h - 1) * (e2 - e0)
        x = xn + su * s_noise * ns() if eta else xn
    return x


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("nfe", [1, 5, 6, 10])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_dpm_fast_matches_k_diffusion(gmm, kind, nfe, eta):
    from pyengine.solvers.comfy import dpm_fast_orders, dpm_fast_sigmas
    flow = kind == "flow"
    proc = pe.processes.RectifiedFlow(shift=1.5) if flow else pe.processes.EDM()
    c = dpm_fast_sigmas(0.04, 0.95 if flow else 12.0, nfe)
    orders = dpm_fast_orders(nfe)
    assert sum(orders) == nfe and len(orders) == c.size - 1
    sig = c / (1 - c) if flow else c.copy()
    g = torch.Generator().manual_seed(nfe)
    Z = torch.randn(16, B, D, generator=g, dtype=torch.float64)
    xc0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if flow else c[0])

    def m(xc, cc):
        return gmm.denoise(xc / (1 - cc), cc / (1 - cc)) if flow else gmm.denoise(xc, cc)
    want = ref_dpm_fast(m, xc0, [float(v) for v in c], orders, Noise(Z), eta=eta)
    plan = pe.build_plan(proc, "dpm_fast", sig, "sample", nfe=nfe, eta=eta)
    assert plan.nfe == nfe
    got = walk(plan, xc0.clone(), gmm.denoise, Z)
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err


def _sa_coeffs(alpha_t, lams, lam_s, lam_t, tau, simple, corrector):
    """SA-Solver b coefficients as ComfyUI's sa_solver.py states them: exponential moments by
    integration by parts, then the transposed Vandermonde system (or the simple order-2
    weights), times alpha_t."""
    k = 1 + tau * tau
    h = lam_t - lam_s
    if simple and len(lams) == 2:
        if corrector:
            b1 = alpha_t * 0.5 * k * h
            return [alpha_t * -math.expm1(-h * k) - b1, b1]
        b2 = alpha_t * 0.5 * k * h * h / (lams[-2] - lam_s)
        return [b2, alpha_t * -math.expm1(-h * k) - b2]
    N = len(lams)
    moments = []
    for p in range(N):
        term = lam_t ** p - lam_s ** p * math.exp(-k * h)
        moments.append(term - (p / k) * moments[-1] if p else term)
    V = np.vander(np.array(lams), N, increasing=True).T
    return list(alpha_t * np.linalg.solve(V, np.array(moments)))


def ref_sa_solver(m, x, sig, ns, flow, ms, eta=1.0, s_noise=1.0, predictor_order=3,
                  corrector_order=4, use_pece=False, simple_order_2=False):
    lams = [lam_fn(s, flow) if s > 0 else math.inf for s in sig]
    hi, lo = ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)
    n = len(sig) - 1
    xp, h, tau, noise, preds = x, 0.0, 0.0, 0.0, []
    to_end = sig[-1] == 0
    for i in range(n):
        d0 = m(xp, sig[i])
        preds = (preds + [d0])[-max(predictor_order, corrector_order):]
        po = min(predictor_order, len(preds))
        co = 0 if i == 0 or (sig[i + 1] == 0 and not use_pece) else min(corrector_order,
                                                                           len(preds))
        if to_end:
            po, co = min(po, n - 1 - i), min(co, n - i)
        if co == 0:
            x = xp
        else:
            bc = _sa_coeffs(sig[i] * math.exp(lams[i]), lams[i - co + 1:i + 1], lams[i - 1],
                            lams[i], tau, simple_order_2, True)
            x = sig[i] / sig[i - 1] * math.exp(-tau * tau * h) * x \
                + sum(c * dk for c, dk in zip(bc, preds[-co:]))
            if tau > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                preds[-1] = m(x, sig[i])
        if sig[i + 1] == 0:
            xp = preds[-1]
        else:
            tau = eta if eta > 0 and hi >= sig[i + 1] >= lo else 0.0
            bc = _sa_coeffs(sig[i + 1] * math.exp(lams[i + 1]), lams[i - po + 1:i + 1],
                            lams[i], lams[i + 1], tau, simple_order_2, False)
            h = lams[i + 1] - lams[i]
            xp = sig[i + 1] / sig[i] * math.exp(-tau * tau * h) * x \
                + sum(c * dk for c, dk in zip(bc, preds[-po:]))
            if tau > 0 and s_noise > 0:
                noise = ns() * sig[i + 1] * (-math.expm1(-2 * tau * tau * h)) ** 0.5 * s_noise
                xp = xp + noise
    return xp


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("n,to_zero", [(9, True), (6, False), (2, True)])
@pytest.mark.parametrize("opts", [{}, {"use_pece": True}, {"eta": 0.0},
                                  {"simple_order_2": True, "predictor_order": 2,
                                   "corrector_order": 2},
                                  {"predictor_order": 2, "corrector_order": 3, "s_noise": 0.7}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_sa_solver_matches_comfyui(gmm, kind, n, to_zero, opts):
    flow = kind == "flow"
    proc = pe.processes.RectifiedFlow(shift=2.0) if flow else \
        pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = _grid(kind, n, to_zero)
    sig = c / np.where(c < 1, 1 - c, 1.0) if flow else c.copy()
    g = torch.Generator().manual_seed(n + 100 * to_zero)
    Z = torch.randn(32, B, D, generator=g, dtype=torch.float64)
    xc0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if flow else c[0])

    def m(xc, cc):
        return gmm.denoise(xc / (1 - cc), cc / (1 - cc)) if flow else gmm.denoise(xc, cc)
    ms = pe.schedules.model_sampling_for(proc)
    want = ref_sa_solver(m, xc0, [float(v) for v in c], Noise(Z), flow, ms, **opts)
    plan = pe.build_plan(proc, "sa_solver", sig, "sample", **opts)
    x0 = xc0 if flow else xc0 * float(proc.s_of_sigma(sig[0]))
    got = walk(plan, x0, gmm.denoise, Z)
    if not flow:
        got = got / float(proc.s_of_sigma(sig[-1]))
    if opts.get("eta", 1.0) > 0 and n > 2:
        assert plan.n_noise > 0                 # the tau interval is on for some steps
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err


# ---------------------------------------------------------------------------------------
# CFG++ samplers: the model returns the guided D and ComfyUI's post-CFG hook the
# unconditional D_u; in the plan, classifier-free guidance is folded in (guidance_scale)
# ---------------------------------------------------------------------------------------


def walk_guided(plan, x0, d_uncond, d_cond, Z):
    slots = {"x": x0}
    for op in plan.ops:
        if isinstance(op, Eval):
            xh = slots[op.src] / op.s
            slots[op.dst + "/u"] = d_uncond(xh, op.sigma)
            slots[op.dst + "/c"] = d_cond(xh, op.sigma)
        elif isinstance(op, Update):
            val = sum(c * slots[b] for c, b in zip(op.coefs, op.bufs))
            aux = None if op.aux_dst is None else \
                sum(c * slots[b] for c, b in zip(op.aux_coefs, op.bufs))
            if op.noise_index >= 0:
                val = val + op.noise * Z[op.noise_index]
            slots[op.dst] = val
            if aux is not None:
                slots[op.aux_dst] = aux
        else:
            raise AssertionError(f"unexpected custom op {op!r}")
    return slots[plan.output]


def ref_euler_ancestral_cfg_pp(m2, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    for i in range(len(sig) - 1):
        d0, du = m2(x, sig[i])
        if sig[i + 1] == 0:
            x = d0
            continue
        a_s = sig[i] * math.exp(lam_fn(sig[i], flow))
        a_t = sig[i + 1] * math.exp(lam_fn(sig[i + 1], flow))
        d = (x - a_s * du) / sig[i]
        down, up = anc(sig[i] / a_s, sig[i + 1] / a_t, eta)
        x = a_t * d0 + a_t * down * d
        if eta > 0 and s_noise > 0:
            x = x + a_t * ns() * s_noise * up
    return x


def ref_dpmpp_2s_ancestral_cfg_pp(m2, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    for i in range(len(sig) - 1):
        d0, du = m2(x, sig[i])
        guide = d0 - du
        if flow:
            down, renoise, f = rf_anc(sig[i], sig[i + 1], eta)
            if sig[i + 1] == 0:
                x = x + (x - du) / sig[i] * (down - sig[i])
            else:
                lm = (lam_fn(sig[i], True) + lam_fn(down, True)) / 2
                s = sig_fn(lm, True)
                u = (s / sig[i]) * x + (1 - s / sig[i]) * du
                _, du2 = m2(u, s)
                x = (down / sig[i]) * x + (1 - down / sig[i]) * du2
            if sig[i + 1] > 0 and eta > 0:
                x = f * x + ns() * s_noise * renoise
            x = x + (1 - sig[i + 1]) * guide
        else:
            down, up = anc(sig[i], sig[i + 1], eta)
            if down == 0:
                x = x + (x - du) / sig[i] * (down - sig[i])
            else:
                t, tn = -math.log(sig[i]), -math.log(down)
                h = tn - t
                s = math.exp(-(t + h / 2))
                x2 = (s / sig[i]) * x - math.expm1(-h / 2) * du
                _, du2 = m2(x2, s)
                x = (down / sig[i]) * x - math.expm1(-h) * du2
            if sig[i + 1] > 0:
                x = x + ns() * s_noise * up
            x = x + guide
    return x


def ref_dpmpp_2m_cfg_pp(m2, x, sig, ns, flow):
    old_u = None
    for i in range(len(sig) - 1):
        d0, du = m2(x, sig[i])
        t = -math.log(sig[i])
        tn = math.inf if sig[i + 1] == 0 else -math.log(sig[i + 1])
        h = tn - t
        if old_u is None or sig[i + 1] == 0:
            mix = -math.exp(-h) * du
        else:
            r = (t + math.log(sig[i - 1])) / h
            mix = -math.exp(-h) * du - math.expm1(-h) * (1 / (2 * r)) * (d0 - old_u)
        x = d0 + mix + math.exp(-h) * x
        old_u = du
    return x


def ref_res_multistep_cfg_pp(m2, x, sig, ns, flow, eta=0.0, s_noise=1.0):
    old_d = old_down = None
    for i in range(len(sig) - 1):
        d0, du = m2(x, sig[i])
        down, up = anc(sig[i], sig[i + 1], eta) if sig[i + 1] > 0 else (0.0, 0.0)
        if down == 0 or old_d is None:
            x = d0 + (x - du) / sig[i] * down
        else:
            t, t_old, t_next, t_prev = (-math.log(v) for v in (sig[i], old_down, down,
                                                                 sig[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            p1 = math.expm1(-h) / -h
            p2 = (p1 - 1) / -h
            x = x + (d0 - du)
            x = math.exp(-h) * x + h * ((p1 - p2 / c2) * du + p2 / c2 * old_d)
        if sig[i + 1] > 0 and eta > 0:
            x = x + ns() * s_noise * up
        old_d, old_down = du, down
    return x


def ref_gradient_estimation_cfg_pp(m2, x, sig, ns, flow, ge_gamma=2.0):
    old = None
    for i in range(len(sig) - 1):
        d0, du = m2(x, sig[i])
        d = (x - du) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = d0
        else:
            x = d0 + d * sig[i + 1]
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old) * dt
        old = d
    return x


CFG_CASES = [
    ("euler_ancestral_cfg_pp", {}, ref_euler_ancestral_cfg_pp, {}),
    ("euler_ancestral_cfg_pp", {"eta": 0.0}, ref_euler_ancestral_cfg_pp, {"eta": 0.0}),
    ("dpmpp_2s_ancestral", {"cfg_pp": True}, ref_dpmpp_2s_ancestral_cfg_pp, {}),
    ("dpmpp_2s_ancestral", {"cfg_pp": True, "eta": 0.5}, ref_dpmpp_2s_ancestral_cfg_pp,
     {"eta": 0.5}),
    ("dpmpp_2m_comfy", {"cfg_pp": True}, ref_dpmpp_2m_cfg_pp, {}),
    ("res_multistep", {"cfg_pp": True}, ref_res_multistep_cfg_pp, {}),
    ("res_multistep", {"cfg_pp": True, "eta": 1.0}, ref_res_multistep_cfg_pp, {"eta": 1.0}),
    ("gradient_estimation", {"cfg_pp": True}, ref_gradient_estimation_cfg_pp, {}),
]


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("n,to_zero", [(6, True), (4, False), (1, True)])
@pytest.mark.parametrize("name,opts,ref,ref_kw", CFG_CASES,
                         ids=[f"{c[0]}{c[1]}" for c in CFG_CASES])
def test_cfg_pp_matches_comfyui(gmm, kind, n, to_zero, name, opts, ref, ref_kw):
    flow = kind == "flow"
    w = 3.5
    uncond = GaussianMixture.random(d=D, M=2, seed=9)
    proc = pe.processes.RectifiedFlow(shift=2.0) if flow else \
        pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = _grid(kind, n, to_zero)
    sig = c / np.where(c < 1, 1 - c, 1.0) if flow else c.copy()
    g = torch.Generator().manual_seed(n + 7)
    Z = torch.randn(16, B, D, generator=g, dtype=torch.float64)
    xc0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if flow else c[0])

    def m2(xc, cc):                       # ComfyUI's (guided D, unconditional D)
        xh, se = (xc / (1 - cc), cc / (1 - cc)) if flow else (xc, cc)
        du, dc = uncond.denoise(xh, se), gmm.denoise(xh, se)
        return du + w * (dc - du), du
    want = ref(m2, xc0, [float(v) for v in c], Noise(Z), flow, **ref_kw)
    plan = pe.build_plan(proc, name, sig, "sample", guidance_scale=w, **opts)
    x0 = xc0 if flow else xc0 * float(proc.s_of_sigma(sig[0]))
    got = walk_guided(plan, x0, uncond.denoise, gmm.denoise, Z)
    if not flow:
        got = got / float(proc.s_of_sigma(sig[-1]))
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err


def test_cfg_pp_needs_plan_guidance():
    with pytest.raises(ValueError, match="guidance_scale"):
        pe.build_plan(pe.processes.EDM(), "res_multistep", np.array([3.0, 1.0, 0.0]), "sample",
                      cfg_pp=True)


def ref_unipc_comfy(m, x, sig, variant="bh1"):
    """ComfyUI's sample_unipc: the official UniPC multistep loop on the VP-scaled state
    x / sqrt(1 + sigma^2) with alpha = 1/sqrt(1 + sigma^2), lambda = -log sigma, a final level
    below 0.001 replaced by 0.001, returned divided by alpha there."""
    ts = list(sig)
    ts[-1] = max(ts[-1], 0.001)

    def alpha(s):
        return 1 / math.sqrt(1 + s * s)

    def model_fn(xv, s):                  # data prediction from the VP-scaled state
        return m(xv / alpha(s), s)
    steps = len(ts) - 1
    order = min(3, len(ts) - 2)
    xv = x * alpha(ts[0])

    def update(xv, models, times, t, k, corrector):
        lp0, lt = -math.log(times[-1]), -math.log(t)
        m0 = models[-1]
        sp0, st = times[-1] * alpha(times[-1]), t * alpha(t)
        h = lt - lp0
        rks, D1s = [], []
        for i in range(1, k):
            rk = (-math.log(times[-(i + 1)]) - lp0) / h
            rks.append(rk)
            D1s.append((models[-(i + 1)] - m0) / rk)
        rks.append(1.0)
        hh = -h
        hphi1 = math.expm1(hh)
        hpk = hphi1 / hh - 1
        fact = 1
        bh = hh if variant == "bh1" else math.expm1(hh)
        R, bb = [], []
        for i in range(1, k + 1):
            R.append([r ** (i - 1) for r in rks])
            bb.append(hpk * fact / bh)
            fact *= i + 1
            hpk = hpk / hh - 1 / fact
        R, bb = np.array(R), np.array(bb)
        xt_ = st / sp0 * xv - alpha(t) * hphi1 * m0
        if D1s:
            rp = [0.5] if k == 2 else np.linalg.solve(R[:-1, :-1], bb[:-1])
            xt = xt_ - alpha(t) * bh * sum(r * d for r, d in zip(rp, D1s))
        else:
            xt = xt_
        mt = None
        if corrector:
            rc = [0.5] if k == 1 else np.linalg.solve(R, bb)
            mt = model_fn(xt, t)
            corr = sum(r * d for r, d in zip(rc[:-1], D1s)) if D1s else 0
            xt = xt_ - alpha(t) * bh * (corr + rc[-1] * (mt - m0))
        return xt, mt

    models, times = [], []
    for si in range(steps):
        if si == 0:
            models, times = [model_fn(xv, ts[0])], [ts[0]]
        elif si < order:
            xv, mx = update(xv, models, times, ts[si], si, True)
            models.append(mx)
            times.append(ts[si])
        else:
            for step in range(si, si + 1 + (1 if si == steps - 1 else 0)):
                k = min(order, steps + 1 - step)
                xv, mx = update(xv, models, times, ts[step], k, step != steps)
                models = (models + [mx])[-order:] if len(models) < order else models[1:] + [mx]
                times = (times + [ts[step]])[-order:] if len(times) < order else \
                    times[1:] + [ts[step]]
    return xv / alpha(ts[-1])


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("n,to_zero", [(8, True), (5, False), (3, True), (2, True)])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_comfy_matches_comfyui(gmm, kind, n, to_zero, variant):
    flow = kind == "flow"
    proc = pe.processes.RectifiedFlow(shift=2.0) if flow else \
        pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = _grid(kind, n, to_zero)
    sig = c / np.where(c < 1, 1 - c, 1.0) if flow else c.copy()
    g = torch.Generator().manual_seed(n)
    xc0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if flow else c[0])

    def m(xc, cc):
        return gmm.denoise(xc / (1 - cc), cc / (1 - cc)) if flow else gmm.denoise(xc, cc)
    want = ref_unipc_comfy(m, xc0, [float(v) for v in c], variant)
    plan = pe.build_plan(proc, "unipc_comfy", sig, "sample", variant=variant)
    assert plan.nfe == n                          # no model call on the last step
    x0 = xc0 if flow else xc0 * float(proc.s_of_sigma(sig[0]))
    got = walk(plan, x0, gmm.denoise, None)
    if not flow:
        got = got / float(proc.s_of_sigma(sig[-1]))
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err


def test_plan_sigmas():
    from pyengine.integrations import comfy_names as C
    fl = pe.schedules.ModelSampling.flow_shift(3.0)
    t = pe.schedules.simple(fl, 6)                      # starts at t = 1
    assert t[0] == 1.0
    g = C.plan_sigmas("euler", t, fl)
    assert math.isinf(g[0]) and g[-1] == 0.0
    np.testing.assert_allclose(g[1:], t[1:] / (1 - t[1:]), rtol=1e-15)
    g = C.plan_sigmas("dpmpp_2m_sde", t, fl)            # ComfyUI's SNR offset at t = 1
    t0 = fl.percent_to_sigma(1e-4)
    assert g[0] == pytest.approx(t0 / (1 - t0), rel=1e-14) and math.isfinite(g[0])
    eps = pe.schedules.ModelSampling.discrete(pe.processes.VP.discrete("linear").sigmas)
    k = pe.schedules.karras(8, 0.03, 14.6)
    np.testing.assert_array_equal(C.plan_sigmas("dpmpp_2m_sde", k, eps), k)
    g = C.plan_sigmas("dpm_fast", k, eps)
    from pyengine.solvers.comfy import dpm_fast_sigmas
    np.testing.assert_allclose(g, dpm_fast_sigmas(float(k[-2]), float(k[0]), 8), rtol=1e-15)
    with pytest.raises(ValueError, match="sigmas"):
        C.plan_sigmas("euler", np.ones((2, 2)))


# ---------------------------------------------------------------------------------------
# agreement with k-diffusion where it has the name (its sampling.py, loaded alone)
# ---------------------------------------------------------------------------------------


def _load_k():
    import importlib.util
    import pathlib
    import sys
    import types
    try:
        spec = importlib.util.find_spec("k_diffusion")
        importlib.util.find_spec("torchsde").name
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    pkg, utils = types.ModuleType("k_diffusion"), types.ModuleType("k_diffusion.utils")
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    stubs = {"k_diffusion": pkg, "k_diffusion.utils": utils}
    if importlib.util.find_spec("torchdiffeq") is None:
        stubs["torchdiffeq"] = types.ModuleType("torchdiffeq")
        stubs["torchdiffeq"].odeint = None
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        mod = importlib.util.module_from_spec(sspec)
        sspec.loader.exec_module(mod)
    except Exception:
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


KD = _load_k()

K_CASES = [   # (registry solver, options, k-diffusion function, its kwargs, grid ends at 0)
    ("dpm_2_ancestral", {"eta": 0.8}, "sample_dpm_2_ancestral", {"eta": 0.8}, True),
    ("dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 0.9}, "sample_dpmpp_2s_ancestral",
     {"eta": 1.0, "s_noise": 0.9}, True),
    ("dpmpp_sde", {"eta": 0.7, "r": 0.4}, "sample_dpmpp_sde", {"eta": 0.7, "r": 0.4}, True),
    ("dpmpp_3m_sde", {"eta": 1.0}, "sample_dpmpp_3m_sde", {"eta": 1.0}, True),
    ("dpmpp_3m_sde", {"eta": 0.0}, "sample_dpmpp_3m_sde", {"eta": 0.0}, True),
    ("euler_ancestral_comfy", {"eta": 0.9}, "sample_euler_ancestral", {"eta": 0.9}, True),
    ("euler_comfy", {}, "sample_euler", {}, True),
    ("heun_comfy", {}, "sample_heun", {}, True),
    ("dpm_2_comfy", {}, "sample_dpm_2", {}, True),
    ("dpmpp_2m_comfy", {}, "sample_dpmpp_2m", {}, True),
    ("lms", {}, "sample_lms", {}, False),          # k-diffusion takes no denoising step at 0
]


@pytest.mark.skipif(KD is None, reason="k-diffusion (and torchsde) not installed")
@pytest.mark.parametrize("name,opts,kname,kkw,to_zero", K_CASES,
                         ids=[f"{c[0]}{c[1]}" for c in K_CASES])
def test_agrees_with_k_diffusion(gmm, name, opts, kname, kkw, to_zero):
    sig = _grid("eps", 9, to_zero)
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(32, B, D, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64) * sig[0]
    want = getattr(KD, kname)(lambda x, s: gmm.denoise(x, float(s[0])), x0.clone(),
                              torch.tensor(sig, dtype=torch.float64), disable=True,
                              **({"noise_sampler": Noise(Z)} if "eta" in kkw else {}), **kkw)
    plan = pe.build_plan(pe.processes.EDM(), name, sig, "sample", **opts)
    got = walk(plan, x0.clone(), gmm.denoise, Z)
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err


@pytest.mark.skipif(KD is None, reason="k-diffusion (and torchsde) not installed")
@pytest.mark.parametrize("nfe,eta", [(6, 0.0), (10, 0.0), (7, 0.6)])
def test_dpm_fast_agrees_with_k_diffusion(gmm, nfe, eta):
    from pyengine.solvers.comfy import dpm_fast_sigmas
    g = torch.Generator().manual_seed(nfe)
    Z = torch.randn(16, B, D, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64) * 12.0
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)      # k-diffusion builds its lambda grid in it
    try:
        want = KD.sample_dpm_fast(lambda x, s: gmm.denoise(x, float(s[0])), x0.clone(), 0.04,
                                  12.0, nfe, disable=True, eta=eta, noise_sampler=Noise(Z))
    finally:
        torch.set_default_dtype(old)
    plan = pe.build_plan(pe.processes.EDM(), "dpm_fast", dpm_fast_sigmas(0.04, 12.0, nfe),
                         "sample", nfe=nfe, eta=eta)
    got = walk(plan, x0.clone(), gmm.denoise, Z)
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err


def ref_dpmpp_2m_sde(m, x, sig, ns, flow, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """ComfyUI's sample_dpmpp_2m_sde (model-kind half-log-SNR)."""
    old, h_last = None, None
    for i in range(len(sig) - 1):
        d0 = m(x, sig[i])
        h = None
        if sig[i + 1] == 0:
            x = d0
        else:
            ls, lt = lam_fn(sig[i], flow), lam_fn(sig[i + 1], flow)
            h = lt - ls
            he = h * (eta + 1)
            a_t = sig[i + 1] * math.exp(lt)
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x + a_t * -math.expm1(-he) * d0
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + a_t * (-math.expm1(-he) / -he + 1) * (1 / r) * (d0 - old)
                else:
                    x = x + 0.5 * a_t * -math.expm1(-he) * (1 / r) * (d0 - old)
            if eta > 0 and s_noise > 0:
                x = x + ns() * sig[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise
        old, h_last = d0, h
    return x


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("opts", [{"eta": 1.0}, {"eta": 0.5, "solver_type": "heun"},
                                  {"eta": 0.0}])
def test_registry_dpmpp_2m_sde_is_comfyuis(gmm, kind, opts):
    """The mapping's claim: the registry's dpmpp_2m_sde (x_hat, lambda = -log sigma) is
    ComfyUI's for both model kinds (given ComfyUI's first-level offset on flow models)."""
    from pyengine.integrations import comfy_names as C
    flow = kind == "flow"
    proc = pe.processes.RectifiedFlow(shift=2.0) if flow else \
        pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    c = _grid(kind, 8, True)
    sig = c / np.where(c < 1, 1 - c, 1.0) if flow else c.copy()
    g = torch.Generator().manual_seed(21)
    Z = torch.randn(16, B, D, generator=g, dtype=torch.float64)
    xc0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if flow else c[0])

    def m(xc, cc):
        return gmm.denoise(xc / (1 - cc), cc / (1 - cc)) if flow else gmm.denoise(xc, cc)
    want = ref_dpmpp_2m_sde(m, xc0, [float(v) for v in c], Noise(Z), flow, **opts)
    name, o = C.solver_for("dpmpp_2m_sde_heun" if opts.get("solver_type") == "heun"
                           else "dpmpp_2m_sde", eta=opts["eta"])
    plan = pe.build_plan(proc, name, sig, "sample", **o)
    x0 = xc0 if flow else xc0 * float(proc.s_of_sigma(sig[0]))
    got = walk(plan, x0, gmm.denoise, Z)
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    assert err < 1e-9, err
