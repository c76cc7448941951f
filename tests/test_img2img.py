"""img2img / partial denoising: the plan starts at the grid level given by ``strength``
(diffusers: skip the first steps - int(steps * strength) steps) or ``start_sigma``, from
s(sigma_0) (x0 + sigma_0 noise); checked against a torch reference that noises the data by
hand and runs the full sampler over the truncated grid."""

import pytest
import torch

import pyengine as pe
from pyengine.models import GaussianMixture

GMM = GaussianMixture.random(d=12, M=3, seed=7)
B, SEED, STEPS = 3, 5, 10


def _noise():
    return torch.randn(B, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _init():
    return torch.randn(B, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("solver", ["ddim", "euler_ancestral", "dpmpp_2m", "dpmpp_3m", "unipc",
                                    "heun", "dpmpp_2m_sde"])
@pytest.mark.parametrize("strength", [0.35, 0.6, 1.0])
@pytest.mark.parametrize("proc", [pe.processes.VP.discrete("linear"), pe.processes.EDM()])
def test_img2img_matches_truncated_grid(solver, strength, proc):
    sp = pe.Sampler(proc, solver, steps=STEPS, schedule="karras")
    model = GMM.as_model(proc, "epsilon")
    got = sp.sample(model, _noise(), seed=SEED, init=_init(), strength=strength)
    # reference: diffusers' truncation, the state noised by hand, a fresh sampler on the rest
    t_start = STEPS - min(int(STEPS * strength), STEPS)
    sig = sp.sigmas[t_start:]
    s0 = float(proc.s_of_sigma(sig[0]))
    x = s0 * (_init() + sig[0] * _noise())
    ref_sp = pe.Sampler(proc, solver, sigmas=sig, init_noise_scale=1.0)
    ref = ref_sp.sample(model, x, seed=SEED)
    assert torch.equal(got, ref)
    # the multistep warm-up restarts at the start level: the plan is the truncated grid's
    assert sp.plan_for(t_start).describe() == ref_sp.plan.describe()
    assert sp.plan_for(t_start).nfe == ref_sp.nfe


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler_ancestral"])
def test_strength_one_is_plain_sampling(solver):
    proc = pe.processes.VP.discrete("linear")
    model = GMM.as_model(proc, "epsilon")
    sp = pe.Sampler(proc, solver, steps=STEPS)
    sig0 = float(sp.sigmas[0])
    scale = float(proc.s_of_sigma(sig0)) * sig0
    plain = pe.Sampler(proc, solver, steps=STEPS, init_noise_scale=scale).sample(
        model, _noise(), seed=SEED)
    img = sp.sample(model, _noise(), seed=SEED, init=torch.zeros(B, 12, dtype=torch.float64),
                    strength=1.0)
    torch.testing.assert_close(img, plain, rtol=0, atol=1e-13)


def test_start_sigma_picks_first_level_at_or_below():
    proc = pe.processes.EDM()
    sp = pe.Sampler(proc, "dpmpp_2m", steps=STEPS)
    lvl = 4
    mid = 0.5 * (sp.sigmas[lvl - 1] + sp.sigmas[lvl])
    assert sp.start_index(start_sigma=mid) == lvl
    assert sp.start_index(start_sigma=sp.sigmas[lvl]) == lvl
    model = GMM.as_model(proc, "epsilon")
    a = sp.sample(model, _noise(), seed=SEED, init=_init(), start_sigma=mid)
    b = sp.sample(model, _noise(), seed=SEED, init=_init(),
                  strength=(STEPS - lvl) / STEPS)
    assert torch.equal(a, b)


def test_strength_diffusers_rounding_and_errors():
    sp = pe.Sampler(pe.processes.EDM(), "euler", steps=50)
    assert sp.start_index(strength=0.5) == 25
    assert sp.start_index(strength=0.75) == 13      # int(37.5) = 37 steps run
    assert sp.start_index(strength=1.0) == 0
    model = GMM.as_model(pe.processes.EDM(), "epsilon")
    x = torch.zeros(B, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="no step"):
        sp.sample(model, x, init=x, strength=0.01)
    with pytest.raises(ValueError, match="strength must be"):
        sp.sample(model, x, init=x, strength=1.5)
    with pytest.raises(ValueError, match="not both"):
        sp.sample(model, x, init=x, strength=0.5, start_sigma=1.0)
    with pytest.raises(ValueError, match="need init"):
        sp.sample(model, x, strength=0.5)
    with pytest.raises(ValueError, match="shape"):
        sp.sample(model, x, init=x[:1], strength=0.5)


def test_img2img_with_guidance():
    proc = pe.processes.VP.continuous()
    base = GMM.as_model(proc, "epsilon")

    def model(x, t, context):
        return base(x, t) * (1.0 + 0.1 * torch.tanh(context))
    cond = torch.ones(B, 1, dtype=torch.float64)
    unc = torch.zeros(B, 1, dtype=torch.float64)
    sp = pe.Sampler(proc, "dpmpp_2m", steps=STEPS, guidance_scale=3.0)
    got = sp.sample(model, _noise(), init=_init(), strength=0.6,
                    extra_args={"context": torch.cat([unc, cond])})

    def guided(x, t):
        u, c = model(x, t, unc), model(x, t, cond)
        return u + 3.0 * (c - u)
    ref = pe.Sampler(proc, "dpmpp_2m", steps=STEPS).sample(guided, _noise(), init=_init(),
                                                           strength=0.6)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler",
                                  "EulerDiscreteScheduler"])
def test_img2img_matches_diffusers_pipeline_loop(name):
    """diffusers' img2img pipelines: set_timesteps(n), t_start = n - int(n * strength),
    timesteps[t_start:], add_noise(init, noise, timesteps[:1]), then the usual loop."""
    D = pytest.importorskip("diffusers")
    from pyengine.integrations.diffusers import from_diffusers
    cfg = {"clip_sample": False} if name == "DDIMScheduler" else {}
    sch = getattr(D, name)(**cfg)
    n, strength = 10, 0.6
    g = torch.Generator().manual_seed(4)
    init = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)

    def model(x, t):
        t = torch.as_tensor(t).to(torch.float32).reshape(-1)[0]
        return torch.tanh(x) * (1 + 0.5 * torch.sin(t / 157.0)) + 0.2 * x * torch.cos(t / 311.0)

    ref_sch = getattr(D, name)(**cfg)
    ref_sch.set_timesteps(n)
    t_start = n - min(int(n * strength), n)
    ts = ref_sch.timesteps[t_start * ref_sch.order:]
    if hasattr(ref_sch, "set_begin_index"):
        ref_sch.set_begin_index(t_start * ref_sch.order)
    x = ref_sch.add_noise(init, noise, ts[:1])
    for t in ts:
        x = ref_sch.step(model(ref_sch.scale_model_input(x, t), t), t, x).prev_sample
    sp = from_diffusers(sch, n)
    out = sp.sample(model, noise, init=init, strength=strength)
    out = sp.to_scheduler_space(out)
    err = ((out - x).abs().max() / x.abs().max()).item()
    assert err < 1e-5, err
