"""The diffusers drop-in: FusedScheduler.from_scheduler(s) behaves as s inside pipelines.

Two references: real diffusers pipelines (DDPMPipeline, DDIMPipeline) with a tiny random
UNet2DModel run with the original scheduler and with the drop-in, same generator seed, and
compared image for image; and the scheduler protocol loop of every pipeline
(init_noise_sigma, scale_model_input, model, step) for every supported scheduler class,
including img2img starts (set_begin_index) and Heun's repeated timesteps. Both run in
float32; the bound is 1e-5 relative (max |a - b| / max |b|), as for from_diffusers.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

D = pytest.importorskip("diffusers")

import pyengine as pe  # noqa: E402
from pyengine.integrations.diffusers import FusedScheduler, FusedSchedulerOutput  # noqa: E402

from test_parity_diffusers import SHAPE, NonlinearModel  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
              # numpy 2 on diffusers' np.log(tensor) (DEIS), torchsde on diffusers' own
              # float32 query levels (DPMSolverSDE): both warn in diffusers' loop as well
              pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have:UserWarning")]

TOL = 1e-5
WORST: dict[str, float] = {}


def rel(a, b) -> float:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nworst drop-in error vs diffusers (float32, max|a-b|/max|b|):")
        for k, v in sorted(WORST.items()):
            print(f"  {k:60s} {v:.2e}")


def record(key, err):
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert err < TOL, f"{key}: relative error {err:.3e} > {TOL}"


# ---------------------------------------------------------------------------------------
# Real pipelines
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = D.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                          block_out_channels=(8, 16), norm_num_groups=4,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"))
    return model.eval()


def run_pipe(pipe, seed, **kw):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), output_type="np",
               **kw)
    return torch.from_numpy(out.images)


# v and sample predictions: a random network's epsilon turns into an x0_hat far outside
# [-1, 1] and the clamped images saturate (99% of pixels), which would compare nothing.
PIPELINES = [
    ("DDPMPipeline, DDPM v", D.DDPMPipeline,
     lambda: D.DDPMScheduler(clip_sample=False, prediction_type="v_prediction"),
     {"num_inference_steps": 10}),
    ("DDPMPipeline, DDPM sample, fixed_large", D.DDPMPipeline,
     lambda: D.DDPMScheduler(clip_sample=False, prediction_type="sample",
                             variance_type="fixed_large"), {"num_inference_steps": 6}),
    ("DDPMPipeline, DPMSolverMultistep SDE v", D.DDPMPipeline,
     lambda: D.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                           prediction_type="v_prediction"),
     {"num_inference_steps": 8}),
    # (DDPMPipeline passes generator= to step(), which UniPC's step() does not take)
    ("DDPMPipeline, DPMSolverMultistep 3M v", D.DDPMPipeline,
     lambda: D.DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction"),
     {"num_inference_steps": 8}),
    ("DDIMPipeline, v, eta=0", D.DDIMPipeline,
     lambda: D.DDIMScheduler(clip_sample=False, prediction_type="v_prediction"),
     {"num_inference_steps": 10}),
    ("DDIMPipeline, sample, eta=1", D.DDIMPipeline,
     lambda: D.DDIMScheduler(clip_sample=False, prediction_type="sample"),
     {"num_inference_steps": 10, "eta": 1.0}),
]


@pytest.mark.parametrize("label,pipe_cls,make,kw", PIPELINES, ids=[p[0] for p in PIPELINES])
def test_pipeline_images(unet, label, pipe_cls, make, kw):
    pipe = pipe_cls(unet=unet, scheduler=make())
    ref = run_pipe(pipe, 3, **kw)
    pipe.scheduler = FusedScheduler.from_scheduler(pipe.scheduler)
    assert isinstance(pipe.scheduler, FusedScheduler)
    out = run_pipe(pipe, 3, **kw)
    assert out.shape == ref.shape == (2, 8, 8, 3)
    # the images are not saturated by the clamp to [0, 1], so the comparison has teeth
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5
    err = (out - ref).abs().max().item()
    print(f"  {label:44s} max |image diff| {err:.2e}")
    record(f"pipeline: {label} (abs, images in [0, 1])", err)
    if pipe_cls is D.DDPMPipeline or kw.get("eta"):
        # stochastic: another generator seed gives another image
        assert (run_pipe(pipe, 4, **kw) - ref).abs().max() > 1e-2


def test_pipeline_philox_noise_is_batch_invariant(unet):
    pipe = D.DDPMPipeline(unet=unet, scheduler=D.DDPMScheduler(clip_sample=False))
    pipe.scheduler = FusedScheduler.from_scheduler(pipe.scheduler, noise="philox", seed=5)
    a = run_pipe(pipe, 3, num_inference_steps=5)
    b = run_pipe(pipe, 3, num_inference_steps=5)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# The protocol loop, every supported scheduler
# ---------------------------------------------------------------------------------------


def step_kwargs(sch, seed):
    params = inspect.signature(sch.step).parameters
    return {"generator": torch.Generator().manual_seed(seed)} if "generator" in params else {}


def protocol_loop(sch, model, x, steps, *, begin=None, eta=None, seed=1, return_dict=True):
    """What pipelines do: set_timesteps, (set_begin_index), init_noise_sigma, then per
    timestep scale_model_input, model, step."""
    sch.set_timesteps(steps)
    if begin is not None and hasattr(sch, "set_begin_index"):
        sch.set_begin_index(begin)
    kw = step_kwargs(sch, seed)
    if eta is not None:
        kw["eta"] = eta
    if begin is None:
        x = x * sch.init_noise_sigma
    for t in sch.timesteps[begin or 0:]:
        res = sch.step(model(sch.scale_model_input(x, t), t), t, x, return_dict=return_dict,
                       **kw)
        x = res.prev_sample if return_dict else res[0]
    return x


SCHEDULERS = [
    ("DDIM", lambda: D.DDIMScheduler(clip_sample=False), 10, None),
    ("DDIM eta=1, v", lambda: D.DDIMScheduler(clip_sample=False,
                                              prediction_type="v_prediction"), 10, 1.0),
    ("DDPM", lambda: D.DDPMScheduler(clip_sample=False), 10, None),
    ("Euler", lambda: D.EulerDiscreteScheduler(), 10, None),
    ("Euler v, karras", lambda: D.EulerDiscreteScheduler(prediction_type="v_prediction",
                                                         use_karras_sigmas=True), 12, None),
    ("Euler, sigma_min final (zero-length last step)",
     lambda: D.EulerDiscreteScheduler(final_sigmas_type="sigma_min"), 10, None),
    ("Euler ancestral", lambda: D.EulerAncestralDiscreteScheduler(), 10, None),
    ("Heun (repeated timesteps)", lambda: D.HeunDiscreteScheduler(), 6, None),
    ("DPM 2M", lambda: D.DPMSolverMultistepScheduler(), 8, None),
    ("DPM 2M, 20 steps", lambda: D.DPMSolverMultistepScheduler(), 20, None),
    ("DPM 3M", lambda: D.DPMSolverMultistepScheduler(solver_order=3), 10, None),
    ("DPM 2M karras, sigma_min final", lambda: D.DPMSolverMultistepScheduler(
        use_karras_sigmas=True, final_sigmas_type="sigma_min"), 10, None),
    ("DPM SDE 2M", lambda: D.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
     10, None),
    ("DPM singlestep o3", lambda: D.DPMSolverSinglestepScheduler(solver_order=3), 8, None),
    ("DPM sde-dpmsolver (noise prediction with noise)", lambda: D.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), 10, None),
    ("DPM SDE 3M", lambda: D.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                                         solver_order=3), 10, None),
    ("DPM singlestep SDE o2", lambda: D.DPMSolverSinglestepScheduler(
        algorithm_type="sde-dpmsolver++"), 9, None),
    ("UniPC", lambda: D.UniPCMultistepScheduler(), 8, None),
    ("UniPC o3, disable_corrector", lambda: D.UniPCMultistepScheduler(
        solver_order=3, disable_corrector=[0, 3]), 10, None),
    ("EDM Euler", lambda: D.EDMEulerScheduler(), 8, None),
    ("DDIM default (clip_sample)", lambda: D.DDIMScheduler(), 10, None),
    ("DDIM thresholding, eta=1", lambda: D.DDIMScheduler(thresholding=True), 10, 1.0),
    ("DDPM default (clip_sample)", lambda: D.DDPMScheduler(), 10, None),
    ("DPM 2M thresholding", lambda: D.DPMSolverMultistepScheduler(thresholding=True), 8, None),
    ("LCM", lambda: D.LCMScheduler(), 4, None),
    ("TCD (eta 0.3 by default)", lambda: D.TCDScheduler(), 4, None),
    ("TCD eta=0.7", lambda: D.TCDScheduler(), 5, 0.7),
    ("PNDM (SD 1.5)", lambda: D.PNDMScheduler(skip_prk_steps=True, steps_offset=1,
                                              set_alpha_to_one=False), 10, None),
    ("PNDM default (pseudo Runge-Kutta warm-up)", lambda: D.PNDMScheduler(), 10, None),
    ("PNDM PRK v, odd N // n", lambda: D.PNDMScheduler(prediction_type="v_prediction",
                                                       steps_offset=1), 9, None),
    ("LMS", lambda: D.LMSDiscreteScheduler(), 10, None),
    ("KDPM2 (interleaved midpoints)", lambda: D.KDPM2DiscreteScheduler(), 6, None),
    ("KDPM2 ancestral", lambda: D.KDPM2AncestralDiscreteScheduler(), 6, None),
    ("EDM DPM 2M", lambda: D.EDMDPMSolverMultistepScheduler(), 10, None),
    ("EDM DPM SDE 2M", lambda: D.EDMDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++"), 10, None),
    ("DEIS", lambda: D.DEISMultistepScheduler(), 10, None),
    ("DPM SDE (Brownian tree)", lambda: D.DPMSolverSDEScheduler(noise_sampler_seed=5), 6,
     None),
]


@pytest.mark.parametrize("label,make,steps,eta", SCHEDULERS, ids=[c[0] for c in SCHEDULERS])
def test_protocol_loop(label, make, steps, eta):
    sch = make()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234 + steps))
    ref_model, pe_model = NonlinearModel(), NonlinearModel()
    ref = protocol_loop(copy.deepcopy(sch), ref_model, noise, steps, eta=eta)
    fused = FusedScheduler.from_scheduler(sch)
    out = protocol_loop(fused, pe_model, noise, steps, eta=eta)
    assert pe_model.times == ref_model.times        # the model sees the same timesteps
    record(f"loop: {label}", rel(out, ref))
    # return_dict=False gives (prev_sample,), as the multistep schedulers do
    out2 = protocol_loop(FusedScheduler.from_scheduler(sch), NonlinearModel(), noise, steps,
                         eta=eta, return_dict=False)
    assert torch.equal(out2, out)


BEGIN = [
    ("DDIM", lambda: D.DDIMScheduler(clip_sample=False), 10, 3),
    ("Euler", lambda: D.EulerDiscreteScheduler(), 10, 4),
    ("Euler ancestral", lambda: D.EulerAncestralDiscreteScheduler(), 10, 4),
    ("Heun", lambda: D.HeunDiscreteScheduler(), 6, 4),
    ("DPM 2M", lambda: D.DPMSolverMultistepScheduler(), 8, 3),
    ("DPM 3M, 20 steps", lambda: D.DPMSolverMultistepScheduler(solver_order=3), 20, 6),
    ("DPM singlestep o3", lambda: D.DPMSolverSinglestepScheduler(solver_order=3), 9, 1),
    ("UniPC o3, disable_corrector", lambda: D.UniPCMultistepScheduler(
        solver_order=3, disable_corrector=[0, 4]), 10, 2),
    ("EDM Euler", lambda: D.EDMEulerScheduler(), 8, 3),
    ("KDPM2", lambda: D.KDPM2DiscreteScheduler(), 6, 4),
    ("KDPM2 ancestral", lambda: D.KDPM2AncestralDiscreteScheduler(), 6, 4),
    ("DEIS", lambda: D.DEISMultistepScheduler(), 12, 3),
    ("DPM SDE (Brownian tree)", lambda: D.DPMSolverSDEScheduler(noise_sampler_seed=5), 6, 4),
    ("LCM", lambda: D.LCMScheduler(), 6, 2),
    # LMS: order min(step_index + 1, 4) over the schedule's levels, those before the start
    # included, paired with the outputs since the start (diffusers' truncated sum)
    ("LMS", lambda: D.LMSDiscreteScheduler(), 10, 8),
    ("LMS v karras", lambda: D.LMSDiscreteScheduler(prediction_type="v_prediction",
                                                    use_karras_sigmas=True), 12, 2),
]


@pytest.mark.parametrize("label,make,steps,begin", BEGIN, ids=[c[0] for c in BEGIN])
def test_img2img_start(label, make, steps, begin):
    # img2img pipelines start at timesteps[begin:] (after set_begin_index where it exists);
    # the multistep schedulers restart their warm-up there. Without set_begin_index the
    # first timestep tells where the run starts.
    sch = make()
    x = 3.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = protocol_loop(copy.deepcopy(sch), NonlinearModel(), x, steps, begin=begin)
    out = protocol_loop(FusedScheduler.from_scheduler(sch), NonlinearModel(), x, steps,
                        begin=begin)
    record(f"img2img: {label} from entry {begin}", rel(out, ref))
    fused = FusedScheduler.from_scheduler(sch)
    fused.set_timesteps(steps)
    kw = step_kwargs(fused, 1)
    y, model = x, NonlinearModel()
    for t in fused.timesteps[begin:]:                  # no set_begin_index
        y = fused.step(model(fused.scale_model_input(y, t), t), t, y, **kw).prev_sample
    record(f"img2img: {label} from entry {begin}, found from the timestep", rel(y, ref))


def test_add_noise_and_pipeline_attributes():
    sch = D.EulerDiscreteScheduler(use_karras_sigmas=True)
    fused = FusedScheduler.from_scheduler(sch)
    ref = copy.deepcopy(sch)
    for s in (ref, fused):
        s.set_timesteps(12)
        s.set_begin_index(3)
    assert torch.equal(fused.timesteps, ref.timesteps)
    assert fused.init_noise_sigma == ref.init_noise_sigma
    assert fused.order == ref.order and len(fused) == len(ref) == 1000
    # the drop-in's config is its own copy's (register_to_config writes it), equal to the
    # wrapped scheduler's
    assert dict(fused.config) == dict(sch.config) and fused.begin_index == 3
    assert torch.equal(fused.sigmas, ref.sigmas)     # forwarded to the wrapped scheduler
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = ref.timesteps[3:4]
    assert torch.equal(fused.add_noise(x0, z, t), ref.add_noise(x0, z, t))
    # the original scheduler is untouched, and a switch back keeps working
    assert sch.num_inference_steps is None
    assert isinstance(D.DPMSolverMultistepScheduler.from_config(fused.config),
                      D.DPMSolverMultistepScheduler)


def test_pred_original_sample():
    # x0_hat on demand, equal to the scheduler's own pred_original_sample
    for make in (lambda: D.DDIMScheduler(clip_sample=False, prediction_type="v_prediction"),
                 lambda: D.EulerDiscreteScheduler(), lambda: D.EDMEulerScheduler()):
        sch = make()
        fused = FusedScheduler.from_scheduler(sch)
        ref = copy.deepcopy(sch)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        model = NonlinearModel()
        for s in (ref, fused):
            s.set_timesteps(5)
        t = ref.timesteps[0]
        a = ref.step(model(ref.scale_model_input(x, t), t), t, x)
        b = fused.step(model(fused.scale_model_input(x, t), t), t, x)
        assert isinstance(b, FusedSchedulerOutput) and b[0] is b.prev_sample
        assert rel(b.pred_original_sample, a.pred_original_sample) < TOL
        assert rel(b.prev_sample, a.prev_sample) < TOL


def test_no_host_reads_in_steps(monkeypatch):
    # The step loop reads nothing back from tensors: .item(), .tolist(), bool(), float() and
    # .cpu() raise inside it (once the run's start is known, from set_begin_index).
    if pe.backends.explain().get("cpp") is not None:
        pytest.skip("the torch reference backend reads its coefficient tensors with .item()")
    sch = D.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    fused = FusedScheduler.from_scheduler(sch, backend="cpp")
    fused.set_timesteps(6)
    fused.set_begin_index(0)
    model = NonlinearModel()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    outs = [model(x, t) for t in fused.timesteps]     # model calls outside the guarded part

    def forbid(*a, **k):
        raise AssertionError("host read of a tensor inside step()")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbid)
    for t, out in zip(fused.timesteps, outs):
        fused.scale_model_input(x, t)
        x = fused.step(out, t, x, generator=g).prev_sample
    monkeypatch.undo()
    assert torch.isfinite(x).all()


def test_pndm_phase_methods():
    # diffusers' PNDM tests loop step_prk over prk_timesteps, then step_plms over
    # plms_timesteps: on the drop-in they are steps of the run, in their phase
    sch = D.PNDMScheduler(steps_offset=1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = protocol_loop(copy.deepcopy(sch), NonlinearModel(), noise, 8)
    fused = FusedScheduler.from_scheduler(sch)
    fused.set_timesteps(8)
    x, model = noise, NonlinearModel()
    with pytest.raises(ValueError, match="prk phase"):
        fused.step_plms(x, fused.prk_timesteps[0], x)
    for t in fused.prk_timesteps:
        x = fused.step_prk(model(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="plms phase"):
        fused.step_prk(x, fused.plms_timesteps[0], x)
    for t in fused.plms_timesteps:
        x = fused.step_plms(model(x, t), t, x).prev_sample
    record("loop: PNDM step_prk / step_plms", rel(x, ref))
    # other classes have no such methods
    assert not hasattr(FusedScheduler.from_scheduler(D.DDIMScheduler()), "step_prk")
    # before set_timesteps they are diffusers' own (which raises there)
    with pytest.raises(ValueError, match="set_timesteps"):
        FusedScheduler.from_scheduler(sch).step_plms(noise, 1, noise)


def test_pndm_written_history_hands_the_steps_to_the_wrapped_class():
    # diffusers' PNDM tests write the multistep history (ets) and step with it at any
    # timestep: the drop-in's history is its plan's buffers, so those steps are the wrapped
    # class's, until the next set_timesteps starts a run of the drop-in's own
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=g)
    past = [torch.randn(SHAPE, generator=g) for _ in range(4)]
    ref = D.PNDMScheduler(steps_offset=1)
    fused = FusedScheduler.from_scheduler(D.PNDMScheduler(steps_offset=1))
    for s in (ref, fused):
        s.set_timesteps(20)
        s.ets = [p.clone() for p in past]
    assert all(torch.equal(a, b) for a, b in zip(fused.ets, past))
    for t in (0, 1, 501):
        for phase in ("step_prk", "step_plms"):
            a = getattr(fused, phase)(0.1 * x, t, x).prev_sample
            b = getattr(ref, phase)(0.1 * x, t, x).prev_sample
            assert torch.equal(a, b), (phase, t)
    # a new run is the drop-in's own again (phases checked, as in test_pndm_phase_methods)
    fused.set_timesteps(8)
    with pytest.raises(ValueError, match="prk phase"):
        fused.step_plms(x, fused.prk_timesteps[0], x)
    noise = torch.randn(SHAPE, generator=g)
    out = protocol_loop(fused, NonlinearModel(), noise, 8)
    record("loop: PNDM after a written history", rel(out, protocol_loop(
        D.PNDMScheduler(steps_offset=1), NonlinearModel(), noise, 8)))
    with pytest.raises(AttributeError, match="ets"):
        FusedScheduler.from_scheduler(D.DDIMScheduler()).ets = past


#: (class, steps): the Euler-type classes, whose scale_model_input divides by
#: sqrt(sigma^2 + 1), at enough levels that a float64 sqrt rounded to float32 would differ
#: from their float32 one somewhere (about 1% of levels do)
SCALED_INPUT = [(D.EulerDiscreteScheduler, 60), (D.EulerAncestralDiscreteScheduler, 60),
                (D.HeunDiscreteScheduler, 40), (D.LMSDiscreteScheduler, 60),
                (D.KDPM2DiscreteScheduler, 40), (D.KDPM2AncestralDiscreteScheduler, 40)]


@pytest.mark.parametrize("cls,steps", SCALED_INPUT, ids=[c[0].__name__ for c in SCALED_INPUT])
def test_scaled_model_input_is_bitwise_the_wrapped_class(cls, steps):
    g = torch.Generator().manual_seed(steps)
    ref, fused = cls(), FusedScheduler.from_scheduler(cls())
    for s in (ref, fused):
        s.set_timesteps(steps)
    kw = step_kwargs(ref, 3)
    kw2 = step_kwargs(fused, 3)
    x = 50.0 * torch.randn(SHAPE, generator=g)
    y, model = x.clone(), NonlinearModel()
    for t in ref.timesteps:
        a, b = fused.scale_model_input(y, t), ref.scale_model_input(x, t)
        assert torch.equal(a, b) if torch.equal(x, y) else True
        assert torch.equal(fused.scale_model_input(x, t), b), t
        y = fused.step(model(a, t), t, y, **kw2).prev_sample
        x = ref.step(model(b, t), t, x, **kw).prev_sample


def test_kdpm2_ancestral_steps_on_the_wrapped_class_levels():
    # KDPM2-ancestral keeps sigma_interpol / sigma_down / sigma_up in float32, where
    # sigma_down = sqrt(sigma'^2 - sigma_up^2) cancels (1e-4 relative): the drop-in steps on
    # those levels. diffusers' own test_full_loop_with_noise (img2img start, |x| ~ 250, a
    # model linear in x, so roundings of one sign add up) compares sum |x| within 1e-2; on
    # the levels recomputed in float64 the drop-in was 0.011 off
    def run(sch):
        sch.set_timesteps(10)
        g = torch.Generator().manual_seed(0)
        n = 4 * 3 * 8 * 8
        ramp = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
        noise = (torch.arange(n).flip(-1).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
        x = sch.add_noise(ramp * sch.init_noise_sigma, noise, sch.timesteps[16:17])
        for t in sch.timesteps[16:]:
            x = sch.scale_model_input(x, t)       # (the test steps from the scaled input)
            x = sch.step(x * t / (t + 1), t, x, generator=g).prev_sample
        return x.double().abs().sum().item()

    cfg = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02)
    ref = run(D.KDPM2AncestralDiscreteScheduler(**cfg))
    out = run(FusedScheduler.from_scheduler(D.KDPM2AncestralDiscreteScheduler(**cfg)))
    assert abs(out - ref) < 2e-3, (out, ref)
    # the levels option of the registry solver: checked, and the computed ones reproduce
    # the plan without it
    import math

    proc = pe.processes.VP.discrete("scaled_linear", beta_start=0.00085, beta_end=0.012)
    sig = [14.0, 5.0, 1.0, 0.1, 0.0]
    rows = []
    for c, cn in zip(sig, sig[1:]):
        up = math.sqrt(cn ** 2 * (c ** 2 - cn ** 2) / c ** 2)
        down = math.sqrt(max(cn ** 2 - up ** 2, 0.0))
        rows.append((math.exp(0.5 * (math.log(c) + math.log(down))) if down else 0.0, down,
                     up))
    base = pe.build_plan(proc, "dpm_2_ancestral", sig, "epsilon")
    given = pe.build_plan(proc, "dpm_2_ancestral", sig, "epsilon", levels=rows)
    assert repr(given.ops) == repr(base.ops)
    for bad in ([rows[0]], [(5.0, 20.0, 1.0)] * 4, "abc", [(1.0, float("nan"), 0.1)] * 4):
        with pytest.raises(ValueError, match="levels"):
            pe.build_plan(proc, "dpm_2_ancestral", sig, "epsilon", levels=bad)


#: 100 steps of a 100-timestep schedule repeat one level (steps 49 and 50 share sigma): a
#: zero-length step inside the run
REPEATED_LEVEL = [
    # diffusers draws the SDE noise of the zero-length (identity) step too
    ("DPM SDE++ order 1", D.DPMSolverMultistepScheduler, dict(
        algorithm_type="sde-dpmsolver++", solver_order=1)),
    ("DPM sde-dpmsolver order 1", D.DPMSolverMultistepScheduler, dict(
        algorithm_type="sde-dpmsolver", solver_order=1, final_sigmas_type="sigma_min")),
    # the zero-length step ends an order-2 block, or sits inside an order-3 block: an
    # update from the block's start, not the identity
    ("singlestep order 2", D.DPMSolverSinglestepScheduler, {}),
    ("singlestep SDE order 2", D.DPMSolverSinglestepScheduler, dict(
        algorithm_type="sde-dpmsolver++")),
    ("singlestep order 3", D.DPMSolverSinglestepScheduler, dict(solver_order=3)),
    ("singlestep SDE order 3", D.DPMSolverSinglestepScheduler, dict(
        algorithm_type="sde-dpmsolver++", solver_order=3)),
]


@pytest.mark.parametrize("label,cls,kw", REPEATED_LEVEL, ids=[c[0] for c in REPEATED_LEVEL])
def test_repeated_level_inside_the_run(label, cls, kw):
    sch = cls(num_train_timesteps=100, **kw)
    sch.set_timesteps(100)
    sig = sch.sigmas
    assert any(sig[i] == sig[i + 1] for i in range(len(sig) - 2))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = protocol_loop(copy.deepcopy(sch), NonlinearModel(), noise, 100)
    out = protocol_loop(FusedScheduler.from_scheduler(sch), NonlinearModel(), noise, 100)
    record(f"repeated level: {label}", rel(out, ref))


def test_repeated_level_where_diffusers_divides_by_zero():
    # the middle step of an order-3 heun block has length 0: diffusers' next update divides
    # by r0 - r1 = 0 (nan); the drop-in restarts the block there and stays finite
    sch = D.DPMSolverSinglestepScheduler(num_train_timesteps=100, solver_order=3,
                                         solver_type="heun")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ref = protocol_loop(copy.deepcopy(sch), NonlinearModel(), noise, 100)
    out = protocol_loop(FusedScheduler.from_scheduler(sch), NonlinearModel(), noise, 100)
    assert not torch.isfinite(ref).all() and torch.isfinite(out).all()


@pytest.mark.parametrize("bad,err,match", [
    (dict(sample=[1.0]), TypeError, "sample must be a torch.Tensor"),
    (dict(model_output="x"), TypeError, "model_output must be a torch.Tensor"),
    (dict(timestep=float("nan")), ValueError, "timestep must be finite"),
    (dict(timestep=torch.tensor(float("nan"))), ValueError, "timestep"),
    (dict(timestep="a"), TypeError, "timestep must be a number"),
])
@pytest.mark.parametrize("cls", [D.DDIMScheduler, D.EulerDiscreteScheduler,
                                 D.DPMSolverMultistepScheduler])
def test_step_names_a_bad_argument(cls, bad, err, match):
    fused = FusedScheduler.from_scheduler(cls())
    fused.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    args = dict(model_output=x, timestep=fused.timesteps[0], sample=x)
    args.update(bad)
    with pytest.raises(err, match=match):
        fused.step(**args)
    # after set_begin_index the timestep is not read (as in diffusers): None is accepted
    fused.set_timesteps(5)
    fused.set_begin_index(0)
    assert torch.isfinite(fused.step(x, None, x).prev_sample).all()


class _HalfModel(NonlinearModel):
    """A float16 model: float32 math, a float16 output (as a half-precision UNet's)."""

    def __call__(self, x, t):
        return super().__call__(x.float(), t).half()


@pytest.mark.parametrize("cls", [D.EulerDiscreteScheduler, D.EulerAncestralDiscreteScheduler,
                                 D.EDMEulerScheduler, D.DPMSolverMultistepScheduler,
                                 D.HeunDiscreteScheduler])
def test_half_model_output_keeps_the_wrapped_class_dtype(cls):
    # Euler, Euler ancestral, EDM Euler (and flow-matching Euler / Heun) step in float32 and
    # return the model output's dtype; the others return their float32 state
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = protocol_loop(cls(), _HalfModel(), noise, 6)
    out = protocol_loop(FusedScheduler.from_scheduler(cls()), _HalfModel(), noise, 6)
    assert out.dtype == ref.dtype
    # float16 rounding of the state after every step: a few float16 spacings apart
    assert rel(out.float(), ref.float()) < 5e-3


def test_unsupported_and_misuse_raise():
    with pytest.raises(NotImplementedError, match="ScoreSdeVeScheduler"):
        FusedScheduler.from_scheduler(D.ScoreSdeVeScheduler())
    with pytest.raises(NotImplementedError, match="algorithm_type"):
        FusedScheduler.from_scheduler(D.EDMDPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver++", solver_order=3)).set_timesteps(10)
    fused = FusedScheduler.from_scheduler(D.EulerDiscreteScheduler())
    x = torch.randn(SHAPE)
    # before set_timesteps the step is the wrapped class's own (its error for an int index)
    with pytest.raises(ValueError, match="integer"):
        fused.step(x, 999, x)
    fused.set_timesteps(2)
    # Euler's step takes no eta (pipelines pass it only where the class's step has it)
    with pytest.raises(TypeError, match="eta"):
        fused.step(x, fused.timesteps[0], x, eta=0.5)
    with pytest.raises(NotImplementedError, match="s_churn"):
        fused.step(x, fused.timesteps[0], x, s_churn=1.0)
    for t in fused.timesteps:
        x = fused.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(RuntimeError, match="more times"):
        fused.step(x, fused.timesteps[-1], x)


def test_add_noise_follows_the_run():
    # Inpainting pipelines re-noise the original latents to the next level after each step
    # with add_noise, which the Euler-type schedulers index by their step counter.
    sch = D.EulerDiscreteScheduler()
    ref, fused = copy.deepcopy(sch), FusedScheduler.from_scheduler(sch)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for s in (ref, fused):
        s.set_timesteps(6)
        s.set_begin_index(2)
    model = NonlinearModel()
    xs = {id(ref): x, id(fused): x}
    for t in ref.timesteps[2:]:
        for s in (ref, fused):
            xs[id(s)] = s.step(model(s.scale_model_input(xs[id(s)], t), t), t,
                               xs[id(s)]).prev_sample
        assert fused.step_index == ref.step_index
        assert torch.equal(fused.add_noise(x0, z, t.reshape(1)), ref.add_noise(x0, z, t.reshape(1)))
    assert rel(xs[id(fused)], xs[id(ref)]) < TOL
    copy.deepcopy(fused)                                # copies like a scheduler


def test_lcm_step_returns_denoised_as_lcm_pipelines_unpack_it():
    # LatentConsistencyModelPipeline: latents, denoised = scheduler.step(..., return_dict=False)
    sch = D.LCMScheduler(clip_sample=True)
    ref, fused = copy.deepcopy(sch), FusedScheduler.from_scheduler(sch)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    xs, dens = {}, {}
    for s in (ref, fused):
        s.set_timesteps(4)
        y, model, g, ds = x, NonlinearModel(), torch.Generator().manual_seed(2), []
        for t in s.timesteps:
            y, d = s.step(model(y, t), t, y, generator=g, return_dict=False)
            ds.append(d)
        xs[id(s)], dens[id(s)] = y, ds
    record("LCM loop with return_dict=False (prev, denoised)", rel(xs[id(fused)], xs[id(ref)]))
    for a, b in zip(dens[id(fused)], dens[id(ref)]):
        record("LCM denoised of every step", rel(a, b))


# -- diffusers' scheduler protocol, as its own tests exercise it (issue 11 item 4) ------------

def _loop(s, steps, x, seed=0, step_args=(), step_kwargs=None, begin=None):
    s.set_timesteps(steps)
    if begin is not None:
        s.set_begin_index(begin)
    g = torch.Generator().manual_seed(seed)
    model = NonlinearModel()
    outs = []
    extra = dict(step_kwargs or {})
    if "generator" in inspect.signature(s.step).parameters:     # as pipelines decide
        extra["generator"] = g
    for t in s.timesteps[begin or 0:]:
        out = s.step(model(s.scale_model_input(x, t), t), t, x, *step_args, **extra)
        outs.append(out)
        x = out.prev_sample
    return x, outs


def test_step_takes_the_wrapped_class_arguments():
    # DDIM's 4th positional argument is eta: honoured, not taken for the generator
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    sch = D.DDIMScheduler(clip_sample=False)
    eta = 0.3 + 0.5 * torch.rand(()).item()
    ref, _ = _loop(copy.deepcopy(sch), 7, x, step_args=(eta,))
    got, _ = _loop(FusedScheduler.from_scheduler(sch), 7, x, step_args=(eta,))
    plain, _ = _loop(copy.deepcopy(sch), 7, x)
    assert rel(got, ref) < 1e-5 and rel(plain, ref) > 1e-3
    for cls in (D.DDIMScheduler, D.EulerDiscreteScheduler, D.DPMSolverMultistepScheduler,
                D.TCDScheduler):
        fused = FusedScheduler.from_scheduler(cls())
        assert list(inspect.signature(fused.step).parameters) == \
            list(inspect.signature(cls().step).parameters)
    with pytest.raises(TypeError, match="eta"):
        fused = FusedScheduler.from_scheduler(D.DPMSolverMultistepScheduler())
        fused.set_timesteps(4)
        fused.step(x, fused.timesteps[0], x, eta=0.0)


@pytest.mark.parametrize("cls,n", [(D.DDIMScheduler, 2), (D.DDPMScheduler, 2),
                                   (D.EulerDiscreteScheduler, 2), (D.HeunDiscreteScheduler, 2),
                                   (D.EulerAncestralDiscreteScheduler, 2),
                                   (D.EDMEulerScheduler, 2), (D.LCMScheduler, 2),
                                   (D.TCDScheduler, 2), (D.DPMSolverMultistepScheduler, 1),
                                   (D.UniPCMultistepScheduler, 1)])
def test_outputs_are_shaped_as_the_wrapped_class(cls, n):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    sch = cls()
    _, ref = _loop(copy.deepcopy(sch), 3, x)
    _, got = _loop(FusedScheduler.from_scheduler(sch), 3, x)
    for r, g in zip(ref, got):
        assert len(g.to_tuple()) == len(r.to_tuple()) == n
        assert list(g.keys()) == list(r.keys())
        for key in r.keys():
            assert rel(g[key], r[key]) < 1e-5
        assert rel(g[0], r[0]) < 1e-5


def test_before_set_timesteps_and_outside_the_schedule():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    # Euler steps on its training schedule right after construction, as diffusers does
    ref, fused = D.EulerDiscreteScheduler(), FusedScheduler.from_scheduler(
        D.EulerDiscreteScheduler())
    t = ref.timesteps[0]
    a = ref.step(0.1 * x, t, ref.scale_model_input(x, t)).prev_sample
    b = fused.step(0.1 * x, t, fused.scale_model_input(x, t)).prev_sample
    assert torch.equal(a, b)
    # DPM-Solver / UniPC ignore the timestep of scale_model_input and fall back to the last
    # entry for a step at a timestep not in the schedule
    for cls in (D.DPMSolverMultistepScheduler, D.UniPCMultistepScheduler):
        ref, fused = cls(), FusedScheduler.from_scheduler(cls())
        for s in (ref, fused):
            s.set_timesteps(9)
        assert fused.scale_model_input(x, 0.0) is x
        assert rel(fused.step(0.1 * x, 0, x).prev_sample, ref.step(0.1 * x, 0, x).prev_sample) \
            < 1e-5
    # DDIM computes its step from a timestep outside the schedule
    ref, fused = D.DDIMScheduler(), FusedScheduler.from_scheduler(D.DDIMScheduler())
    for s in (ref, fused):
        s.set_timesteps(10)
    assert rel(fused.step(0.1 * x, 37, x).prev_sample, ref.step(0.1 * x, 37, x).prev_sample) \
        < 1e-5


def test_repeated_levels_and_custom_schedules():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    # 25 train timesteps at 25 steps: a repeated level inside the schedule (12, 12)
    cfg = dict(num_train_timesteps=25, solver_order=1)
    ref, fused = D.DPMSolverMultistepScheduler(**cfg), FusedScheduler.from_scheduler(
        D.DPMSolverMultistepScheduler(**cfg))
    a, _ = _loop(ref, 25, x)
    b, _ = _loop(fused, 25, x)
    assert torch.isfinite(a).all() and rel(b, a) < 1e-5
    # set_timesteps shows timesteps= / sigmas= (retrieve_timesteps reads its signature)
    params = inspect.signature(FusedScheduler.from_scheduler(
        D.EulerDiscreteScheduler()).set_timesteps).parameters
    assert "timesteps" in params and "sigmas" in params


def test_config_round_trip(tmp_path):
    from pyengine.integrations.diffusers import fused_class
    sch = D.DDIMScheduler(beta_end=0.013 + 0.01 * torch.rand(()).item(), clip_sample=False)
    fused = FusedScheduler.from_scheduler(sch)
    fused.save_pretrained(tmp_path)
    back = FusedScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert isinstance(back, FusedScheduler) and public(back.config) == public(sch.config)
    assert type(D.DDIMScheduler.from_pretrained(tmp_path)) is D.DDIMScheduler
    again = FusedScheduler.from_config(fused.config)
    assert again._name == "DDIMScheduler" and again.config.beta_end == sch.config.beta_end
    fused.register_to_config(steps_offset=1)
    assert fused.config.steps_offset == 1 == fused._inner.config.steps_offset
    cls = fused_class(D.EulerDiscreteScheduler)
    made = cls(beta_end=0.02, prediction_type="v_prediction")
    assert isinstance(made, FusedScheduler) and made.config.prediction_type == "v_prediction"
    assert isinstance(cls.from_config(made.config), cls)
    assert "prediction_type" in inspect.signature(cls.__init__).parameters


def test_pipeline_save_and_load(tmp_path):
    # a pipeline holding the drop-in saves it (model_index names the drop-in class, the
    # scheduler folder the diffusers class) and loads it back as the drop-in
    class Pipe(D.DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    beta_end = 0.013 + 0.01 * torch.rand(()).item()
    fused = FusedScheduler.from_scheduler(D.DDIMScheduler(beta_end=beta_end))
    assert isinstance(fused, D.SchedulerMixin)
    Pipe(fused).save_pretrained(tmp_path)
    back = Pipe.from_pretrained(tmp_path)
    assert isinstance(back.scheduler, FusedScheduler)
    assert back.scheduler.config.beta_end == beta_end
    assert type(D.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")) is \
        D.DDIMScheduler
