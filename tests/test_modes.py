"""Every mode walks the same plan through the same executor, so every mode gives bitwise the
result of ``Sampler.sample`` on the same backend: one test over registry configurations x
modes x features (plain, guidance, img2img, inpainting). Where a mode refuses a
configuration, the refusal must name the reason."""

import pytest
import torch

import pyengine as pe

PROC = pe.processes.VP.discrete("linear")
SHAPE = (2, 3, 5)
BACKEND = "torch"


#: (label, solver, options) of every registry configuration that samples (not inversion).
CONFIGS = [(label, info.name, dict(options)) for info in pe.list_solvers()
           if info.family != "inversion" for label, options, *_ in info.configurations()]
MODES = ["compile", "scheduler"]
FEATURES = ["plain", "guidance", "img2img", "inpaint"]


def cond_model(x, t, label):
    tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.tanh(x) * 0.3 + 1e-3 * tt * x + 0.05 * label.view(-1, 1, 1).to(x.dtype)


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _case(feature, seed):
    """(sampler kwargs, call kwargs, model-batch conditioning) of a feature."""
    B = SHAPE[0]
    skw, ckw = {}, {}
    rows = B
    if feature == "guidance":
        skw["guidance_scale"] = 2.5
        rows = 2 * B
    if feature in ("img2img", "inpaint"):
        ckw["init"] = _rand(SHAPE, seed + 1)
        ckw["strength"] = 0.7
    if feature == "inpaint":
        ckw["mask"] = (torch.rand((B, 1, SHAPE[2]), generator=torch.Generator()
                                  .manual_seed(seed + 2)) > 0.5).float()
    label = torch.arange(rows, dtype=torch.float32) / 7
    return skw, ckw, {"label": label}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_mode_equals_sample(config, mode, feature):
    _, solver, opts = config
    skw, ckw, extra = _case(feature, 11)
    smp = pe.Sampler(PROC, solver=solver, steps=5, **opts, **skw)
    noise = _rand(SHAPE, 3)
    try:
        ref = smp.sample(cond_model, noise, seed=5, extra_args=extra, backend=BACKEND, **ckw)
    except ValueError as exc:
        # sample itself refuses (inpainting of a plan whose custom op writes the state)
        assert feature == "inpaint" and "not supported" in str(exc)
        return
    if mode == "compile":
        fn = smp.compile(cond_model, SHAPE, backend=BACKEND, extra_args=extra,
                         cache=pe.runtime.GraphCache(1), **ckw)
        out = fn(noise, seed=5)
    else:
        sch = pe.RequestScheduler(cond_model, backend=BACKEND, max_batch=8)
        try:
            r = sch.submit(smp, noise, seed=5, extra_args=extra, **ckw)
        except ValueError as exc:
            assert "custom op" in str(exc)
            assert any(isinstance(op, pe.plan.Custom) for op in smp.plan_for(0, 2.5 if
                       feature == "guidance" else None).ops) or solver == "pc_langevin"
            return
        sch.run()
        out = r.result
    assert torch.equal(out, ref), (mode, feature, (out - ref).abs().max().item())


def test_compiled_img2img_takes_new_data_per_call():
    smp = pe.Sampler(PROC, solver="dpmpp_2m", steps=6)
    mask = torch.ones(SHAPE)
    mask[:, :, :2] = 0
    init0, init1 = _rand(SHAPE, 1), _rand(SHAPE, 2)
    fn = smp.compile(lambda x, t: torch.tanh(x), SHAPE, backend=BACKEND, init=init0,
                     strength=0.5, mask=mask, cache=pe.runtime.GraphCache(1))
    noise = _rand(SHAPE, 4)
    for init in (init0, init1):
        ref = smp.sample(lambda x, t: torch.tanh(x), noise, seed=1, init=init, strength=0.5,
                         mask=mask, backend=BACKEND)
        assert torch.equal(fn(noise, seed=1, init=init), ref)
    with pytest.raises(ValueError, match="init"):
        smp.compile(lambda x, t: x, SHAPE, mask=mask)
    plain = smp.compile(lambda x, t: x, SHAPE, cache=pe.runtime.GraphCache(1))
    with pytest.raises(ValueError, match="init"):
        plain(noise, init=init0)


