"""Every forward process against an independent closed form.

The canonical form is x_t = s(t) (x0 + sigma(t) eps). Each test restates the process the way
its paper does (a beta table and a loop product for DDPM, the integral of beta(t) for the
score_sde SDEs, x_t = (1 - t) x0 + t eps for rectified flow, ...) and checks pyengine's
s / sigma / inverse functions against that statement, not against pyengine's own formulas.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import pyengine as pe
from pyengine import processes as P

N_TRAIN = 1000


# ---------------------------------------------------------------------------------------
# Independent statements of the beta tables (loops, no numpy vector tricks)
# ---------------------------------------------------------------------------------------


def betas_linear(n, b0, b1):
    return [b0 + (b1 - b0) * i / (n - 1) for i in range(n)]


def betas_scaled_linear(n, b0, b1):
    r0, r1 = math.sqrt(b0), math.sqrt(b1)
    return [(r0 + (r1 - r0) * i / (n - 1)) ** 2 for i in range(n)]


def cosine_abar(u):
    """Nichol & Dhariwal 2021 eq. 17, s = 0.008 (not normalized by f(0))."""
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_cosine(n):
    return [min(1 - cosine_abar((i + 1) / n) / cosine_abar(i / n), 0.999) for i in range(n)]


def loop_cumprod(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


def vp_discrete_cases():
    return [
        ("linear", dict(beta_start=1e-4, beta_end=2e-2), betas_linear(N_TRAIN, 1e-4, 2e-2)),
        ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012),
         betas_scaled_linear(N_TRAIN, 0.00085, 0.012)),
        ("squaredcos_cap_v2", {}, betas_cosine(N_TRAIN)),
    ]


@pytest.mark.parametrize("schedule,kw,betas", vp_discrete_cases(),
                         ids=[c[0] for c in vp_discrete_cases()])
def test_vp_discrete_tables(schedule, kw, betas):
    proc = pe.processes.VP.discrete(schedule, num_train_timesteps=N_TRAIN, **kw)
    betas = np.array(betas)
    abar = loop_cumprod(betas)
    np.testing.assert_allclose(proc.betas, betas, rtol=1e-13, atol=0)
    np.testing.assert_allclose(proc.alphas_cumprod, abar, rtol=1e-12, atol=0)
    np.testing.assert_allclose(proc.sigmas, np.sqrt((1 - abar) / abar), rtol=1e-12)
    assert proc.num_train_timesteps == N_TRAIN
    assert proc.sigma_min == pytest.approx(math.sqrt((1 - abar[0]) / abar[0]), rel=1e-12)
    assert proc.sigma_max == pytest.approx(math.sqrt((1 - abar[-1]) / abar[-1]), rel=1e-12)


def test_cosine_alpha_bar_telescopes():
    # Below the 0.999 cap, prod (1 - beta_i) telescopes to f((i + 1) / N) / f(0).
    proc = pe.processes.VP.discrete("cosine", num_train_timesteps=N_TRAIN)
    capped = proc.betas >= 0.999 - 1e-15
    first_cap = int(np.argmax(capped)) if capped.any() else N_TRAIN
    closed = np.array([cosine_abar((i + 1) / N_TRAIN) / cosine_abar(0.0)
                       for i in range(first_cap)])
    np.testing.assert_allclose(proc.alphas_cumprod[:first_cap], closed, rtol=1e-10)
    assert np.all(proc.betas <= 0.999)


def test_vp_discrete_user_table():
    g = np.random.default_rng(3)
    betas = np.sort(g.uniform(1e-4, 0.05, size=37))
    proc = pe.processes.VP.discrete(trained_betas=betas)
    assert proc.num_train_timesteps == 37
    np.testing.assert_array_equal(proc.betas, betas)
    np.testing.assert_allclose(proc.alphas_cumprod, loop_cumprod(betas), rtol=1e-13)


@pytest.mark.parametrize("bad", [[0.1], [0.1, 0.0, 0.2], [0.1, 1.0], [0.1, float("nan")],
                                 [0.1, -0.2]])
def test_vp_discrete_user_table_rejected(bad):
    with pytest.raises(ValueError, match="trained_betas"):
        pe.processes.VP.discrete(trained_betas=bad)


def test_vp_discrete_bad_arguments():
    with pytest.raises(ValueError, match="beta_schedule"):
        pe.processes.VP.discrete("quadratic_typo")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        pe.processes.VP.discrete("linear", num_train_timesteps=1)
    with pytest.raises(ValueError, match="betas"):
        pe.processes.VP.discrete("linear", beta_start=0.5, beta_end=1.5)


@pytest.mark.parametrize("schedule,kw", [("linear", dict(beta_start=1e-4, beta_end=2e-2)),
                                         ("scaled_linear", dict(beta_start=0.00085,
                                                                beta_end=0.012)),
                                         ("squaredcos_cap_v2", {})])
def test_vp_discrete_matches_diffusers_tables(schedule, kw):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(num_train_timesteps=N_TRAIN, beta_schedule=schedule, **kw)
    proc = pe.processes.VP.discrete(schedule, num_train_timesteps=N_TRAIN, **kw)
    # diffusers keeps its tables in float32: agreement to float32 rounding.
    np.testing.assert_allclose(proc.betas, sch.betas.double().numpy(), rtol=2e-6, atol=0)
    np.testing.assert_allclose(proc.alphas_cumprod, sch.alphas_cumprod.double().numpy(),
                               rtol=2e-5, atol=0)


def test_vp_discrete_interpolation_and_inverse():
    proc = pe.processes.VP.discrete("linear", num_train_timesteps=N_TRAIN)
    ls = np.log(proc.sigmas)
    # integer timesteps hit the table exactly; fractional ones interpolate log sigma linearly
    for t in (0, 1, 17, 500, 999):
        assert proc.sigma_of_t(t) == pytest.approx(proc.sigmas[t], rel=1e-14)
        assert proc.t_of_sigma(proc.sigmas[t]) == t
    for t in (0.25, 17.5, 998.9):
        lo = int(math.floor(t))
        w = t - lo
        want = math.exp((1 - w) * ls[lo] + w * ls[lo + 1])
        assert proc.sigma_of_t(t) == pytest.approx(want, rel=1e-13)
        assert proc.t_of_sigma(want) == pytest.approx(t, abs=1e-9)
    sig = np.exp(np.linspace(math.log(proc.sigma_min), math.log(proc.sigma_max), 101))
    np.testing.assert_allclose(proc.sigma_of_t(proc.t_of_sigma(sig)), sig, rtol=1e-12)
    with pytest.raises(ValueError, match="t must lie"):
        proc.sigma_of_t(1000.0)
    with pytest.raises(ValueError, match="t must lie"):
        proc.sigma_of_t(-0.5)


# ---------------------------------------------------------------------------------------
# x_t = s (x0 + sigma eps) against each paper's own statement of x_t
# ---------------------------------------------------------------------------------------


def _xt_canonical(proc, t, x0, eps):
    return proc.s_of_t(t) * (x0 + proc.sigma_of_t(t) * eps)


def test_vp_discrete_xt_identity():
    proc = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = loop_cumprod(betas_scaled_linear(N_TRAIN, 0.00085, 0.012))
    g = np.random.default_rng(0)
    x0, eps = g.normal(size=8), g.normal(size=8)
    for t in (0, 10, 400, 999):
        ddpm = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps     # Ho 2020 eq. 4
        np.testing.assert_allclose(_xt_canonical(proc, t, x0, eps), ddpm, rtol=1e-12, atol=1e-14)


def _int_beta(t, b0, b1):
    """int_0^t beta(u) du for beta(u) = b0 + u (b1 - b0), by quadrature."""
    from scipy.integrate import quad
    return quad(lambda u: b0 + u * (b1 - b0), 0.0, t, epsabs=1e-13, epsrel=1e-12)[0]


@pytest.mark.parametrize("b0,b1", [(0.1, 20.0), (0.05, 12.0)])
def test_vp_continuous_against_integral_of_beta(b0, b1):
    proc = pe.processes.VP.continuous(beta_min=b0, beta_max=b1)
    g = np.random.default_rng(1)
    x0, eps = g.normal(size=6), g.normal(size=6)
    for t in (1e-3, 0.01, 0.3, 0.77, 1.0):
        abar = math.exp(-_int_beta(t, b0, b1))
        assert proc.s_of_t(t) == pytest.approx(math.sqrt(abar), rel=1e-12)
        assert proc.s_of_t(t) * proc.sigma_of_t(t) == pytest.approx(math.sqrt(1 - abar), rel=1e-11)
        # score_sde VPSDE.marginal_prob: mean sqrt(abar) x0, std sqrt(1 - abar)
        np.testing.assert_allclose(_xt_canonical(proc, t, x0, eps),
                                   math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps,
                                   rtol=1e-11, atol=1e-14)
    assert proc.sigma_min == pytest.approx(proc.sigma_of_t(1e-3), rel=1e-15)
    assert proc.sigma_max == pytest.approx(proc.sigma_of_t(1.0), rel=1e-15)


def test_sub_vp_against_integral_of_beta():
    b0, b1 = 0.1, 20.0
    proc = pe.processes.VP.sub_vp(beta_min=b0, beta_max=b1)
    g = np.random.default_rng(2)
    x0, eps = g.normal(size=6), g.normal(size=6)
    for t in (1e-3, 0.05, 0.5, 1.0):
        abar = math.exp(-_int_beta(t, b0, b1))
        # score_sde subVPSDE.marginal_prob: mean sqrt(abar) x0, std 1 - abar
        np.testing.assert_allclose(_xt_canonical(proc, t, x0, eps),
                                   math.sqrt(abar) * x0 + (1 - abar) * eps,
                                   rtol=1e-11, atol=1e-14)
        sg = (1 - abar) / math.sqrt(abar)
        assert proc.s_of_sigma(sg) == pytest.approx(math.sqrt(abar), rel=1e-12)
        assert proc.t_of_sigma(sg) == pytest.approx(t, rel=1e-10)


def test_ve_and_edm():
    ve = pe.processes.VE(sigma_min=0.01, sigma_max=50.0)
    for t in (0.0, 0.2, 0.5, 1.0):
        assert ve.sigma_of_t(t) == pytest.approx(0.01 * 5000.0 ** t, rel=1e-13)
        assert ve.s_of_t(t) == 1.0
        assert ve.t_of_sigma(ve.sigma_of_t(t)) == pytest.approx(t, abs=1e-13)
    assert ve.prior_std(50.0) == pytest.approx(50.0)
    edm = pe.processes.EDM()
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0.002, 80.0, 0.5)
    assert edm.time_kind == "sigma"
    for sg in (0.002, 0.3, 80.0):
        assert edm.sigma_of_t(sg) == sg and edm.t_of_sigma(sg) == sg
        assert edm.model_time(sg) == sg and edm.s_of_sigma(sg) == 1.0
    assert edm.prior_std(80.0) == pytest.approx(80.0)
    with pytest.raises(ValueError):
        pe.processes.VE(sigma_min=1.0, sigma_max=0.5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow(shift):
    proc = pe.processes.RectifiedFlow(shift=shift, time_scale=1000.0)
    g = np.random.default_rng(4)
    x0, eps = g.normal(size=5), g.normal(size=5)
    for t in (0.01, 0.3, 0.5, 0.9):
        np.testing.assert_allclose(_xt_canonical(proc, t, x0, eps), (1 - t) * x0 + t * eps,
                                   rtol=1e-13, atol=1e-15)
        sg = proc.sigma_of_t(t)
        assert proc.t_of_sigma(sg) == pytest.approx(t, rel=1e-14)
        assert proc.model_time(sg) == pytest.approx(1000.0 * t, rel=1e-13)
        assert proc.sigma_of_model_time(1000.0 * t) == pytest.approx(sg, rel=1e-13)
        # SD3's timestep shift, as FlowMatchEulerDiscreteScheduler writes it
        assert proc.warp(t) == pytest.approx(shift * t / (1 + (shift - 1) * t), rel=1e-14)
        # unit-variance data: Var x_t = (1 - t)^2 + t^2
        assert proc.prior_std(sg) == pytest.approx(math.sqrt((1 - t) ** 2 + t ** 2), rel=1e-13)
    with pytest.raises(ValueError, match="shift"):
        pe.processes.RectifiedFlow(shift=0.0)


# ---------------------------------------------------------------------------------------
# Shared contracts of every process
# ---------------------------------------------------------------------------------------




def _prior_var(proc, sg):
    """Var of x = s (x0 + sigma eps) for unit-variance x0, in each family's own words."""
    if isinstance(proc, (P.VE,)):
        return sg ** 2                              # VE/EDM prior N(0, sigma_max^2)
    if isinstance(proc, P.SubVP):
        t = proc.t_of_sigma(sg)
        abar = math.exp(-_int_beta(t, proc.beta_min, proc.beta_max))
        return abar + (1 - abar) ** 2
    if isinstance(proc, P.RectifiedFlow):
        t = sg / (1 + sg)
        return (1 - t) ** 2 + t ** 2
    return 1.0                                      # VP: abar + (1 - abar)


