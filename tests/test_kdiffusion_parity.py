"""Parity with k-diffusion: pe.sampling.sample_* == k_diffusion.sampling.sample_*.

The reference is the `k-diffusion` package's own sampling module (test extra; installed with
--no-deps plus torchsde). Its package __init__ imports training dependencies (torchvision,
PIL, ...), so only k_diffusion/sampling.py is loaded, with k_diffusion.utils reduced to the
one helper the samplers use (and torchdiffeq, used only by log_likelihood, stubbed when
absent). Same nonlinear denoiser, same sigmas, same noise: deterministic samplers agree to
float rounding (float32 and float64), stochastic ones given the same noise sampler, or the
same torch.manual_seed with both libraries' default noise. `pytest -s` prints the errors.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import types

import pytest
import torch

import pyengine.sampling as ps


def _find(name):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None


def _load_kdiffusion_sampling():
    spec = _find("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    if not path.exists():
        return None
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils
    stubs = {"k_diffusion": pkg, "k_diffusion.utils": utils}
    if _find("torchdiffeq") is None:
        tde = types.ModuleType("torchdiffeq")
        tde.odeint = None
        stubs["torchdiffeq"] = tde
    if _find("torchsde") is None:
        return None
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        sspec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        mod = importlib.util.module_from_spec(sspec)
        sspec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


K = _load_kdiffusion_sampling()
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion (and torchsde) not installed")
pytestmark = [
    # torchsde warns when a query lands within float rounding outside the tree's interval;
    # k-diffusion's samplers make the same queries.
    pytest.mark.filterwarnings("ignore:Should have:UserWarning"),
]

SHAPE = (2, 3, 5, 5)
WORST: dict[str, float] = {}


class Denoiser:
    """D(x; sigma) = x/(1 + sigma^2) + sigma/sqrt(1 + sigma^2) tanh(W x/sqrt(1 + sigma^2) + b)
    (+ 0.1 cond): nonlinear in x and in sigma, so a wrong level, order or coefficient shows.
    Records the sigmas it is called with."""

    def __init__(self, dtype=torch.float32, channels=SHAPE[1]):
        g = torch.Generator().manual_seed(3)
        self.W = (torch.randn(channels, channels, generator=g) / channels ** 0.5).to(dtype)
        self.b = (0.3 * torch.randn(channels, generator=g)).to(dtype)
        self.calls: list[torch.Tensor] = []

    def __call__(self, x, sigma, cond=None):
        self.calls.append(sigma.clone())
        s = sigma.view(-1, 1, 1, 1)
        c = 1 / (1 + s ** 2).sqrt()
        h = torch.einsum("oc,bchw->bohw", self.W, x) * c + self.b.view(1, -1, 1, 1)
        out = x / (1 + s ** 2) + s * c * torch.tanh(h)
        return out if cond is None else out + 0.1 * cond


def grids(dtype):
    karras = ps.get_sigmas_karras(10, 0.03, 14.6).to(dtype)
    return {
        "karras10": karras,
        "exp7": ps.get_sigmas_exponential(7, 0.05, 10.0).to(dtype),
        "karras10_no_zero": karras[:-1],
        "poly5": ps.get_sigmas_polyexponential(5, 0.1, 5.0, rho=2.0).to(dtype),
    }


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def record(key, err):
    WORST[key] = max(WORST.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nworst parity error vs k-diffusion (max|a-b|/max|b|):")
        for k, v in sorted(WORST.items()):
            print(f"  {k:48s} {v:.2e}")


def zero_noise(sigma, sigma_next):
    raise AssertionError("a deterministic configuration drew noise")


# name, kwargs for both, extra kwargs for k-diffusion only (its eta=0 forms still call a
# noise sampler, with weight 0)
DETERMINISTIC = [
    ("sample_euler", {}, {}),
    ("sample_heun", {}, {}),
    ("sample_dpm_2", {}, {}),
    ("sample_dpmpp_2m", {}, {}),
    ("sample_euler_ancestral", {"eta": 0.0}, {"noise_sampler": lambda a, b: torch.zeros(SHAPE)}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}, {}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, {}),
    ("sample_dpmpp_3m_sde", {"eta": 0.0}, {}),
    ("sample_dpm_2_ancestral", {"eta": 0.0}, {"noise_sampler": lambda a, b: torch.zeros(SHAPE)}),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0},
     {"noise_sampler": lambda a, b: torch.zeros(SHAPE)}),
    ("sample_dpmpp_sde", {"eta": 0.0}, {"noise_sampler": lambda a, b: torch.zeros(SHAPE)}),
]

TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@needs_k
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw,kd_only", DETERMINISTIC,
                         ids=[f"{c[0]}{c[1] or ''}" for c in DETERMINISTIC])
def test_deterministic(name, kw, kd_only, dtype):
    for gname, sigmas in grids(dtype).items():
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype)
        x = x * sigmas[0]
        cond = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=dtype)
        mk, mp = Denoiser(dtype), Denoiser(dtype)
        ref = getattr(K, name)(mk, x, sigmas, extra_args={"cond": cond}, disable=True,
                               **kw, **{k: (lambda a, b, f=v: f(a, b).to(dtype))
                                        for k, v in kd_only.items()})
        out = getattr(ps, name)(mp, x, sigmas, extra_args={"cond": cond}, disable=True, **kw)
        assert out.dtype == dtype and out.shape == x.shape
        assert len(mp.calls) == len(mk.calls), f"{gname}: model calls differ"
        for a, b in zip(mp.calls, mk.calls):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, rtol=4e-7 if dtype == torch.float32 else 1e-15,
                                       atol=0)
        err = rel(out, ref)
        record(f"{name}{kw or ''} {str(dtype)[6:]}", err)
        print(f"  {name:28s} {kw!s:38s} {gname:18s} {str(dtype)[6:]:8s} {err:.2e}")
        assert err < TOL[dtype], f"{name} on {gname}: relative error {err:.2e}"


class ListNoise:
    """A noise sampler returning a fixed sequence, recording its arguments."""

    def __init__(self, dtype, n=40, seed=11):
        g = torch.Generator().manual_seed(seed)
        self.z = [torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]
        self.args: list[tuple[float, float]] = []

    def __call__(self, sigma, sigma_next):
        self.args.append((float(sigma), float(sigma_next)))
        return self.z[len(self.args) - 1]


STOCHASTIC = [
    ("sample_euler_ancestral", {}),
    ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.8}),
    ("sample_dpmpp_2m_sde", {}),
    ("sample_dpmpp_2m_sde", {"eta": 0.7, "s_noise": 1.1, "solver_type": "heun"}),
]


@needs_k
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", STOCHASTIC, ids=[f"{c[0]}{c[1]}" for c in STOCHASTIC])
def test_stochastic_same_noise_sampler(name, kw, dtype):
    for gname, sigmas in grids(dtype).items():
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype)
        x = x * sigmas[0]
        nk, npe = ListNoise(dtype), ListNoise(dtype)
        ref = getattr(K, name)(Denoiser(dtype), x, sigmas, disable=True, noise_sampler=nk, **kw)
        out = getattr(ps, name)(Denoiser(dtype), x, sigmas, disable=True, noise_sampler=npe,
                                **kw)
        assert npe.args == nk.args and len(nk.args) > 0
        err = rel(out, ref)
        record(f"{name}{kw} {str(dtype)[6:]}", err)
        print(f"  {name:24s} {kw!s:50s} {gname:18s} {str(dtype)[6:]:8s} {err:.2e}")
        assert err < TOL[dtype], f"{name} on {gname}: relative error {err:.2e}"
        # and the noise matters: another sequence moves the result
        other = getattr(ps, name)(Denoiser(dtype), x, sigmas, disable=True,
                                  noise_sampler=ListNoise(dtype, seed=12), **kw)
        assert rel(other, ref) > 1e-3


CHURN = [
    ("sample_euler", {"s_churn": 2.0}),
    ("sample_heun", {"s_churn": 1.0, "s_tmin": 0.1, "s_tmax": 5.0, "s_noise": 1.007}),
    ("sample_dpm_2", {"s_churn": 3.0, "s_noise": 0.9}),
]


@needs_k
@pytest.mark.parametrize("name,kw", CHURN, ids=[c[0] for c in CHURN])
def test_churn_same_global_seed(name, kw):
    # k-diffusion's churn draws randn_like(x) at every step: the same torch.manual_seed gives
    # the same noise when pyengine draws at the same points.
    sigmas = grids(torch.float32)["karras10"]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    torch.manual_seed(123)
    ref = getattr(K, name)(Denoiser(), x, sigmas, disable=True, **kw)
    after_ref = torch.randn(1)
    torch.manual_seed(123)
    out = getattr(ps, name)(Denoiser(), x, sigmas, disable=True, **kw)
    assert torch.equal(torch.randn(1), after_ref)      # same number of draws
    err = rel(out, ref)
    record(f"{name}{kw} f32 (global seed)", err)
    print(f"  {name:16s} {kw!s:60s} {err:.2e}")
    assert err < TOL[torch.float32]
    torch.manual_seed(124)
    assert rel(getattr(ps, name)(Denoiser(), x, sigmas, disable=True, **kw), ref) > 1e-3


@needs_k
@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpmpp_2m_sde"])
def test_default_noise_same_global_seed(name):
    # Defaults: randn_like for the ancestral sampler, a Brownian tree seeded from the global
    # generator for the SDE sampler (k-diffusion's own defaults).
    sigmas = grids(torch.float32)["karras10"]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    torch.manual_seed(7)
    ref = getattr(K, name)(Denoiser(), x, sigmas, disable=True)
    torch.manual_seed(7)
    out = getattr(ps, name)(Denoiser(), x, sigmas, disable=True)
    err = rel(out, ref)
    record(f"{name} default noise f32 (global seed)", err)
    assert err < TOL[torch.float32]


@needs_k
def test_brownian_tree_noise_sampler_matches():
    sigmas = grids(torch.float64)["karras10"]
    x = torch.zeros(SHAPE, dtype=torch.float64)
    for seed in (3, [3, 4]):
        a = K.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=seed)
        b = ps.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=seed)
        for i in range(len(sigmas) - 2):
            assert torch.equal(a(sigmas[i], sigmas[i + 1]), b(sigmas[i], sigmas[i + 1]))


@needs_k
@pytest.mark.parametrize("name,kw", [("sample_heun", {"s_churn": 1.0}),
                                     ("sample_dpmpp_2m", {}),
                                     ("sample_euler_ancestral", {})])
def test_callback_dicts(name, kw):
    sigmas = grids(torch.float64)["exp7"]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x * sigmas[0]
    got = {"k": [], "p": []}
    torch.manual_seed(1)
    getattr(K, name)(Denoiser(torch.float64), x, sigmas, disable=True,
                     callback=got["k"].append, **kw)
    torch.manual_seed(1)
    getattr(ps, name)(Denoiser(torch.float64), x, sigmas, disable=True,
                      callback=got["p"].append, **kw)
    assert len(got["p"]) == len(got["k"]) == len(sigmas) - 1
    for dp, dk in zip(got["p"], got["k"]):
        assert set(dp) == set(dk) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert dp["i"] == dk["i"]
        for key in ("sigma", "sigma_hat"):
            assert isinstance(dp[key], torch.Tensor)
            torch.testing.assert_close(dp[key], dk[key], rtol=1e-15, atol=0)
        for key in ("x", "denoised"):
            assert rel(dp[key], dk[key]) < 1e-12


def test_ipndm_matches_its_statement():
    # k-diffusion's package has no sample_ipndm (ComfyUI's fork does): check against the
    # Adams-Bashforth statement, d = (x - D)/sigma, x' = x + (sigma' - sigma) sum_j a_j d_{i-j}.
    ab = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
          4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    sigmas = grids(torch.float64)["karras10"]
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0 = x0 * sigmas[0]
    for max_order in (1, 2, 3, 4):
        model, x, ds = Denoiser(torch.float64), x0.clone(), []
        for i in range(len(sigmas) - 1):
            d = (x - model(x, sigmas[i] * x.new_ones(x.shape[0]))) / sigmas[i]
            ds.insert(0, d)
            q = min(max_order, i + 1)
            x = x + (sigmas[i + 1] - sigmas[i]) * sum(a * dj for a, dj in zip(ab[q], ds))
        out = ps.sample_ipndm(Denoiser(torch.float64), x0, sigmas, disable=True,
                              max_order=max_order)
        assert rel(out, x) < 1e-12


@needs_k
def test_schedules_match():
    # pyengine evaluates the formulas in float64 and rounds once; k-diffusion evaluates them in
    # the default dtype, which in float32 loses up to 2e-4 relative at the low end of the
    # Karras schedule (cancellation in smax^(1/rho) + ramp (smin^(1/rho) - smax^(1/rho))).
    # So compare with k-diffusion's own functions run in float64.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        refs = [K.get_sigmas_karras(12, 0.02, 80.0), K.get_sigmas_exponential(9, 0.1, 20.0),
                K.get_sigmas_polyexponential(9, 0.1, 20.0, rho=2.0), K.get_sigmas_vp(11)]
    finally:
        torch.set_default_dtype(prev)
    ours = [ps.get_sigmas_karras(12, 0.02, 80.0), ps.get_sigmas_exponential(9, 0.1, 20.0),
            ps.get_sigmas_polyexponential(9, 0.1, 20.0, rho=2.0), ps.get_sigmas_vp(11)]
    for a, b in zip(ours, refs):
        assert a.dtype == torch.float32 and a.shape == b.shape and a[-1] == 0
        torch.testing.assert_close(a, b.float(), rtol=1.2e-7, atol=0)
    s = torch.tensor([3.0, 1.0])
    assert ps.get_ancestral_step(s[0], s[1]) == K.get_ancestral_step(s[0], s[1])
    x, d = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(ps.to_d(x, s, d), K.to_d(x, s, d))


def test_eta_forms_we_do_not_have_raise_and_edge_cases():
    sigmas = grids(torch.float32)["exp7"]
    x = torch.randn(SHAPE) * sigmas[0]
    for name in ("sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
                 "sample_dpmpp_3m_sde"):
        with pytest.raises(NotImplementedError, match="eta=0"):
            getattr(ps, name)(Denoiser(), x, sigmas, disable=True)
    with pytest.raises(NotImplementedError, match="r=0.3"):
        ps.sample_dpmpp_sde(Denoiser(), x, sigmas, disable=True, eta=0.0, r=0.3)
    # no step: k-diffusion returns x itself
    assert ps.sample_euler(Denoiser(), x, sigmas[:1], disable=True) is x
    with pytest.raises(ValueError, match="sample_euler: sigmas must be strictly decreasing"):
        ps.sample_euler(Denoiser(), x, torch.tensor([1.0, 2.0, 0.0]), disable=True)


@needs_k
def test_signatures_match_kdiffusion():
    import inspect
    for name in ps.SAMPLERS:
        if not hasattr(K, name):
            continue
        a = inspect.signature(getattr(ps, name)).parameters
        b = inspect.signature(getattr(K, name)).parameters
        assert list(a) == list(b), name
        for p in b:
            if b[p].default is not inspect.Parameter.empty:
                assert a[p].default == b[p].default or (
                    isinstance(b[p].default, float) and math.isinf(b[p].default)), (name, p)


def test_philox_noise_is_batch_invariant():
    sigmas = grids(torch.float32)["karras10"]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * sigmas[0]
    full = ps.sample_euler_ancestral(Denoiser(), x, sigmas, disable=True,
                                     noise_sampler=ps.PhiloxNoise([10, 11]))
    one = ps.sample_euler_ancestral(Denoiser(), x[1:], sigmas, disable=True,
                                    noise_sampler=ps.PhiloxNoise([11]))
    assert rel(one, full[1:]) < 1e-6
    again = ps.sample_euler_ancestral(Denoiser(), x, sigmas, disable=True,
                                      noise_sampler=ps.PhiloxNoise([10, 12]))
    assert rel(again[:1], full[:1]) < 1e-6 and rel(again[1:], full[1:]) > 1e-3


class _ComfyEps:
    """A ComfyUI-shaped wrapper (model.inner_model.model_patcher.get_model_object
    ("model_sampling")) around a denoiser: an eps model, whose ComfyUI sampler forms are
    k-diffusion's for the names below."""

    class _Sampling:                       # not CONST: the eps kind, no noise_scale
        pass

    def __init__(self, dtype):
        self.d = Denoiser(dtype)
        ms = self._Sampling()
        patcher = types.SimpleNamespace(get_model_object=lambda name: ms)
        self.inner_model = types.SimpleNamespace(model_patcher=patcher)

    def __call__(self, x, sigma, **kw):
        return self.d(x, sigma, **kw)


