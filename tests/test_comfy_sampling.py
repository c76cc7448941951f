"""ComfyUI's sampler functions in ``pyengine.sampling`` (``sample_<name>`` generated from
``pyengine.integrations.comfy_names.SAMPLERS``), called the way ComfyUI calls them: a model
wrapper that carries ComfyUI's model_sampling (``model.inner_model.model_patcher
.get_model_object("model_sampling")``; a flow model's is a CONST instance with noise_scale
and percent_to_sigma), ``model(x, sigma * s_in, **extra_args)`` returning the denoised x0, the
caller's ``noise_sampler``.

The references are float64 restatements of ComfyUI's loops (``comfy/k_diffusion/sampling.py``,
read, not copied; the per-name functions are cited in tests/test_solvers_comfy.py, whose
restatements are imported here): sample_euler, sample_euler_ancestral(_RF), sample_heun,
sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_sde, sample_ipndm, sample_lms,
res_multistep, sample_er_sde, sample_lcm, sample_ddpm (generic_step_sampler +
DDPMSampler_step), and ``comfy/extra_samplers/uni_pc.py`` for uni_pc; the SNR samplers get
ComfyUI's offset_first_sigma_for_snr and the stochastic ones s_noise * noise_scale as
ComfyUI's functions apply them. Agreement: everything float64, relative max difference
< 1e-12 (measured <= ~5e-15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine import sampling as S
from pyengine.integrations import comfy_names as C
from pyengine.models import GaussianMixture

import test_solvers_comfy as R  # noqa: E402  (the float64 restatements of ComfyUI's loops)

B, D = 3, 5
SD = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
TOL = 1e-12
FLOW_SHIFT = 3.0
NOISE_SCALE = 0.8          # the fake flow model's model_sampling.noise_scale


# ---------------------------------------------------------------------------------------
# fake ComfyUI model wrappers (ComfyUI is not installed here)
# ---------------------------------------------------------------------------------------


class CONST:
    """Stands for comfy.model_sampling.CONST (the adapter checks the class name in the MRO)."""


class FlowSampling(CONST):
    noise_scale = NOISE_SCALE

    def __init__(self):
        self._ms = pe.schedules.ModelSampling.flow_shift(FLOW_SHIFT)

    def percent_to_sigma(self, p):
        return self._ms.percent_to_sigma(p)


class EpsSampling:
    """A discrete eps model's sampling (SD's table): no CONST in its MRO, no noise_scale."""

    def __init__(self):
        self._ms = pe.schedules.ModelSampling.discrete(SD.sigmas)

    def percent_to_sigma(self, p):
        return self._ms.percent_to_sigma(p)


class _Patcher:
    def __init__(self, ms):
        self.ms = ms

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.ms


class _Inner:
    def __init__(self, ms):
        self.model_patcher = _Patcher(ms)


def denoiser(gmm, flow):
    """ComfyUI-space denoiser m(x_c, level) of a Gaussian mixture; flow levels are clamped
    below 1 so that t = 1 (pure noise) is a finite call, as for a real flow model."""
    def m(xc, c):
        c = float(c)
        if flow:
            c = min(c, 0.9995)
            return gmm.denoise(xc / (1 - c), c / (1 - c))
        return gmm.denoise(xc, c)
    return m


class FakeComfyModel:
    """ComfyUI's sampler-facing model: model(x, sigma * s_in, **extra_args) -> denoised; with
    ``uncond`` it is a CFG model (w = 3.5) that runs the post-CFG hooks of model_options."""

    def __init__(self, gmm, flow, uncond=None, w=3.5):
        self.inner_model = _Inner(FlowSampling() if flow else EpsSampling())
        self.m = denoiser(gmm, flow)
        self.mu = None if uncond is None else denoiser(uncond, flow)
        self.w, self.levels = w, []

    def __call__(self, x, sigma, model_options=None, seed=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.levels.append(float(sigma[0]))
        d = self.m(x, sigma[0])
        if self.mu is None:
            return d
        du = self.mu(x, sigma[0])
        out = du + self.w * (d - du)
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "uncond_denoised": du, "cond_denoised": d})
        return out


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(d=D, M=3, seed=11)


def levels(kind, n):
    """ComfyUI's sigmas for the kind: karras over a discrete SD table (eps), ComfyUI's
    'simple' schedule of a shift-3 flow model (starts at t = 1)."""
    if kind == "eps":
        return C.scheduler_sigmas("karras", pe.schedules.ModelSampling.discrete(SD.sigmas), n)
    return C.scheduler_sigmas("simple", pe.schedules.ModelSampling.flow_shift(FLOW_SHIFT), n)


def ref_dpmpp_2s_ancestral(m, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    """ComfyUI's sample_dpmpp_2s_ancestral(_RF); the RF form's first stage at t = 1 is
    sigma_s = 0.9999 (no half-log-SNR there), the rest as tests/test_solvers_comfy.py."""
    if not flow or sig[0] < 1:
        return R.ref_dpmpp_2s_ancestral(m, x, sig, ns, flow, eta, s_noise)
    d0 = m(x, sig[0])
    down, renoise, f = R.rf_anc(sig[0], sig[1], eta)
    if sig[1] == 0:
        return x + (x - d0) / sig[0] * (down - sig[0])
    u = (0.9999 / sig[0]) * x + (1 - 0.9999 / sig[0]) * d0
    x = (down / sig[0]) * x + (1 - down / sig[0]) * m(u, 0.9999)
    if eta > 0:
        x = f * x + ns() * s_noise * renoise
    return R.ref_dpmpp_2s_ancestral(m, x, sig[1:], ns, flow, eta, s_noise)


CASES = [   # (ComfyUI name, reference, reference kwargs, noise scaled on flow models)
    ("euler", R.ref_euler, {}, False),
    ("euler_ancestral", R.ref_euler_ancestral, {}, True),
    ("heun", R.ref_heun, {}, False),
    ("dpmpp_2m", R.ref_dpmpp_2m, {}, False),
    ("dpmpp_2m_sde", R.ref_dpmpp_2m_sde, {}, True),
    ("dpmpp_sde", R.ref_dpmpp_sde, {}, True),
    ("ipndm", R.ref_ipndm, {}, False),
    ("lms", R.ref_lms, {}, False),
    ("res_multistep", R.ref_res_multistep, {}, False),
    ("res_multistep_ancestral", R.ref_res_multistep, {"eta": 1.0}, True),
    ("er_sde", R.ref_er_sde, {}, True),
    ("lcm", R.ref_lcm, {}, False),
    ("ddpm", R.ref_ddpm, {}, False),
    # the other names with a restatement in tests/test_solvers_comfy.py
    ("ddim", R.ref_euler, {}, False),
    ("dpm_2", R.ref_dpm_2, {}, False),
    ("dpm_2_ancestral", R.ref_dpm_2_ancestral, {}, True),
    ("dpmpp_2s_ancestral", ref_dpmpp_2s_ancestral, {}, True),
    ("dpmpp_3m_sde", R.ref_dpmpp_3m_sde, {}, True),
    ("dpmpp_2m_sde_heun", R.ref_dpmpp_2m_sde, {"solver_type": "heun"}, True),
    ("heunpp2", R.ref_heunpp2, {}, False),
    ("ipndm_v", R.ref_ipndm, {"variable": True}, False),
    ("deis", R.ref_deis, {}, False),
    ("gradient_estimation", R.ref_gradient_estimation, {}, False),
    ("seeds_2", R.ref_seeds, {}, True),
    ("seeds_3", R.ref_seeds, {"rs": (1 / 3, 2 / 3), "solver_type": "phi_2"}, True),
    ("exp_heun_2_x0", R.ref_seeds, {"eta": 0.0, "s_noise": 0.0, "rs": (1.0,),
                                    "solver_type": "phi_2"}, False),
    ("exp_heun_2_x0_sde", R.ref_seeds, {"eta": 1.0, "rs": (1.0,), "solver_type": "phi_2"},
     True),
]


def _start(kind, n, seed):
    c = levels(kind, n)
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(64, B, D, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64) * (1.0 if kind == "flow" else c[0])
    return c, Z, x0


def _err(got, want):
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("n", [7, 2])
@pytest.mark.parametrize("name,ref,ref_kw,scaled", CASES, ids=[c[0] for c in CASES])
def test_matches_comfyui(gmm, kind, n, name, ref, ref_kw, scaled):
    flow = kind == "flow"
    c, Z, x0 = _start(kind, n, seed=n * 31 + len(name))
    model = FakeComfyModel(gmm, flow)
    cref = [float(v) for v in c]
    if flow and name in C.SNR_OFFSET:          # ComfyUI's offset_first_sigma_for_snr
        cref[0] = model.inner_model.model_patcher.ms.percent_to_sigma(1e-4)
    kw = dict(ref_kw)
    if flow and scaled:
        kw["s_noise"] = NOISE_SCALE * kw.get("s_noise", 1.0)
    want = ref(denoiser(gmm, flow), x0.clone(), cref, R.Noise(Z), flow, **kw)
    extra = {"noise_sampler": R.Noise(Z)} if "noise_sampler" in C.SAMPLERS[name][2] else {}
    got = getattr(S, f"sample_{name}")(model, x0.clone(), torch.tensor(c), disable=True,
                                       **extra)
    assert got.dtype == torch.float64 and got.shape == x0.shape
    err = _err(got, want)
    assert err < TOL, f"sample_{name} on {kind}: {err:.2e}"


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name,variant", [("uni_pc", "bh1"), ("uni_pc_bh2", "bh2")])
def test_uni_pc_matches_comfyui(gmm, kind, name, variant):
    flow = kind == "flow"
    c, _, x0 = _start(kind, 6, seed=5)
    want = R.ref_unipc_comfy(denoiser(gmm, flow), x0.clone(), [float(v) for v in c], variant)
    got = getattr(S, f"sample_{name}")(FakeComfyModel(gmm, flow), x0.clone(), torch.tensor(c),
                                       disable=True)
    assert _err(got, want) < TOL


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name", ["sa_solver", "sa_solver_pece"])
def test_sa_solver_matches_comfyui(gmm, kind, name):
    """ComfyUI's default stochastic interval is the model's own percent_to_sigma(0.2..0.8)."""
    flow = kind == "flow"
    c, Z, x0 = _start(kind, 12, seed=21)
    model = FakeComfyModel(gmm, flow)
    ms = model.inner_model.model_patcher.ms
    cref = [float(v) for v in c]
    if flow:
        cref[0] = ms.percent_to_sigma(1e-4)
    want = R.ref_sa_solver(denoiser(gmm, flow), x0.clone(), cref, R.Noise(Z), flow, ms,
                           s_noise=NOISE_SCALE if flow else 1.0,
                           use_pece=name.endswith("pece"))
    got = getattr(S, f"sample_{name}")(model, x0.clone(), torch.tensor(c), disable=True,
                                       noise_sampler=R.Noise(Z))
    assert _err(got, want) < TOL


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name,ref", [("euler", R.ref_euler), ("heun", R.ref_heun),
                                      ("dpm_2", R.ref_dpm_2), ("heunpp2", R.ref_heunpp2)])
def test_churn_noise_is_comfyuis_randn_like(gmm, kind, name, ref):
    """Churn (s_churn > 0 on part of the schedule): ComfyUI's torch.randn_like(x) from the
    global generator, drawn where ComfyUI draws it (heunpp2: every step)."""
    flow = kind == "flow"
    c, _, x0 = _start(kind, 8, seed=17)
    opts = dict(s_churn=2.0, s_tmin=0.05, s_tmax=0.6 if flow else 3.0, s_noise=1.1)
    draws = []

    def ns():
        draws.append(torch.randn_like(x0))
        return draws[-1]
    cl = [float(v) for v in c]
    torch.manual_seed(99)
    ns_ref = ns
    if name == "heunpp2":                # ComfyUI draws at every step, used or not
        for _ in range(len(cl) - 1):
            ns()
        ns_ref = step_ns_filter(draws, cl, opts)
    want = ref(denoiser(gmm, flow), x0.clone(), cl, ns_ref, flow, **opts)
    torch.manual_seed(99)
    got = getattr(S, f"sample_{name}")(FakeComfyModel(gmm, flow), x0.clone(), torch.tensor(c),
                                       disable=True, **opts)
    assert _err(got, want) < TOL


def step_ns_filter(draws, cl, opts):
    """The churn draws a loop that draws at every step uses: those of the churned steps."""
    n = len(cl) - 1
    used = [z for i, z in enumerate(draws[:n])
            if opts["s_tmin"] <= cl[i] <= opts["s_tmax"] and min(opts["s_churn"] / n,
                                                                  2 ** 0.5 - 1) > 0]
    it = iter(used)
    return lambda: next(it)


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_model_sees_comfyuis_levels(gmm, kind):
    """The model is called with exactly ComfyUI's levels (float32 sigmas, float32 x: the
    float32 values themselves), t = 1 included on flow models."""
    flow = kind == "flow"
    c = torch.tensor(levels(kind, 9), dtype=torch.float32)
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(2)) * float(c[0])
    model = FakeComfyModel(gmm, flow)
    model.m = lambda x, s: x * 0.5                 # any float32 denoiser
    S.sample_euler(model, x0, c, disable=True)
    assert model.levels == [float(v) for v in c[:-1]]
    if flow:
        assert model.levels[0] == 1.0


def test_noise_sampler_arguments(gmm):
    """noise_sampler(a, b) as ComfyUI calls it: dpmpp_sde (sigma_i, sigma_s1) then
    (sigma_i, sigma_{i+1}); seeds_2 chains its stages (sigma_i, sigma_s1), (sigma_s1,
    sigma_{i+1}); on a flow model in flow time, after the SNR offset of the first level."""
    c = levels("flow", 4)
    x0 = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ms = FlowSampling()
    c0 = ms.percent_to_sigma(1e-4)
    cc = [c0] + [float(v) for v in c[1:]]

    def lam(t):
        return math.log((1 - t) / t)

    def mid(a, b, r=0.5):                          # ComfyUI's sigma_fn(lerp of lambdas)
        return 1 / (1 + math.exp(lam(a) + r * (lam(b) - lam(a))))
    for name, chained in (("dpmpp_sde", False), ("seeds_2", True)):
        calls = []

        def ns(a, b):
            calls.append((float(a), float(b)))
            return torch.zeros(B, D, dtype=torch.float64)
        getattr(S, f"sample_{name}")(FakeComfyModel(gmm, True), x0.clone(), torch.tensor(c),
                                     disable=True, noise_sampler=ns)
        want = []
        for i in range(len(cc) - 2):               # no noise on the step to 0
            s1 = mid(cc[i], cc[i + 1])
            want += [(cc[i], s1), (s1 if chained else cc[i], cc[i + 1])]
        assert len(calls) == len(want)
        np.testing.assert_allclose(np.array(calls), np.array(want), rtol=1e-13)
        assert calls[0][0] == c0                   # the offset level itself


def test_default_noise_is_comfyuis(gmm):
    """Without noise_sampler: ComfyUI's default_noise_sampler(x, seed=extra_args['seed'])
    (a generator seeded with seed + 1 on the CPU); the seed reaches the model too."""
    c, _, x0 = _start("eps", 5, seed=8)
    sig = torch.tensor(c)
    run = lambda **kw: S.sample_euler_ancestral(FakeComfyModel(gmm, False), x0.clone(), sig,  # noqa: E731
                                                disable=True, **kw)
    a = run(extra_args={"seed": 42})
    b = run(extra_args={"seed": 42}, noise_sampler=S.comfy_default_noise_sampler(x0, 42))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(43)
    z = S.comfy_default_noise_sampler(x0, 42)(sig[0], sig[1])
    assert torch.equal(z, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    assert not torch.equal(a, run(extra_args={"seed": 7}))


def test_callback_once_per_step(gmm):
    c, Z, x0 = _start("flow", 5, seed=4)
    seen = []
    S.sample_heun(FakeComfyModel(gmm, True), x0, torch.tensor(c), disable=True,
                  callback=seen.append)
    assert [d["i"] for d in seen] == list(range(len(c) - 1))
    assert all(set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert [float(d["sigma"]) for d in seen] == [float(v) for v in c[:-1]]
    assert torch.equal(seen[0]["x"], x0)


def test_plain_denoiser_keeps_k_diffusion_behaviour(gmm):
    """A model without ComfyUI's model_sampling runs today's k-diffusion function: ipndm's
    last step is its multistep step (ComfyUI's returns the denoised)."""
    c, _, x0 = _start("eps", 6, seed=9)
    sig = torch.tensor(c)
    m = denoiser(gmm, False)
    plain = S.sample_ipndm(lambda x, s: m(x, s[0]), x0.clone(), sig, disable=True)
    comfy = S.sample_ipndm(FakeComfyModel(gmm, False), x0.clone(), sig, disable=True)
    want = R.ref_ipndm(m, x0.clone(), [float(v) for v in c], None, False)
    assert _err(comfy, want) < TOL
    assert _err(plain, want) > 1e-6                 # the step to 0 differs
    # a ComfyUI-only name on a plain denoiser: ComfyUI's eps-model semantics
    got = S.sample_lms(lambda x, s: m(x, s[0]), x0.clone(), sig, disable=True)
    assert _err(got, R.ref_lms(m, x0.clone(), [float(v) for v in c], None, False)) < TOL
    # ComfyUI's sample_lms spells its option ``order``
    got = S.sample_lms(FakeComfyModel(gmm, False), x0.clone(), sig, disable=True, order=2)
    want = R.ref_lms(m, x0.clone(), [float(v) for v in c], None, False, max_order=2)
    assert _err(got, want) < TOL


def ref_euler_ancestral_cfg_pp_t(m2, x, sig, ns, flow, eta=1.0, s_noise=1.0):
    """ComfyUI's sample_euler_ancestral_cfg_pp in float64 torch scalars, so that a flow
    level t = 1 takes ComfyUI's own values there (half-log-SNR -inf, alpha_s = 0,
    get_ancestral_step(inf, .) through Python's min with a NaN)."""
    sig = torch.tensor(sig, dtype=torch.float64)

    def lam(s):
        return s.logit().neg() if flow else s.log().neg()
    for i in range(len(sig) - 1):
        d0, du = m2(x, float(sig[i]))
        if sig[i + 1] == 0:
            x = d0
            continue
        a_s, a_t = sig[i] * lam(sig[i]).exp(), sig[i + 1] * lam(sig[i + 1]).exp()
        d = (x - a_s * du) / sig[i]
        f, t = sig[i] / a_s, sig[i + 1] / a_t
        if eta:
            up = min(t, eta * (t ** 2 * (f ** 2 - t ** 2) / f ** 2) ** 0.5)
            down = (t ** 2 - up ** 2) ** 0.5
        else:
            down, up = t, 0.0
        x = a_t * d0 + a_t * down * d
        if eta > 0 and s_noise > 0:
            x = x + a_t * ns() * s_noise * up
    return x


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name,ref", [("dpmpp_2m_cfg_pp", R.ref_dpmpp_2m_cfg_pp),
                                      ("res_multistep_cfg_pp", R.ref_res_multistep_cfg_pp),
                                      ("euler_ancestral_cfg_pp", ref_euler_ancestral_cfg_pp_t),
                                      ("euler_cfg_pp", ref_euler_ancestral_cfg_pp_t)])
