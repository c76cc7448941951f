"""The public API: argument validation, the caller's tensors, the registry's declarations,
reproducible and batch-invariant stochastic sampling, and the CPU build of torch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine import schedules as S
from pyengine.solvers import registry


def vp():
    return pe.processes.VP.discrete("linear")


def eps_model(x, t):
    """A nonlinear epsilon model made of elementwise +, *, / only: its value for one sample
    is bitwise the same whatever the batch around it (a matmul would not be)."""
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return x / (1.0 + x * x) + 1e-4 * tt * x


# ---------------------------------------------------------------------------------------
# validation: every error names the offending argument
# ---------------------------------------------------------------------------------------


def test_unknown_solver():
    with pytest.raises(ValueError, match=r"unknown solver 'dpmpp_9m'.*known: .*euler"):
        pe.Sampler(vp(), solver="dpmpp_9m", steps=10)


def test_unknown_option():
    with pytest.raises(ValueError, match=r"no option 'etaa'.*accepts"):
        pe.Sampler(vp(), solver="euler_ancestral", steps=10, etaa=0.5)


@pytest.mark.parametrize("steps", [0, -3, 2.5, "10", True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        pe.Sampler(vp(), solver="euler", steps=steps)


def _bad_values(spec):
    """Values every option of this spec must refuse (issue 13 #9: NaN and negative eta were
    accepted, NaN acting as eta = inf)."""
    if spec.kind == "choice":
        return ["no_such_choice", 1]
    if spec.kind == "bool":
        return ["yes", 1.0]
    bad = [float("nan"), "1"]
    if not spec.allow_inf:
        bad.append(float("inf"))
    if spec.lo is not None:
        bad.append(spec.lo - 0.5 if spec.kind == "real" else int(spec.lo) - 1)
    if spec.hi is not None:
        bad.append(spec.hi + 1)
    if spec.kind == "int":
        bad.append(1.5)
    return bad


def _option_cases():
    return [pytest.param(info.name, opt, value, id=f"{info.name}-{opt}-{value!r}")
            for info in pe.list_solvers() for opt, spec in sorted(info.specs.items())
            for value in _bad_values(spec)]


@pytest.mark.parametrize("name,option,value", _option_cases())
def test_bad_solver_option_values_are_refused_by_name(name, option, value):
    with pytest.raises(ValueError, match=rf"solver '{name}': {option} must be"):
        pe.Sampler(vp(), solver=name, steps=4, **{option: value})


def test_every_scalar_option_has_a_spec():
    """Every option whose default is a scalar is declared in the registry (type and range)."""
    for info in pe.list_solvers():
        for opt, default in info.defaults.items():
            if isinstance(default, (bool, int, float, str)):
                assert opt in info.specs, f"{info.name}: option {opt!r} has no spec"
                info.specs[opt].check(opt, default)       # the default itself is valid


@pytest.mark.parametrize("kw,msg", [
    (dict(init_noise_scale=float("nan")), "init_noise_scale"),
    (dict(init_noise_scale=-1.0), "init_noise_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale"),
    (dict(guidance_rescale=2.0), "guidance_rescale"),
    (dict(timesteps=[float("nan")] * 9), "timesteps must be finite"),
    (dict(timesteps=[[1.0] * 9]), "timesteps must be 1-D"),
])
def test_bad_plan_scalars_are_refused_by_name(kw, msg):
    with pytest.raises(ValueError, match=msg):
        pe.Sampler(vp(), solver="ddim", steps=8, **kw)


def test_steps_limit_fails_fast():
    """10^7 steps used to build for minutes (and numpy ran out of memory further up)."""
    import time
    for steps in (registry.MAX_STEPS + 1, 10 ** 7, 10 ** 12):
        t = time.perf_counter()
        with pytest.raises(ValueError, match=rf"steps must be an integer in \[1, "
                                              rf"{registry.MAX_STEPS}\]"):
            pe.Sampler(vp(), solver="euler", steps=steps)
        assert time.perf_counter() - t < 1.0
    sig = np.geomspace(80.0, 0.01, registry.MAX_STEPS + 2)
    with pytest.raises(ValueError, match="at most"):
        pe.build_plan(vp(), "euler", sig)


def test_missing_steps():
    with pytest.raises(ValueError, match="steps="):
        pe.Sampler(vp(), solver="euler")


@pytest.mark.parametrize("sigmas", [[1.0, 2.0, 0.0], [5.0], [float("inf"), 1.0, 0.0],
                                    [3.0, 0.0, -1.0], [[2.0, 1.0]]])
def test_bad_sigmas(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        pe.Sampler(vp(), solver="euler", sigmas=sigmas)


def test_sigmas_and_steps_disagree():
    with pytest.raises(ValueError, match=r"steps=3 disagrees with len\(sigmas\)"):
        pe.Sampler(vp(), solver="euler", steps=3, sigmas=[3.0, 1.0, 0.0])


@pytest.mark.parametrize("prediction", ["epsilonn", "x_0", "", None])
def test_bad_prediction(prediction):
    with pytest.raises(ValueError, match="prediction"):
        pe.Sampler(vp(), solver="euler", steps=5, prediction=prediction)


def test_prediction_aliases():
    s = pe.Sampler(vp(), solver="euler", steps=5, prediction="v_prediction")
    assert s.prediction == "v"


def test_bad_schedule_and_process():
    with pytest.raises(ValueError, match="schedule"):
        pe.Sampler(vp(), solver="euler", steps=5, schedule="karrass")
    with pytest.raises(TypeError, match="process"):
        pe.Sampler("vp", solver="euler", steps=5)


@pytest.mark.parametrize("noise", [np.zeros((2, 4)), [[0.0] * 4] * 2, 3.0])
def test_non_tensor_noise(noise):
    s = pe.Sampler(vp(), solver="euler", steps=3)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        s.sample(eps_model, noise)


@pytest.mark.parametrize("noise", [torch.zeros(2, 4, dtype=torch.int64), torch.zeros(()),
                                   torch.zeros(0, 4)])
def test_bad_noise_tensor(noise):
    s = pe.Sampler(vp(), solver="euler", steps=3)
    with pytest.raises(ValueError, match="noise"):
        s.sample(eps_model, noise)


def test_bad_generator_and_seed():
    s = pe.Sampler(vp(), solver="euler_ancestral", steps=3)
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="generator"):
        s.sample(eps_model, x, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="seed"):
        s.sample(eps_model, x, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        s.sample(eps_model, x, seed=[1, 2, 3])


def test_bad_model():
    s = pe.Sampler(vp(), solver="euler", steps=3)
    with pytest.raises(TypeError, match="model"):
        s.sample("unet", torch.randn(2, 4))
    with pytest.raises(ValueError, match="model output"):
        s.sample(lambda x, t: x[:, :2], torch.randn(2, 4))


# ---------------------------------------------------------------------------------------
# the caller's tensors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [i.name for i in pe.list_solvers()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_never_modified(name, dtype):
    s = pe.Sampler(vp(), solver=name, steps=4)
    noise = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    keep = noise.clone()
    out = s.sample(eps_model, noise, seed=1)
    assert torch.equal(noise, keep), f"{name} modified the caller's noise"
    assert out.shape == noise.shape and out.dtype == dtype
    assert out.data_ptr() != noise.data_ptr()
    assert torch.isfinite(out).all()
    # the same holds when the scale to the first level is 1 (no implicit copy on the way in)
    s1 = pe.Sampler(vp(), solver=name, steps=4, init_noise_scale=1.0)
    out1 = s1.sample(eps_model, noise, seed=1)
    assert torch.equal(noise, keep) and out1.data_ptr() != noise.data_ptr()


# ---------------------------------------------------------------------------------------
# the registry's declarations
# ---------------------------------------------------------------------------------------


def test_list_solvers_declarations():
    infos = pe.list_solvers()
    names = [i.name for i in infos]
    assert names == sorted(set(names)) and len(names) >= 5
    assert [i.name for i in registry.list_solvers()] == names
    for info in infos:
        assert isinstance(info.name, str) and info.name.isidentifier()
        assert isinstance(info.order, int) and info.order >= 1
        assert isinstance(info.nfe_per_step, int) and info.nfe_per_step >= 1
        assert isinstance(info.stochastic, bool)
        assert isinstance(info.family, str) and info.family
        assert isinstance(info.summary, str) and info.summary
        assert set(info.options) == set(info.defaults)
        assert registry.get(info.name) is info
        for label, options, order, nfe in info.configurations():
            assert isinstance(label, str) and isinstance(options, dict)
            assert set(options) <= set(info.options), f"{label}: options outside {info.options}"
            assert isinstance(order, int) and order >= 1
            assert isinstance(nfe, int) and nfe >= 1


def _configurations():
    return [pytest.param(info, dict(opts), nfe, id=label)
            for info in pe.list_solvers() for label, opts, _, nfe in info.configurations()]


@pytest.mark.parametrize("info,options,nfe", _configurations())
def test_declared_nfe_per_step(info, options, nfe):
    """Each step between positive levels costs nfe_per_step model calls; a solver may add a
    fixed number of start-up calls (a warm-up stage) or save a fixed number at the start or
    end (heunpp2's last two steps, SA-Solver's first corrector), never a per-step surplus."""
    def calls(n):
        sig = S.exponential(n + 1, 0.1, 10.0, append_zero=False)
        if info.family == "inversion":
            sig = sig[::-1].copy()
        return pe.build_plan(pe.processes.EDM(), info.name, sig, "sample", **options).nfe

    n12, n24 = calls(12), calls(24)
    assert n24 - n12 == 12 * nfe, (f"{info.name} {options}: 12 more steps cost {n24 - n12} "
                                   f"calls, declared {nfe} per step")
    assert -12 < n12 - 12 * nfe < 12, f"{info.name} {options}: {n12} calls for 12 steps"


# ---------------------------------------------------------------------------------------
# stochastic solvers: reproducible, batch-invariant (Philox keyed by each sample's seed)
# ---------------------------------------------------------------------------------------


def _stochastic_cases():
    """Every stochastic solver, and every deterministic one made stochastic by its own
    noise option (eta for DDIM-like, s_churn for EDM churn)."""
    out = []
    for info in pe.list_solvers():
        if info.stochastic:
            out.append(pytest.param(info.name, {}, id=info.name))
        elif "eta" in info.options:
            out.append(pytest.param(info.name, {"eta": 1.0}, id=f"{info.name}[eta=1]"))
        elif "s_churn" in info.options:
            out.append(pytest.param(info.name, {"s_churn": 2.0}, id=f"{info.name}[s_churn=2]"))
    return out


@pytest.mark.parametrize("name,options", _stochastic_cases())
def test_stochastic_same_seed_bitwise(name, options):
    s = pe.Sampler(vp(), solver=name, steps=8, **options)
    assert s.plan.n_noise > 0, f"{name} {options} draws no noise"
    noise = torch.randn(3, 2, 7, generator=torch.Generator().manual_seed(0))
    a = s.sample(eps_model, noise, seed=1234)
    b = s.sample(eps_model, noise, seed=1234)
    assert torch.equal(a, b)
    c = s.sample(eps_model, noise, seed=1235)
    assert not torch.equal(a, c), "a different seed must give different noise"
    # generator mode: same generator state, same result
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(s.sample(eps_model, noise, generator=g1),
                       s.sample(eps_model, noise, generator=g2))


@pytest.mark.parametrize("name,options", _stochastic_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_batch_invariance(name, options, dtype):
    """A sample's result depends on its noise and its seed only: not on batch size or position."""
    s = pe.Sampler(vp(), solver=name, steps=8, **options)
    seeds = [11, 2 ** 40 + 3, 7, 2 ** 64 - 1, 0]
    noise = torch.randn(len(seeds), 3, 5, generator=torch.Generator().manual_seed(2),
                        dtype=dtype)
    full = s.sample(eps_model, noise, seed=seeds)
    for i, sd in enumerate(seeds):
        alone = s.sample(eps_model, noise[i:i + 1], seed=[sd])
        assert torch.equal(alone[0], full[i]), f"sample {i} changed when run alone"
    perm = [3, 0, 4, 1]
    part = s.sample(eps_model, noise[perm], seed=[seeds[p] for p in perm])
    assert torch.equal(part, full[perm])
    # an int batch seed S gives sample i the seed (S, i)
    batch = s.sample(eps_model, noise, seed=99)
    per_sample = s.sample(eps_model, noise, seed=[pe.noise.sample_seed(99, i)
                                                  for i in range(len(seeds))])
    assert torch.equal(batch, per_sample)