# ComfyUI name, kwargs, grid: where ComfyUI's eps form and k-diffusion's function coincide
COMFY_AS_K = [
    ("sample_dpm_2_ancestral", {"eta": 0.8}, "karras10"),
    ("sample_dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 0.9}, "karras10"),
    ("sample_dpmpp_sde", {"eta": 0.7, "r": 0.4}, "karras10"),
    ("sample_dpmpp_3m_sde", {"eta": 1.0}, "exp7"),
    ("sample_euler_ancestral", {"eta": 0.9}, "exp7"),
    ("sample_lms", {}, "karras10_no_zero"),        # k-diffusion's lms steps to 0 itself
]


@needs_k
@pytest.mark.parametrize("name,kw,gname", COMFY_AS_K, ids=[c[0] for c in COMFY_AS_K])
def test_comfy_names_on_eps_models_agree_with_k_diffusion(name, kw, gname):
    """pyengine's ComfyUI-name functions, given a model that carries ComfyUI's (eps)
    model_sampling, against k-diffusion's function of that name on the bare denoiser, with
    the same noise sampler (the eta > 0 forms k-diffusion's names refuse here run)."""
    dtype = torch.float64
    sigmas = grids(dtype)[gname]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype) * sigmas[0]
    nk, npe = ListNoise(dtype), ListNoise(dtype)
    stochastic = name != "sample_lms"
    ref = getattr(K, name)(Denoiser(dtype), x, sigmas, disable=True,
                           **({"noise_sampler": nk} if stochastic else {}), **kw)
    out = getattr(ps, name)(_ComfyEps(dtype), x, sigmas, disable=True,
                            **({"noise_sampler": npe} if stochastic else {}), **kw)
    err = rel(out, ref)
    record(f"comfy {name}{kw}", err)
    assert err < 1e-12, f"{name}: {err:.2e}"
    if stochastic:
        assert len(npe.args) == len(nk.args) > 0
        for a, b in zip(npe.args, nk.args):
            assert a == pytest.approx(b, rel=1e-12)