KDIFF = [("sample_euler", "euler", {}, {}), ("sample_heun", "heun", {}, {}),
         ("sample_dpm_2", "dpm_2", {}, {}),
         ("sample_dpmpp_2m", "dpmpp_2m", {"solver_type": "midpoint", "lower_order_final": False},
          {}),
         ("sample_ipndm", "ipndm", {}, {}),
         ("sample_euler_ancestral", "euler_ancestral", {"eta": 1.0, "s_noise": 1.0},
          {"noise_sampler": pe.sampling.PhiloxNoise(7)}),
         ("sample_dpmpp_2m_sde", "dpmpp_2m_sde",
          {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint", "lower_order_final": False},
          {"noise_sampler": pe.sampling.PhiloxNoise(7)})]


@pytest.mark.parametrize("name,solver,opts,kw", KDIFF, ids=[k[0] for k in KDIFF])
def test_kdiffusion_functions_equal_sample(name, solver, opts, kw):
    # The k-diffusion functions are the same walk over the EDM plan of the registry solver.
    sigmas = torch.tensor([14.6, 6.0, 2.2, 0.7, 0.2, 0.0], dtype=torch.float64)

    def den(x, sigma):
        return torch.tanh(x) / (1 + sigma.view(-1, 1, 1).to(x.dtype))

    x = _rand(SHAPE, 9) * 14.6
    out = getattr(pe.sampling, name)(den, x, sigmas.float(), disable=True, **kw)
    grid = sigmas.float().double().numpy()
    smp = pe.Sampler(pe.processes.EDM(), solver=solver, sigmas=grid, prediction="sample",
                     init_noise_scale=1.0, **opts)
    ref = smp.sample(pe.Denoiser(lambda xx, sig: den(xx, sig)), x, seed=7)
    assert torch.equal(out, ref), (out - ref).abs().max().item()


def test_adapter_errors_name_the_argument():
    # Issue 13 #9/#12: clear errors from the adapters, before anything runs.
    x = _rand(SHAPE, 1)
    sig = torch.tensor([3.0, 1.0, 0.0])
    with pytest.raises(TypeError, match="noise_sampler"):
        pe.sampling.sample_euler_ancestral(lambda x, s: x, x, sig, noise_sampler=3)
    with pytest.raises(TypeError, match="extra_args"):
        pe.sampling.sample_euler(lambda x, s: x, x, sig, extra_args=[1])
    with pytest.raises(ValueError, match="sigma_to"):
        pe.sampling.get_ancestral_step(1.0, 2.0)
    smp = pe.Sampler(PROC, solver="ddim", steps=3)
    with pytest.raises(TypeError, match="extra_args"):
        smp.sample(lambda x, t: x, x, extra_args=[1])
    diffusers = pytest.importorskip("diffusers")
    from pyengine.integrations.diffusers import FusedScheduler
    fs = FusedScheduler(diffusers.DDIMScheduler(clip_sample=False))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_inference_steps"):
            fs.set_timesteps(bad)
    fs.set_timesteps(4)
    t0 = fs.timesteps[0]
    with pytest.raises(ValueError, match="eta"):
        fs.step(torch.zeros(SHAPE), t0, x, eta=float("nan"))
    out = fs.step(torch.zeros(SHAPE), t0, x, eta=0.0).prev_sample   # still usable after it
    assert torch.isfinite(out).all()


def test_pc_langevin_float16_stays_finite():
    # Issue 13 #11: the Langevin score buffer is float32 for float16 states.
    proc = pe.processes.VE()
    smp = pe.Sampler(proc, solver="pc_langevin", steps=8, prediction="epsilon")
    x = _rand((2, 3, 16, 16), 3).half()
    out = smp.sample(lambda x, t: (x * 0.01).to(x.dtype), x, seed=1, backend="torch")
    assert torch.isfinite(out).all()


def test_float16_state_that_would_overflow_is_refused_in_every_mode():
    # Issue 13 #11: VE with sigma_max 2e4 in float16 gave NaN samples with no warning.
    smp = pe.Sampler(pe.processes.VE(sigma_min=0.01, sigma_max=2e4), solver="euler", steps=4)
    x = torch.randn(SHAPE).half()
    with pytest.raises(ValueError, match="float16"):
        smp.sample(lambda x, t: x * 0, x)
    with pytest.raises(ValueError, match="float16"):
        smp.compile(lambda x, t: x * 0, SHAPE, torch.float16)
    with pytest.raises(ValueError, match="float16"):
        pe.RequestScheduler(lambda x, t: x * 0, dtype=torch.float16).submit(smp, x)
    ok = pe.Sampler(pe.processes.VE(sigma_min=0.01, sigma_max=80.0), solver="euler", steps=4)
    assert torch.isfinite(ok.sample(lambda x, t: (x * 0).to(x.dtype), x)).all()


def test_model_output_errors_name_the_model():
    # Issue 13 #12: a bad model output is named as such, not as the kernel's bufs[1].
    smp = pe.Sampler(PROC, solver="ddim", steps=3)
    x = torch.randn(SHAPE)
    for bad in (lambda x, t: x.to(torch.int32), lambda x, t: x.to("meta")):
        for run in (lambda m: smp.sample(m, x),
                    lambda m: smp.compile(m, SHAPE, cache=pe.runtime.GraphCache(1))(x)):
            with pytest.raises(ValueError, match="model output"):
                run(bad)
