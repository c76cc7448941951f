"""Euler-family and DDIM-family solvers against independent float64 statements of their
published formulas (k-diffusion / EDM Algorithm 2 in x_hat space; DDIM and DDPM in VP space),
with the exact Gaussian-mixture denoiser as a nonlinear model and Philox noise."""

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture
from pyengine.noise import philox_normal, seeds_tensor

GMM = GaussianMixture.random(d=12, M=3, seed=7)
B, SEED = 3, 5


def _noise():
    return torch.randn(B, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _z(k):
    return philox_normal(seeds_tensor(SEED, B), k, 12, dtype=torch.float64)


def _run(proc, solver, sigmas, prediction="sample", **opts):
    sp = pe.Sampler(proc, solver, sigmas=sigmas, prediction=prediction, **opts)
    model = GMM.as_model(proc, prediction)
    # The formula tests pin the torch reference backend: its Philox normals are the ones the
    # independent statements draw (native backends agree to the rounding of log/cos and are
    # compared with the reference in their own tests).
    x = sp.sample(model, _noise(), seed=SEED, backend="torch")
    return x, sp


def _close(a, b, tol=1e-11):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


PROCS = [pe.processes.EDM(), pe.processes.VP.continuous(), pe.processes.RectifiedFlow()]
SIGMAS = pe.schedules.karras(7, 0.02, 60.0)


def _gamma(s_churn, n, sigma, tmin, tmax):
    return min(s_churn / n, 2 ** 0.5 - 1) if tmin <= sigma <= tmax else 0.0


def _kdiff_loop(kind, sigmas, x, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                eta=1.0):
    """k-diffusion / EDM Alg. 2 style loops in x_hat space, written from the papers."""
    D = GMM.denoise
    n, draw = len(sigmas) - 1, 0
    for i in range(n):
        s, sn = sigmas[i], sigmas[i + 1]
        if kind == "euler_ancestral":
            up = min(sn, eta * math.sqrt(sn ** 2 * (s ** 2 - sn ** 2) / s ** 2)) if sn > 0 else 0.0
            down = math.sqrt(sn ** 2 - up ** 2)
            d = (x - D(x, s)) / s
            x = x + d * (down - s)
            if up > 0:
                x = x + _z(draw) * s_noise * up
            draw += 1
            continue
        gamma = _gamma(s_churn, n, s, s_tmin, s_tmax)
        sh = s * (1 + gamma)
        if gamma > 0:
            x = x + _z(draw) * s_noise * math.sqrt(sh ** 2 - s ** 2)
            draw += 1
        d = (x - D(x, sh)) / sh
        if kind == "euler" or sn == 0:
            x = x + d * (sn - sh)
        elif kind == "heun":
            x2 = x + d * (sn - sh)
            d2 = (x2 - D(x2, sn)) / sn
            x = x + (d + d2) / 2 * (sn - sh)
        elif kind == "dpm_2":
            sm = math.exp(0.5 * (math.log(sh) + math.log(sn)))
            x2 = x + d * (sm - sh)
            d2 = (x2 - D(x2, sm)) / sm
            x = x + d2 * (sn - sh)
    return x


@pytest.mark.parametrize("proc", PROCS, ids=lambda p: p.name)
@pytest.mark.parametrize("kind,opts", [
    ("euler", {}), ("heun", {}), ("dpm_2", {}),
    ("euler", dict(s_churn=3.0, s_tmin=0.05, s_tmax=20.0, s_noise=1.007)),
    ("heun", dict(s_churn=5.0, s_tmin=0.05, s_tmax=50.0)),
    ("euler_ancestral", dict(eta=1.0)), ("euler_ancestral", dict(eta=0.5, s_noise=0.9)),
])
def test_euler_family(proc, kind, opts):
    x, sp = _run(proc, kind, SIGMAS, **opts)
    x0 = _noise() * sp.init_noise_scale / proc.s_of_sigma(SIGMAS[0])
    ref = _kdiff_loop(kind, SIGMAS, x0, **opts)
    _close(x, ref)


def _vp_eps(proc):
    model = GMM.as_model(proc, "epsilon")
    return model


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_ddim_vp_formula(eta):
    """Song et al. 2021 eq. 12 in VP space: x' = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z."""
    proc = pe.processes.VP.discrete("linear")
    sig = pe.schedules.vp_discrete(proc, 6, "leading", steps_offset=1, final="sigma_min")
    x, sp = _run(proc, "ddim", sig, prediction="epsilon", eta=eta)
    model = _vp_eps(proc)
    xt = _noise() * sp.init_noise_scale
    for i in range(len(sig) - 1):
        a, ap = 1 / (1 + sig[i] ** 2), 1 / (1 + sig[i + 1] ** 2)
        t = torch.full((B,), proc.t_of_sigma(sig[i]), dtype=torch.float64)
        e = model(xt, t)
        x0 = (xt - math.sqrt(1 - a) * e) / math.sqrt(a)
        std = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        xt = math.sqrt(ap) * x0 + math.sqrt(1 - ap - std ** 2) * e
        if eta > 0:
            xt = xt + std * _z(i)
    _close(x, xt)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_posterior_formula(variance_type):
    """Ho et al. 2020 eqs. 6-7: mean c0 x0 + ct x_t, variance beta_tilde or beta."""
    proc = pe.processes.VP.discrete("linear")
    sig = pe.schedules.vp_discrete(proc, 8, "leading", steps_offset=0)
    x, sp = _run(proc, "ddpm", sig, prediction="epsilon", variance_type=variance_type)
    model = _vp_eps(proc)
    xt, draw = _noise() * sp.init_noise_scale, 0
    for i in range(len(sig) - 1):
        a, ap = 1 / (1 + sig[i] ** 2), 1 / (1 + sig[i + 1] ** 2)
        tval = proc.t_of_sigma(sig[i])
        e = model(xt, torch.full((B,), tval, dtype=torch.float64))
        x0 = (xt - math.sqrt(1 - a) * e) / math.sqrt(a)
        beta = 1 - a / ap
        mean = math.sqrt(ap) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - ap) / (1 - a) * xt
        var = (1 - ap) / (1 - a) * beta if variance_type == "fixed_small" else beta
        xt = mean
        if tval > 0:
            xt = xt + math.sqrt(max(var, 1e-20)) * _z(draw)
            draw += 1
    _close(x, xt)


