"""The solvers of pyengine/solvers/diffusers_compat.py against independent float64
restatements of their formulas (plain torch loops in the process state x = s x_hat, weights
by scipy quadrature where the solver integrates in closed form), on the VP process with
random grids and a nonlinear epsilon model, noise drawn in the plan's order from the same
generator. Bound 1e-10 relative."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import pyengine as pe
from pyengine import schedules as S

PROC = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (3, 2, 5)
TOL = 1e-10


def model(x, t):
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(0.7 * x + 0.1) * (1 + 0.3 * torch.sin(tt / 97.0)) + 0.1 * x


def s_of(sig):
    return 1.0 / math.sqrt(1.0 + sig * sig)


def call(x, sig):
    """(eps, x0) of the model at the state x (process space) and level sig."""
    t = torch.full((x.shape[0],), float(PROC.model_time(sig)), dtype=x.dtype)
    eps = model(x, t)
    s = s_of(sig)
    return eps, (x - s * sig * eps) / s


def grid(n, seed, zero=True):
    g = np.random.default_rng(seed)
    hi = float(g.uniform(8.0, 14.0))
    lo = float(g.uniform(0.03, 0.1))
    rho = float(g.uniform(5.0, 8.0))
    if zero:
        return S.karras(n, lo, hi, rho=rho)                  # n levels and 0: n steps
    return S.karras(n + 1, lo, hi, rho=rho, append_zero=False)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run(solver, sig, seed=0, **opts):
    smp = pe.Sampler(PROC, solver, sigmas=sig, init_noise_scale=1.0, **opts)
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    out = smp.sample(model, noise, generator=torch.Generator().manual_seed(seed),
                     backend="torch")
    return noise, out


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_lcm_boundary(n):
    sig = grid(n, n)
    noise, out = run("lcm_boundary", sig, timestep_scaling=7.0, sigma_data=0.6)
    g = torch.Generator().manual_seed(0)
    x = noise.clone()
    for i in range(n):
        _, x0 = call(x, sig[i])
        tau = float(PROC.model_time(sig[i])) * 7.0
        c_skip, c_out = 0.36 / (tau ** 2 + 0.36), tau / math.sqrt(tau ** 2 + 0.36)
        den = c_out * x0 + c_skip * x
        if i == n - 1:
            x = den
        else:
            z = torch.randn(SHAPE, dtype=torch.float64, generator=g)
            s1 = s_of(sig[i + 1])
            x = s1 * den + s1 * sig[i + 1] * z
    assert rel(out, x) < TOL


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 4, 7])
def test_tcd(n, gamma):
    # a diffusers-like grid: integer timesteps, ending at the table's level of timestep 0
    ts = np.sort(np.random.default_rng(n).choice(np.arange(40, 999), n, replace=False))[::-1]
    sig = np.concatenate([PROC.sigmas[ts], PROC.sigmas[:1]])
    noise, out = run("tcd", sig, gamma=gamma, timesteps=ts.astype(float))
    g = torch.Generator().manual_seed(0)
    x = noise.clone()
    for i in range(n):
        eps, x0 = call(x, sig[i])
        last = i == n - 1
        t_next = 0 if last else int(ts[i + 1])
        t_s = math.floor((1 - gamma) * t_next)
        a_s = float(PROC.alphas_cumprod[t_s])
        x_s = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        if gamma > 0 and not last:
            a_p = float(PROC.alphas_cumprod[t_next])
            z = torch.randn(SHAPE, dtype=torch.float64, generator=g)
            x = math.sqrt(a_p / a_s) * x_s + math.sqrt(1 - a_p / a_s) * z
        else:
            x = x_s
    assert rel(out, x) < TOL


def _ddim(x, sig, sig_next, eps):
    """DDIM's transfer in the process state (PNDM's _get_prev_sample, restated)."""
    a, ap = s_of(sig) ** 2, s_of(sig_next) ** 2
    return math.sqrt(ap / a) * x - (ap - a) * eps / (
        a * math.sqrt(1 - ap) + math.sqrt(a * (1 - a) * ap))


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10])
def test_pndm_plms(n):
    sig = grid(n, 10 + n, zero=False)
    noise, out = run("pndm_plms", sig)
    x, ets = noise.clone(), []
    for i in range(n):
        eps, _ = call(x, sig[i])
        if i == 0:
            ets.append(eps)
            if n == 1:
                x = _ddim(x, sig[0], sig[1], eps)
                continue
            x1 = _ddim(x, sig[0], sig[1], eps)
            eps1, _ = call(x1, sig[1])
            x = _ddim(x, sig[0], sig[1], (eps + eps1) / 2)
            continue
        ets.append(eps)
        e = ets[-4:]
        if len(e) == 2:
            c = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            c = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            c = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        x = _ddim(x, sig[i], sig[i + 1], c)
    assert rel(out, x) < TOL


def _lagrange(nodes, j):
    def L(u):
        p = 1.0
        for k, v in enumerate(nodes):
            if k != j:
                p *= (u - v) / (nodes[j] - v)
        return p
    return L


@pytest.mark.parametrize("order", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_lms_integrated(n, order):
    sig = grid(n, 20 + n)                                  # the step to 0 is integrated too
    noise, out = run("lms_integrated", sig, order=order)
    xh = noise / s_of(sig[0])
    ds = []
    for i in range(n):
        eps, _ = call(xh * s_of(sig[i]), sig[i])
        ds.append(eps)
        q = min(i + 1, order)
        nodes = [sig[i - k] for k in range(q)]
        for k in range(q):
            w = integrate.quad(_lagrange(nodes, k), sig[i], sig[i + 1], epsabs=0, epsrel=1e-13)[0]
            xh = xh + w * ds[i - k]
    assert rel(out, xh * s_of(sig[-1])) < TOL


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 4, 9])
def test_deis_logrho(n, order):
    sig = grid(n, 30 + n, zero=False)
    noise, out = run("deis_logrho", sig, order=order, lower_order_final=False)
    xh = noise / s_of(sig[0])
    es = []
    for i in range(n):
        eps, _ = call(xh * s_of(sig[i]), sig[i])
        es.append(eps)
        q = min(i + 1, order)
        nodes = [math.log(sig[i - k]) for k in range(q)]
        for k in range(q):
            L = _lagrange(nodes, k)
            w = integrate.quad(lambda r: L(math.log(r)), sig[i], sig[i + 1], epsabs=0,
                               epsrel=1e-13)[0]
            xh = xh + w * es[i - k]
    assert rel(out, xh * s_of(sig[-1])) < TOL


@pytest.mark.parametrize("how", ["clip", "threshold", "clip_eps"])
def test_clip_x0_over_ddim(how):
    n = 7
    sig = grid(n, 40)
    opts = {"clip": dict(clip_sample_range=0.4),
            "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.8,
                              sample_max_value=1.3),
            "clip_eps": dict(clip_sample_range=0.4, eps_from_clipped=True)}[how]
    noise, out = run("clip_x0", sig, **opts)
    x = noise.clone()
    for i in range(n):
        eps, x0 = call(x, sig[i])
        if how == "threshold":
            flat = x0.reshape(x0.shape[0], -1)
            q = torch.quantile(flat.abs(), 0.8, dim=1).clamp(1.0, 1.3).unsqueeze(1)
            x0 = (torch.maximum(torch.minimum(flat, q), -q) / q).reshape(x0.shape)
        else:
            x0 = x0.clamp(-0.4, 0.4)
        if how == "clip_eps":
            s = s_of(sig[i])
            eps = (x - s * x0) / (s * sig[i])
        x = s_of(sig[i + 1]) * (x0 + sig[i + 1] * eps)
    assert rel(out, x) < TOL
    # the op does clip here: without it the result differs
    _, plain = run("ddim", sig)
    assert rel(out, plain) > 1e-3


def _ab(ets):
    e = ets[-4:]
    if len(e) == 1:
        return e[-1]
    if len(e) == 2:
        return (3 * e[-1] - e[-2]) / 2
    if len(e) == 3:
        return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
    return (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24


@pytest.mark.parametrize("midpoint", ["time", "integer"])
@pytest.mark.parametrize("n", [1, 3, 4, 8])
def test_pndm(n, midpoint):
    # integer timesteps, one gap odd, one of 1 (midpoint "integer": the first midpoint state
    # at T - floor(d/2), both midpoint calls at T' + floor(d/2), which differ for odd d)
    g = np.random.default_rng(50 + n)
    gaps = g.integers(2, 60, size=n)
    gaps[0] = 37
    if n > 1:
        gaps[1] = 1
    ts = 990 - np.concatenate([[0], np.cumsum(gaps)])
    sig = PROC.sigmas[ts]
    noise, out = run("pndm", sig, timesteps=ts.astype(float), midpoint=midpoint)

    def eps_at(x, t_model):
        return model(x, torch.full((x.shape[0],), float(t_model), dtype=x.dtype))

    def level(t_model):
        return float(PROC.sigma_of_t(t_model))

    x, ets = noise.clone(), []
    for i in range(n):
        s0, s1 = sig[i], sig[i + 1]
        e1 = eps_at(x, ts[i])
        ets.append(e1)
        if i >= 3:
            x = _ddim(x, s0, s1, _ab(ets))
            continue
        if midpoint == "time":
            tm = (ts[i] + ts[i + 1]) / 2
            sa = sb = level(tm)
        else:
            h = (ts[i] - ts[i + 1]) // 2
            tm = ts[i + 1] + h
            sa, sb = level(ts[i] - h), level(tm)
        y = _ddim(x, s0, sa, e1)
        e2 = eps_at(y, tm)
        y = _ddim(x, s0, sb, e2)
        e3 = eps_at(y, tm)
        y = _ddim(x, s0, s1, e3)
        e4 = eps_at(y, ts[i + 1])
        x = _ddim(x, s0, s1, (e1 + 2 * e2 + 2 * e3 + e4) / 6)
    assert rel(out, x) < TOL
    # the warm-up matters: PLMS from the first step (pndm_plms) differs
    if n >= 2:
        _, plms = run("pndm_plms", sig, timesteps=ts.astype(float))
        assert rel(out, plms) > 1e-4


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order,n", [(1, 4), (2, 1), (2, 7)])
def test_dpm_multistep_sde_dpmsolver(order, n, solver_type):
    # noise prediction with noise (diffusers' sde-dpmsolver), in the process state:
    # x' = (a'/a) x - 2 s'_dpm (e^h - 1) eps0 [- s'_dpm (e^h - 1) D1 | - 2 s'_dpm ((e^h - 1)/h
    # - 1) D1] + s'_dpm sqrt(e^2h - 1) z, D1 = (eps0 - eps_-1) / r
    sig = grid(n, 60 + n, zero=False)
    noise, out = run("dpm_multistep", sig, order=order, algorithm="sde-dpmsolver",
                     solver_type=solver_type, lower_order_final=False)
    g = torch.Generator().manual_seed(0)
    x, prev = noise.clone(), None
    for i in range(n):
        eps, _ = call(x, sig[i])
        a, a1 = s_of(sig[i]), s_of(sig[i + 1])
        sd1 = a1 * sig[i + 1]
        h = math.log(sig[i] / sig[i + 1])
        e = math.exp(h) - 1.0
        xn = (a1 / a) * x - 2.0 * sd1 * e * eps
        if order == 2 and prev is not None:
            r = math.log(prev[1] / sig[i]) / h
            D1 = (eps - prev[0]) / r
            xn = xn - (sd1 * e if solver_type == "midpoint" else 2.0 * sd1 * (e / h - 1.0)) * D1
        z = torch.randn(SHAPE, dtype=torch.float64, generator=g)
        x = xn + sd1 * math.sqrt(math.exp(2 * h) - 1.0) * z
        prev = (eps, sig[i])
    assert rel(out, x) < TOL
    # the step to sigma 0: the limit of the first-order step, x_hat - 2 sigma eps + sigma z
    sig0 = np.concatenate([sig[:2], [0.0]])
    noise, out = run("dpm_multistep", sig0, order=1, algorithm="sde-dpmsolver")
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="third-order"):
        run("dpm_multistep", sig, order=3, algorithm="sde-dpmsolver")


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_singlestep_sde(order):
    # diffusers' singlestep sde-dpmsolver++ in x_hat: a block from x_b at sigma_b; every step
    # x_hat' = e^-2h x_hat_b + (1 - e^-2h) D_b + w D1 + sigma' sqrt(1 - e^-2h) z, h = log
    # sigma_b / sigma' (midpoint weights; its order-2 w = (1 - e^-2h)/2 on D1 = (D_1 - D_b)/r)
    n = 6
    sig = grid(n, 70 + order, zero=False)
    noise, out = run("dpm_singlestep", sig, order=order, algorithm="sde-dpmsolver++",
                     order_list=[1, 2, 3, 1, 2, 3][:n] if order == 3 else
                     ([1, 2] * 3 if order == 2 else [1] * n))
    g = torch.Generator().manual_seed(0)
    xh = noise / s_of(sig[0])
    orders = {1: [1] * n, 2: [1, 2] * 3, 3: [1, 2, 3] * 2}[order]
    block, xb, sb = [], None, None
    cur = xh
    for i in range(n):
        k = orders[i]
        if k == 1:
            block, xb, sb = [], cur, sig[i]
        _, D = call(cur * s_of(sig[i]), sig[i])
        block.append((sig[i], D))
        t = sig[i + 1]
        h = math.log(sb / t)
        he = 2.0 * h
        phi1 = -math.expm1(-he)
        nxt = math.exp(-he) * xb + phi1 * block[0][1]
        if k == 2:
            r0 = math.log(sb / block[1][0]) / h
            nxt = nxt + 0.5 * phi1 * (block[1][1] - block[0][1]) / r0
        elif k == 3:
            r0 = math.log(sb / block[2][0]) / h
            nxt = nxt + (math.expm1(-he) / he + 1.0) * (block[2][1] - block[0][1]) / r0
        z = torch.randn(SHAPE, dtype=torch.float64, generator=g)
        cur = nxt + t * math.sqrt(phi1) * z
    assert rel(out, cur * s_of(sig[-1])) < TOL


@pytest.mark.parametrize("n_prior,n,order", [(1, 3, 4), (3, 4, 4), (5, 2, 3), (2, 5, 2)])
def test_lms_integrated_prior_levels(n_prior, n, order):
    # a run started part-way: the Lagrange basis of step i spans min(n_prior + i + 1, order)
    # levels, those before the start included; only the outputs since the start are summed
    full = grid(n_prior + n, 80 + n_prior)
    prior, sig = full[:n_prior], full[n_prior:]
    noise, out = run("lms_integrated", sig, order=order, prior_levels=list(prior))
    xh = noise / s_of(sig[0])
    ds = []
    for i in range(n):
        eps, _ = call(xh * s_of(sig[i]), sig[i])
        ds.append(eps)
        a = n_prior + i                                   # index in the full schedule
        q = min(a + 1, order)
        nodes = [full[a - k] for k in range(q)]
        for k in range(min(q, i + 1)):
            w = integrate.quad(_lagrange(nodes, k), full[a], full[a + 1], epsabs=0,
                               epsrel=1e-13)[0]
            xh = xh + w * ds[i - k]
    assert rel(out, xh * s_of(sig[-1])) < TOL
    # the prior levels matter: without them the warm-up differs
    _, plain = run("lms_integrated", sig, order=order)
    assert rel(out, plain) > 1e-4
    with pytest.raises(ValueError, match="prior_levels"):
        run("lms_integrated", sig, prior_levels=[sig[0] * 0.5])