# ---------------------------------------------------------------------------------------
# the install
# ---------------------------------------------------------------------------------------


def test_torch_is_the_cpu_build():
    """Installing the test extra (diffusers) must leave the CPU build of torch in place."""
    assert torch.version.cuda is None, f"a CUDA build of torch is installed: {torch.__version__}"
    from importlib import metadata
    nvidia = sorted(d.metadata["Name"] for d in metadata.distributions()
                    if (d.metadata["Name"] or "").lower().startswith("nvidia-"))
    assert not nvidia, f"CUDA wheels were pulled in: {nvidia}"


def test_version_and_exports():
    assert isinstance(pe.__version__, str)
    for name in ("Sampler", "build_plan", "Plan", "Denoiser", "list_solvers", "processes",
                 "schedules"):
        assert hasattr(pe, name)
    assert math.isfinite(pe.processes.EDM().sigma_max)


def test_extra_args_must_be_a_dict():
    """extra_args=[1] failed deep inside dict() with 'cannot convert dictionary update
    sequence element' (issue 13 #12)."""
    s = pe.Sampler(vp(), solver="euler", steps=3)
    with pytest.raises(TypeError, match="extra_args must be a dict of keyword arguments"):
        s.sample(eps_model, torch.randn(2, 4), extra_args=[1])