def test_ddim_inversion_formula_and_roundtrip():
    proc = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    up = pe.schedules.vp_discrete(proc, 25, "leading", final="sigma_min")[::-1].copy()
    data = GMM.sample(B, torch.Generator().manual_seed(2)) * proc.s_of_sigma(up[0])
    inv = pe.Sampler(proc, "ddim_inverse", sigmas=up, prediction="epsilon")
    lat = inv.sample(_vp_eps(proc), data)
    # independent statement: x' = sqrt(a') x0 + sqrt(1 - a') eps, stepping upward
    model, xt = _vp_eps(proc), data.clone()
    for i in range(len(up) - 1):
        a, an = 1 / (1 + up[i] ** 2), 1 / (1 + up[i + 1] ** 2)
        e = model(xt, torch.full((B,), proc.t_of_sigma(up[i]), dtype=torch.float64))
        x0 = (xt - math.sqrt(1 - a) * e) / math.sqrt(a)
        xt = math.sqrt(an) * x0 + math.sqrt(1 - an) * e
    _close(lat, xt)
    # invert-then-sample returns the data up to discretization error, which falls at first
    # order: measured 0.138 at 25 steps, 0.051 at 100 on this mixture (ratio 2.7 for 4x steps)
    errs = []
    for n in (25, 100):
        grid = pe.schedules.vp_discrete(proc, n, "leading", final="sigma_min")[::-1].copy()
        lat = pe.Sampler(proc, "ddim_inverse", sigmas=grid, prediction="epsilon").sample(
            model, data)
        back = pe.Sampler(proc, "ddim", sigmas=grid[::-1].copy(), prediction="epsilon",
                          init_noise_scale=1.0).sample(model, lat)
        errs.append((back - data).abs().max().item())
    assert errs[1] < errs[0] / 2.0, errs


def test_euler_equals_ddim_when_deterministic():
    """With eta = 0, DDIM and Euler are the same update in x_hat (a known identity)."""
    proc = pe.processes.VP.discrete("linear")
    a, _ = _run(proc, "ddim", SIGMAS, prediction="epsilon")
    b, _ = _run(proc, "euler", SIGMAS, prediction="epsilon")
    _close(a, b)


def test_plan_coefficients_are_float64_and_counted():
    sp = pe.Sampler(pe.processes.EDM(), "heun", 10)
    assert sp.nfe == 2 * 10 - 1          # Euler on the step to sigma 0
    for op in sp.plan.updates:
        assert op.coefs.dtype == np.float64 and len(op.bufs) <= pe.plan.K_MAX


def test_ancestral_step_refuses_upward_steps_and_bad_eta():
    """sigma_next > sigma gave a math domain error (a complex number in k-diffusion's form)."""
    from pyengine.solvers._common import ancestral_step
    g = np.random.default_rng(4)
    sigma = float(g.uniform(0.5, 3.0))
    down, up = ancestral_step(sigma, 0.7 * sigma, 1.0)
    assert down ** 2 + up ** 2 == pytest.approx((0.7 * sigma) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_next <= sigma"):
        ancestral_step(sigma, 1.5 * sigma)
    for eta in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            ancestral_step(sigma, 0.5 * sigma, eta)
