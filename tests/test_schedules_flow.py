"""Flow-matching shifts, ComfyUI's schedulers and the sigma-list helpers, each against an
independent float64 statement of its formula, and against diffusers' own sigmas.

Formulas read from (read, not copied): diffusers
``schedulers/scheduling_flow_match_euler_discrete.py`` (FlowMatchEulerDiscreteScheduler
.__init__, .set_timesteps, ._time_shift_exponential, ._time_shift_linear,
.stretch_shift_to_terminal, ._convert_to_karras/_exponential/_beta), diffusers
``pipelines/flux/pipeline_flux.py`` (calculate_shift) and ``pipelines/flux2/pipeline_flux2.py``
(compute_empirical_mu); ComfyUI ``comfy/samplers.py`` (simple_scheduler, ddim_scheduler,
normal_scheduler, beta_scheduler, linear_quadratic_schedule, kl_optimal_scheduler),
``comfy/model_sampling.py`` (ModelSamplingDiscrete, ModelSamplingDiscreteFlow,
ModelSamplingFlux, time_snr_shift, flux_time_shift),
``comfy_extras/nodes_align_your_steps.py`` and ``comfy_extras/nodes_custom_sampler.py``
(SplitSigmas, SplitSigmasDenoise, FlipSigmas).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import pyengine as pe
from pyengine import schedules as S

scipy_stats = pytest.importorskip("scipy.stats")


def _sd15_table():
    """SD 1.5's discrete table sqrt((1 - alpha_bar) / alpha_bar), scaled-linear betas."""
    b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = np.cumprod(1.0 - b)
    return np.sqrt((1.0 - ac) / ac)


def _shift(t, a):
    return a * t / (1 + (a - 1) * t)


# ---------------------------------------------------------------------------------------
# shifts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [1.0, 1.73, 3.0, 0.5])
def test_time_snr_shift_scales_the_snr(a):
    rng = np.random.default_rng(3)
    t = np.sort(rng.random(37))
    got = S.time_snr_shift(t, a)
    for ti, gi in zip(t, got):
        assert gi == pytest.approx(a * ti / (1 + (a - 1) * ti), rel=1e-14)
    # the SNR ((1 - t)/t)^2 is divided by a^2
    np.testing.assert_allclose(((1 - got) / got) ** 2 * a * a, ((1 - t) / t) ** 2, rtol=1e-11)
    assert S.FLOW_SHIFTS == {"sd3": 3.0, "auraflow": 1.73}


@pytest.mark.parametrize("mu,e", [(0.5, 1.0), (1.15, 1.0), (-0.3, 2.0)])
def test_dynamic_shifts(mu, e):
    t = np.linspace(0.013, 1.0, 41)
    exp_ = S.time_shift_exponential(t, mu, e)
    lin = S.time_shift_linear(t, abs(mu), e)
    for ti, g1, g2 in zip(t, exp_, lin):
        r = (1.0 / ti - 1.0) ** e
        assert g1 == pytest.approx(math.exp(mu) / (math.exp(mu) + r), rel=1e-13)
        assert g2 == pytest.approx(abs(mu) / (abs(mu) + r), rel=1e-13)
    # exponential with sigma_exp = 1 is the static shift by e^mu
    np.testing.assert_allclose(S.time_shift_exponential(t, mu), S.time_snr_shift(t, math.exp(mu)),
                               rtol=1e-13)
    assert S.time_shift_exponential(0.0, mu) == 0.0


def test_terminal_stretch_and_mu():
    t = S.time_snr_shift(np.linspace(1, 0.02, 9), 2.0)
    st = S.stretch_to_terminal(t, 0.1)
    assert st[-1] == pytest.approx(0.1, rel=1e-14)
    assert st[0] == 1.0
    np.testing.assert_allclose((1 - st[1:]) / (1 - t[1:]), (1 - 0.1) / (1 - t[-1]), rtol=1e-14)
    # calculate_shift: the line through (256, 0.5) and (4096, 1.15)
    assert S.flow_mu(256) == pytest.approx(0.5)
    assert S.flow_mu(4096) == pytest.approx(1.15)
    assert S.flow_mu(1000, 1024, 4096, 0.95, 2.05) == pytest.approx(
        0.95 + (1000 - 1024) * (2.05 - 0.95) / (4096 - 1024))
    # Flux 2: above 4300 tokens the 200-step line, else interpolation of the 10 and 200 lines
    assert S.flux2_mu(5000, 28) == pytest.approx(0.00016927 * 5000 + 0.45666666)
    m10 = 8.73809524e-05 * 1024 + 1.89833333
    m200 = 0.00016927 * 1024 + 0.45666666
    assert S.flux2_mu(1024, 10) == pytest.approx(m10, rel=1e-12)
    assert S.flux2_mu(1024, 200) == pytest.approx(m200, rel=1e-12)