def test_cfg_pp_through_post_cfg_hook(gmm, kind, name, ref):
    """The CFG++ names read the unconditional denoised through ComfyUI's post-CFG hook
    (model_options['sampler_post_cfg_function']); flow levels start at t = 1."""
    flow = kind == "flow"
    c, Z, x0 = _start(kind, 5, seed=12)
    uncond = GaussianMixture.random(d=D, M=2, seed=13)
    mc, mu = denoiser(gmm, flow), denoiser(uncond, flow)

    def m2(x, s):
        du = mu(x, s)
        return du + 3.5 * (mc(x, s) - du), du
    kw = {"s_noise": NOISE_SCALE} if name == "euler_ancestral_cfg_pp" and flow else {}
    if name == "euler_cfg_pp":
        kw = {"eta": 0.0, "s_noise": 0.0}
    want = ref(m2, x0.clone(), [float(v) for v in c], R.Noise(Z), flow, **kw)
    extra = {"noise_sampler": R.Noise(Z)} if "noise_sampler" in C.SAMPLERS[name][2] else {}
    got = getattr(S, f"sample_{name}")(FakeComfyModel(gmm, flow, uncond=uncond), x0.clone(),
                                       torch.tensor(c), disable=True, **extra)
    assert _err(got, want) < TOL


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("n,eta", [(7, 0.0), (6, 0.7), (8, 0.7)])
def test_dpm_fast(gmm, kind, n, eta):
    """ComfyUI's sample_dpm_fast(model, x, sigma_min, sigma_max, n) (k-diffusion's
    DPMSolver.dpm_solver_fast), flow models from t = 1; eta > 0 with the caller's noise."""
    from pyengine.solvers.comfy import dpm_fast_orders, dpm_fast_sigmas
    flow = kind == "flow"
    lo, hi = (0.04, 1.0) if flow else (0.04, 12.0)
    g = torch.Generator().manual_seed(6)
    Z = torch.randn(16, B, D, generator=g, dtype=torch.float64)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    cl = [float(v) for v in dpm_fast_sigmas(lo, hi, n)]
    want = R.ref_dpm_fast(denoiser(gmm, flow), x0.clone(), cl, dpm_fast_orders(n), R.Noise(Z),
                          eta=eta)
    got = S.sample_dpm_fast(FakeComfyModel(gmm, flow), x0.clone(), lo, hi, n, disable=True,
                            eta=eta, noise_sampler=R.Noise(Z))
    assert _err(got, want) < TOL