@pytest.mark.parametrize("name", list(P.NAMED))
def test_process_contracts(name):
    proc = P.named(name)
    assert isinstance(proc, P.Process)
    assert 0 < proc.sigma_min < proc.sigma_max < math.inf
    sig = np.exp(np.linspace(math.log(proc.sigma_min), math.log(proc.sigma_max), 33))
    # inverses round-trip over the trained range
    t = proc.t_of_sigma(sig)
    np.testing.assert_allclose(proc.sigma_of_t(t), sig, rtol=1e-10)
    np.testing.assert_allclose(proc.sigma_of_model_time(proc.model_time(sig)), sig, rtol=1e-10)
    np.testing.assert_allclose(proc.s_of_t(t), proc.s_of_sigma(sig), rtol=1e-10)
    # time runs forward: sigma increases with t
    assert np.all(np.diff(t) > 0)
    # DPM-Solver notation: alpha = s, sigma_dpm = s sigma, lambda = log(alpha / sigma_dpm)
    # = -log sigma
    alpha, sd = proc.alpha_sigma_dpm(sig)
    np.testing.assert_allclose(np.log(alpha / sd), -np.log(sig), rtol=1e-12, atol=1e-12)
    # scalar in, float out; array in, array out
    assert isinstance(proc.s_of_sigma(float(sig[3])), float)
    assert isinstance(proc.t_of_sigma(float(sig[3])), float)
    assert np.shape(proc.s_of_sigma(sig)) == sig.shape
    for sg in (float(sig[0]), float(sig[16]), float(sig[-1])):
        assert proc.prior_std(sg) == pytest.approx(math.sqrt(_prior_var(proc, sg)), rel=1e-9)
    assert repr(proc)