FM_CONFIGS = [
    {},
    {"shift": 3.0},
    {"shift": 1.73},
    {"use_dynamic_shifting": True, "mu": 0.83},
    {"use_dynamic_shifting": True, "mu": 1.4, "time_shift_type": "linear"},
    {"shift": 3.0, "shift_terminal": 0.1},
    {"use_dynamic_shifting": True, "mu": 0.7, "shift_terminal": 0.02},
    {"shift": 3.0, "invert_sigmas": True},
    {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 2.0, "use_exponential_sigmas": True},
    {"shift": 3.0, "use_beta_sigmas": True},
]


def _pe_kwargs(cfg):
    c = dict(cfg)
    return dict(shift=c.get("shift", 1.0), mu=c.get("mu"),
                time_shift_type=c.get("time_shift_type", "exponential"),
                shift_terminal=c.get("shift_terminal"), invert=c.get("invert_sigmas", False),
                spacing=("karras" if c.get("use_karras_sigmas") else
                         "exponential" if c.get("use_exponential_sigmas") else
                         "beta" if c.get("use_beta_sigmas") else None))


@pytest.mark.parametrize("n", [2, 7, 28])
@pytest.mark.parametrize("cfg", FM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
                         or "default")
def test_flow_match_sigmas_match_diffusers(n, cfg):
    diffusers = pytest.importorskip("diffusers")
    c = dict(cfg)
    mu = c.pop("mu", None)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(**c)
    sch.set_timesteps(n, mu=mu)
    want = sch.sigmas.double().numpy()
    got = S.flow_match_sigmas(n, **_pe_kwargs(cfg))
    assert got.dtype == np.float64 and got.shape == want.shape
    # diffusers computes in float32: agreement to its rounding
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7)


def test_flow_match_sigmas_closed_form_and_custom_list():
    n, a = 11, 3.0
    got = S.flow_match_sigmas(n, shift=a)
    t_min = _shift(1 / 1000, a)            # the scheduler's sigma_min is already shifted
    for i in range(n):
        u = 1.0 + i * (t_min - 1.0) / (n - 1)
        assert got[i] == pytest.approx(_shift(u, a), rel=1e-13)
    assert got[-1] == 0.0
    custom = [1.0, 0.75, 0.5, 0.25]          # a pipeline's sigmas=linspace(1, 1/n, n)
    np.testing.assert_allclose(S.flow_match_sigmas(sigmas=custom, mu=0.9)[:-1],
                               [math.exp(0.9) / (math.exp(0.9) + 1 / u - 1) for u in custom],
                               rtol=1e-13)


def test_flow_sigma_conversions():
    t = np.array([0.999, 0.7, 0.3, 0.01, 0.0])
    s = S.flow_to_sigma(t)
    np.testing.assert_allclose(s, t / (1 - t), rtol=1e-15)
    np.testing.assert_allclose(S.sigma_to_flow(s), t, rtol=1e-14)
    assert S.sigma_to_flow(np.inf) == 1.0
    with pytest.raises(ValueError, match="sigmas"):
        S.flow_to_sigma([1.0, 0.5, 0.0])


@pytest.mark.parametrize("bad,match", [
    (dict(shift=0.0), "shift"), (dict(shift=-1.0), "shift"), (dict(shift=float("nan")), "shift"),
    (dict(mu=0.5, time_shift_type="cubic"), "time_shift_type"),
    (dict(mu=-0.5, time_shift_type="linear"), "mu"),
    (dict(shift_terminal=1.5), "shift_terminal"), (dict(spacing="linear"), "spacing"),
])
def test_flow_match_sigmas_errors_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=match):
        S.flow_match_sigmas(8, **bad)
    with pytest.raises(ValueError, match="n"):
        S.flow_match_sigmas(0)
    with pytest.raises(ValueError, match="sigmas"):
        S.flow_match_sigmas(sigmas=[1.2, 0.5])


# ---------------------------------------------------------------------------------------
# ComfyUI's model sampling and schedulers
# ---------------------------------------------------------------------------------------