def test_refusals_and_errors(gmm):
    c, _, x0 = _start("eps", 3, seed=1)
    model = FakeComfyModel(gmm, False)
    with pytest.raises(NotImplementedError, match="adaptive"):
        S.sample_dpm_adaptive(model, x0, 0.1, 10.0)
    with pytest.raises(TypeError, match="noise_sampler"):
        S.sample_dpmpp_2m(model, x0, torch.tensor(c), noise_sampler=lambda a, b: x0)
    with pytest.raises(TypeError, match="bogus"):
        S.sample_uni_pc(model, x0, torch.tensor(c), bogus=1)
    with pytest.raises(ValueError, match="eta"):
        S.sample_euler_ancestral(model, x0, torch.tensor(c), eta=-1.0)
    # ComfyUI arguments supported at their default only, refused otherwise with the reason
    sig = torch.tensor(c)
    for name, arg, ok, bad, why in [("lcm", "noise_clip_std", 0.0, 2.0, "clamp"),
                                    ("deis", "deis_mode", "tab", "rhoab", "rhoab"),
                                    ("sa_solver", "tau_func", None, abs, "tau_func"),
                                    ("er_sde", "noise_scaler", None, abs, "noise_scaler")]:
        fn = getattr(S, f"sample_{name}")
        fn(model, x0, sig, disable=True, **{arg: ok})
        with pytest.raises(NotImplementedError, match=why):
            fn(model, x0, sig, disable=True, **{arg: bad})
    a = S.sample_dpmpp_2m_sde_heun(model, x0, sig, disable=True, solver_type="midpoint",
                                   noise_sampler=lambda a, b: torch.zeros_like(x0))
    b = S.sample_dpmpp_2m_sde(model, x0, sig, disable=True,
                              noise_sampler=lambda a, b: torch.zeros_like(x0))
    assert torch.equal(a, b)
    zeros = lambda a, b: torch.zeros_like(x0)  # noqa: E731
    assert torch.equal(S.sample_sa_solver(model, x0, sig, disable=True, use_pece=True,
                                          noise_sampler=zeros),
                       S.sample_sa_solver_pece(model, x0, sig, disable=True,
                                               noise_sampler=zeros))
    plain = lambda x, s: x  # noqa: E731
    with pytest.raises(RuntimeError, match="post_cfg"):
        S.sample_dpmpp_2m_cfg_pp(model, x0, torch.tensor(c))   # a model without the hook
    assert S.sample_euler(plain, x0, torch.tensor([1.0])) is x0   # no step