def test_named_processes():
    assert {"vp", "edm", "flow"} <= set(P.NAMED)
    for name in P.NAMED:
        assert P.named(name) is not P.named(name)          # a fresh one each time
        assert P.describe(name)
    with pytest.raises(ValueError, match=r"unknown process 'nope'; known: vp"):
        P.named("nope")


# ---------------------------------------------------------------------------------------
# the Gaussian-mixture model takes a time per sample
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(P.NAMED))
@pytest.mark.parametrize("prediction", pe.parameterization.PREDICTIONS)
def test_gmm_model_times_per_sample(name, prediction):
    """A batch with a different noise level per sample gives each sample what a call with its
    own time alone gives (issue 13 #4: the first sample's time was used for the batch)."""
    import torch
    proc = P.named(name)
    gmm = pe.models.GaussianMixture.random(d=5, M=3, seed=3)
    model = gmm.as_model(proc, prediction)
    g = torch.Generator().manual_seed(11)
    B = 7
    sig = np.exp(np.random.default_rng(2).uniform(math.log(proc.sigma_min),
                                                  math.log(proc.sigma_max), B))
    t = torch.from_numpy(np.asarray(proc.model_time(sig), dtype=np.float64))
    x = torch.randn(B, 5, generator=g, dtype=torch.float64) * torch.from_numpy(
        np.asarray(proc.prior_std(sig), dtype=np.float64)).view(-1, 1)
    batched = model(x, t)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(B)])
    torch.testing.assert_close(batched, alone, rtol=1e-12, atol=1e-12)
    # one time for the whole batch: a number, a 0-d tensor, a 1-element tensor
    for t0 in (float(t[3]), t[3], t[3:4]):
        torch.testing.assert_close(model(x, t0), model(x, t[3].expand(B)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per sample"):
        model(x, t[:2])