def _tables():
    return {"sd15": S.ModelSampling.discrete(_sd15_table()),
            "flow3": S.ModelSampling.flow_shift(3.0),
            "flux": S.ModelSampling.flux(S.flow_mu(4096 * 1.3))}


def test_model_sampling_tables():
    ms = _tables()
    np.testing.assert_array_equal(ms["sd15"].sigmas, _sd15_table())
    k = np.arange(1, 1001) / 1000
    np.testing.assert_allclose(ms["flow3"].sigmas, _shift(k, 3.0), rtol=1e-15)
    mu = S.flow_mu(4096 * 1.3)
    k = np.arange(1, 10001) / 10000
    np.testing.assert_allclose(ms["flux"].sigmas, np.exp(mu) / (np.exp(mu) + 1 / k - 1),
                               rtol=1e-14)
    # discrete timestep: nearest table index in log sigma; sigma: log-linear between entries
    d = ms["sd15"]
    assert d.timestep(d.sigmas[417] * 1.0001) == 417
    assert d.sigma(417.25) == pytest.approx(
        math.exp(0.75 * math.log(d.sigmas[417]) + 0.25 * math.log(d.sigmas[418])), rel=1e-14)
    assert ms["flow3"].percent_to_sigma(0.2) == pytest.approx(_shift(0.8, 3.0))
    assert ms["flow3"].flow and not d.flow