def test_every_comfyui_name_exists():
    for name in C.COMFY_SAMPLER_NAMES:
        assert callable(getattr(S, f"sample_{name}")), name
        assert f"sample_{name}" in S.__all__


def test_sigma_helpers():
    ms = pe.schedules.ModelSampling.flow_shift(FLOW_SHIFT)
    s = S.comfy_sigmas("simple", ms, 8)
    assert isinstance(s, torch.Tensor) and s.numel() == 9 and float(s[0]) == 1.0
    np.testing.assert_allclose(s.double().numpy(), C.scheduler_sigmas("simple", ms, 8),
                               rtol=1e-6)
    hi, lo = S.split_sigmas(s, 3)
    assert torch.equal(hi, s[:4]) and torch.equal(lo, s[3:])
    hi, lo = S.split_sigmas_denoise(s, 0.25)
    assert lo.numel() == 3 and torch.equal(lo, s[-3:]) and torch.equal(hi, s[:-2])
    f = S.flip_sigmas(s)
    assert float(f[0]) == pytest.approx(1e-4) and torch.equal(f[1:], s.flip(0)[1:])


@pytest.mark.parametrize("kind", ["eps", "flow"])
@pytest.mark.parametrize("name,ref", [("dpmpp_2m", R.ref_dpmpp_2m), ("uni_pc", None)])
def test_float32_state(gmm, kind, name, ref):
    """float32 x and sigmas (ComfyUI's usual dtypes): the float64 result to float32 rounding."""
    flow = kind == "flow"
    c, _, x0 = _start(kind, 10, seed=23)
    c32 = torch.tensor(c, dtype=torch.float32)
    cl = [float(v) for v in c32]
    m = denoiser(gmm, flow)
    want = R.ref_unipc_comfy(m, x0.clone(), cl, "bh1") if ref is None else \
        ref(m, x0.clone(), cl, None, flow)
    model = FakeComfyModel(gmm, flow)
    model.m = lambda x, s: m(x.double(), s).float()
    got = getattr(S, f"sample_{name}")(model, x0.float(), c32, disable=True)
    assert got.dtype == torch.float32
    assert _err(got.double(), want) < 2e-5


def test_philox_noise(gmm):
    """noise_sampler=PhiloxNoise(seeds): pyengine's in-kernel noise, batch-invariant."""
    c, _, x0 = _start("flow", 6, seed=2)
    sig = torch.tensor(c)
    full = S.sample_er_sde(FakeComfyModel(gmm, True), x0, sig, disable=True,
                           noise_sampler=S.PhiloxNoise([1, 2, 3]))
    one = S.sample_er_sde(FakeComfyModel(gmm, True), x0[2:], sig, disable=True,
                          noise_sampler=S.PhiloxNoise([3]))
    assert _err(one, full[2:]) < 1e-12
    other = S.sample_er_sde(FakeComfyModel(gmm, True), x0, sig, disable=True,
                            noise_sampler=S.PhiloxNoise([1, 2, 4]))
    assert _err(other[:2], full[:2]) < 1e-12 and _err(other[2:], full[2:]) > 1e-3