@pytest.mark.parametrize("steps", [1, 4, 9, 30])
@pytest.mark.parametrize("kind", ["sd15", "flow3", "flux"])
def test_simple_ddim_uniform_normal(steps, kind):
    ms = _tables()[kind]
    tab = ms.sigmas
    N = tab.size
    got = S.simple(ms, steps)
    want = [tab[N - 1 - math.floor(i * N / steps)] for i in range(steps)] + [0.0]
    np.testing.assert_allclose(got, want, rtol=1e-15)

    got = S.ddim_uniform(ms, steps)
    stride = max(N // steps, 1)
    want = sorted((tab[j] for j in range(1, N, stride)), reverse=True) + [0.0]
    np.testing.assert_allclose(got, want, rtol=1e-15)

    # normal: sigma(t) at t uniform between the end levels' model times
    got = S.normal(ms, steps)
    t0, t1 = ms.timestep(ms.sigma_max), ms.timestep(ms.sigma_min)
    ts = [t0 + i * (t1 - t0) / (steps - 1) if steps > 1 else t0 for i in range(steps)]
    if kind == "sd15":
        want = [math.exp(np.interp(t, np.arange(N), np.log(tab))) for t in ts]
    elif kind == "flow3":
        want = [_shift(t / 1000, 3.0) for t in ts]
    else:
        mu = S.flow_mu(4096 * 1.3)
        want = [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in ts]
    np.testing.assert_allclose(got, want + [0.0], rtol=1e-12)
    # sgm_uniform: steps + 1 uniform times, the last dropped
    got = S.sgm_uniform(ms, steps)
    ts = [t0 + i * (t1 - t0) / steps for i in range(steps)]
    np.testing.assert_allclose(got[:-1], ms.sigma(np.array(ts)), rtol=1e-12)
    assert got[-1] == 0.0 and got.size == steps + 1


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_beta_linear_quadratic_kl_optimal(steps):
    ms = _tables()["sd15"]
    tab = ms.sigmas
    got = S.beta(ms, steps, 0.6, 0.6)
    idx = [round(scipy_stats.beta.ppf(1 - i / steps, 0.6, 0.6) * (tab.size - 1))
           for i in range(steps)]
    dedup = [j for k, j in enumerate(idx) if k == 0 or j != idx[k - 1]]
    np.testing.assert_allclose(got, [tab[j] for j in dedup] + [0.0], rtol=1e-15)

    got = S.linear_quadratic(ms, steps)
    if steps == 1:
        np.testing.assert_allclose(got, [ms.sigma_max, 0.0])
    else:
        L, tn = steps // 2, 0.025
        # linear to tn over L steps, then the quadratic through (L, tn) with slope tn/L
        # that reaches 1 at `steps`
        q = steps - L
        A = (1 - tn - tn / L * q) / (q * q)
        f = [i * tn / L if i < L else tn + tn / L * (i - L) + A * (i - L) ** 2
             for i in range(steps)] + [1.0]
        np.testing.assert_allclose(got, (1 - np.array(f)) * ms.sigma_max, rtol=1e-12,
                                   atol=1e-12)

    got = S.kl_optimal(steps, 0.03, 14.6)
    for i in range(steps):
        r = i / (steps - 1) if steps > 1 else 0.0
        assert got[i] == pytest.approx(math.tan((1 - r) * math.atan(14.6)
                                                + r * math.atan(0.03)), rel=1e-13)
    assert got[-1] == 0.0


def test_align_your_steps():
    got = S.align_your_steps("SDXL", 10)
    np.testing.assert_allclose(got[:-1], S.AYS_LEVELS["SDXL"][:-1], rtol=0)
    assert got[-1] == 0.0
    # 16 steps: log-linear interpolation of the 11 levels, ends kept
    got = S.align_your_steps("SD1", 16)
    lv = np.log(S.AYS_LEVELS["SD1"])
    for i in range(16):
        x = i * 10 / 16
        k = min(int(x), 9)
        want = math.exp(lv[k] + (x - k) * (lv[k + 1] - lv[k]))
        assert got[i] == pytest.approx(want, rel=1e-12)
    assert got.size == 17 and got[-1] == 0.0
    # denoise keeps the last round(steps * denoise) steps
    np.testing.assert_array_equal(S.align_your_steps("SVD", 12, 0.5),
                                  S.align_your_steps("SVD", 12)[-7:])
    with pytest.raises(ValueError, match="model_type"):
        S.align_your_steps("SD3", 10)


def test_split_flip_truncate():
    rng = np.random.default_rng(11)
    s = np.concatenate([np.sort(rng.random(12) * 10)[::-1], [0.0]])
    hi, lo = S.split_at(s, 5)
    np.testing.assert_array_equal(hi, s[:6])
    np.testing.assert_array_equal(lo, s[5:])
    hi, lo = S.split_denoise(s, 0.25)
    assert lo.size - 1 == round(12 * 0.25) and hi[-1] == lo[0] and hi.size + lo.size == 14
    f = S.flip(s)
    assert f[0] == 1e-4 and np.all(np.diff(f) > 0) and f[-1] == s[0]
    S.validate(f, increasing=True)
    t = S.truncate_denoise(lambda n: S.karras(n, 0.03, 14.6), 8, 0.4)
    np.testing.assert_array_equal(t, S.karras(20, 0.03, 14.6)[-9:])
    with pytest.raises(ValueError, match="step"):
        S.split_at(s, -1)
    with pytest.raises(ValueError, match="denoise"):
        S.split_denoise(s, 1.5)
    with pytest.raises(ValueError, match="sigmas"):
        S.flip(np.ones((2, 3)))


@pytest.mark.parametrize("name", ["simple", "normal", "sgm_uniform", "ddim_uniform", "beta",
                                  "linear_quadratic", "kl_optimal"])
@pytest.mark.parametrize("proc", ["vp", "flow", "edm"])
def test_comfy_schedules_through_get_sigmas(name, proc):
    p = {"vp": pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012),
         "flow": pe.processes.RectifiedFlow(shift=3.0),
         "edm": pe.processes.EDM()}[proc]
    s = S.get_sigmas(name, p, 9)
    assert s[-1] == 0 and np.all(np.diff(s) < 0)
    ms = S.model_sampling_for(p)
    lv = S.COMFY_SCHEDULERS[name](ms, 9)
    if proc == "flow":
        lv = np.where(lv >= 1, 3.0 * (1 - 1e-4) / (1 + 2.0 * (1 - 1e-4)), lv)
        np.testing.assert_allclose(s, lv / (1 - lv), rtol=1e-14)
        # large step counts keep a strictly decreasing grid after the offset
        assert np.all(np.diff(S.get_sigmas(name, p, 999)) < 0)
    else:
        np.testing.assert_allclose(s, lv, rtol=0)


# ---------------------------------------------------------------------------------------
# issue 13 #12: schedule input errors name the argument
# ---------------------------------------------------------------------------------------


def test_karras_rho_and_sigma_list_errors():
    torch = pytest.importorskip("torch")
    for rho in (0, 0.0, -7.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rho"):
            S.karras(10, 0.03, 14.6, rho=rho)
    with pytest.raises(ValueError, match="1-D"):
        S.validate(torch.ones(3, 2))
    with pytest.raises(ValueError, match="meta"):
        S.validate(torch.empty(5, device="meta"))
    with pytest.raises(ValueError, match="my_sigmas"):
        S.validate(torch.empty(5, device="meta"), name="my_sigmas")
    np.testing.assert_array_equal(S.validate(torch.tensor([2.0, 1.0, 0.0])), [2.0, 1.0, 0.0])


MS_CONFIGS = [
    ("dpm", {"flow_shift": 1.0}), ("dpm", {"flow_shift": 3.0}), ("dpm", {"flow_shift": 5.0}),
    ("unipc", {"flow_shift": 1.0}), ("unipc", {"flow_shift": 3.0}),
    ("unipc", {"flow_shift": 5.0, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"use_dynamic_shifting": True, "mu": 0.9}),
    ("unipc", {"flow_shift": 3.0, "shift_terminal": 0.05}),
]


@pytest.mark.parametrize("n", [2, 5, 20])
@pytest.mark.parametrize("style,cfg", MS_CONFIGS, ids=[f"{s}-{c}" for s, c in MS_CONFIGS])
def test_flow_sigmas_multistep_match_diffusers(n, style, cfg):
    """diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler set_timesteps with
    use_flow_sigmas (read, not copied)."""
    diffusers = pytest.importorskip("diffusers")
    cls = {"dpm": diffusers.DPMSolverMultistepScheduler,
           "unipc": diffusers.UniPCMultistepScheduler}[style]
    c = dict(cfg)
    mu = c.pop("mu", None)
    sch = cls(use_flow_sigmas=True, prediction_type="flow_prediction", **c)
    sch.set_timesteps(n, **({"mu": mu} if mu is not None else {}))
    want = sch.sigmas.double().numpy()
    got = S.flow_sigmas_multistep(n, cfg.get("flow_shift", 1.0), style=style, mu=mu,
                                  shift_terminal=cfg.get("shift_terminal"),
                                  final=cfg.get("final_sigmas_type", "zero"))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7)


def test_flow_sigmas_multistep_closed_form():
    n, a, N = 9, 3.0, 1000
    got = S.flow_sigmas_multistep(n, a)
    for i in range(n):       # reversed shifted 1 - linspace(1, 1/N, n + 1), t = 0 dropped
        u = 1 - (1 + (n - i) * (1 / N - 1) / n)
        assert got[i] == pytest.approx(_shift(u, a), rel=1e-13)
    got = S.flow_sigmas_multistep(n, a, style="unipc")
    for i in range(n):
        u = 1 + i * (1 / N - 1) / n
        want = _shift(u, a) - (1e-6 if i == 0 else 0.0)
        assert got[i] == pytest.approx(want, rel=1e-13)
    with pytest.raises(ValueError, match="style"):
        S.flow_sigmas_multistep(4, style="euler")
    with pytest.raises(ValueError, match="final"):
        S.flow_sigmas_multistep(4, final="none")


def test_flux_size_mu_ltxv_and_manual_lists():
    # ModelSamplingFlux: width * height / 256 tokens on the (256, 0.5)-(4096, 1.15) line
    assert S.flux_mu_for_size(1024, 1024) == pytest.approx(
        0.5 + (1024 * 1024 / 256 - 256) * (1.15 - 0.5) / (4096 - 256), rel=1e-14)
    with pytest.raises(ValueError, match="width"):
        S.flux_mu_for_size(0, 512)
    # LTXVScheduler: exponential shift of linspace(1, 0), stretched to the terminal
    steps, tokens = 12, 6000
    got = S.ltxv_sigmas(steps, tokens=tokens)
    mu = 0.95 + (tokens - 1024) * (2.05 - 0.95) / (4096 - 1024)
    raw = [math.exp(mu) / (math.exp(mu) + 1 / (1 - i / steps) - 1) for i in range(steps)]
    k = (1 - raw[-1]) / (1 - 0.1)
    want = [1 - (1 - r) / k for r in raw] + [0.0]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    assert got[-2] == pytest.approx(0.1) and got[0] == 1.0
    np.testing.assert_allclose(S.ltxv_sigmas(steps, tokens=tokens, stretch=False)[:-1], raw,
                               rtol=1e-13)
    np.testing.assert_array_equal(S.manual_sigmas("14.6, 7.25,3 ,1e-1, .5 0"),
                                  [14.6, 7.25, 3.0, 0.1, 0.5, 0.0])
    with pytest.raises(ValueError, match="sigmas"):
        S.manual_sigmas("none")
