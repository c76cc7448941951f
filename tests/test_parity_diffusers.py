"""Parity with diffusers: from_diffusers(scheduler).sample == diffusers' own loop.

The reference is diffusers' full loop (latents = noise * init_noise_sigma; for each t:
scale_model_input, model call, step with a seeded generator). pyengine runs the Sampler that
from_diffusers returns, with the same nonlinear model, noise and an identically seeded
generator (noise drawn in diffusers' order). Both run in float32; the bound is 1e-5 relative
(max |a - b| / max |b|). `pytest -s` prints the worst error per scheduler.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch

D = pytest.importorskip("diffusers")

from pyengine.integrations.diffusers import (  # noqa: E402
    SUPPORTED,
    DiffusersSampler,
    from_diffusers,
)

# diffusers 0.42 itself warns (numpy __array__ copy keyword, deprecated algorithm types).
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
              # numpy 2 on diffusers' np.log(tensor) (DEIS), torchsde on diffusers' own
              # float32 query levels (DPMSolverSDE): both warn in diffusers' loop as well
              pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have:UserWarning")]

TOL = 1e-5
SHAPE = (2, 3, 8, 8)
WORST: dict[str, float] = {}


class NonlinearModel:
    """out = tanh(W x + b) (1 + sin(t/157)/2) + x cos(t/311)/5: nonlinear in x and in t, so a
    wrong time value, input scaling or step order shows up (a linear model would let errors
    cancel). t may be diffusers' 0-dim timestep or pyengine's [B] tensor."""

    def __init__(self, channels: int = SHAPE[1], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(channels, channels, generator=g) / channels ** 0.5
        self.b = 0.1 * torch.randn(channels, generator=g)
        self.times: list[float] = []

    def __call__(self, x, t):
        t = torch.as_tensor(t).to(torch.float32)
        self.times.append(float(t.reshape(-1)[0]))
        t = t.reshape(-1, 1, 1, 1) if t.dim() else t
        h = torch.einsum("oc,bchw->bohw", self.W.to(x.dtype), x) + \
            self.b.to(x.dtype).view(1, -1, 1, 1)
        return torch.tanh(h) * (1 + 0.5 * torch.sin(t / 157.0)) + 0.2 * x * torch.cos(t / 311.0)


def diffusers_loop(scheduler, model, noise, steps, seed, eta=None):
    sch = copy.deepcopy(scheduler)
    sch.set_timesteps(steps)
    params = inspect.signature(sch.step).parameters
    kw = {}
    if "generator" in params:
        kw["generator"] = torch.Generator().manual_seed(seed)
    if eta is not None:
        kw["eta"] = eta
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        x = sch.step(model(sch.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


def check_parity(label, scheduler, steps, *, eta=None, seed=1):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234 + steps))
    ref_model, pe_model = NonlinearModel(), NonlinearModel()
    ref = diffusers_loop(scheduler, ref_model, noise, steps, seed, eta)
    sampler = from_diffusers(scheduler, steps, **({} if eta is None else {"eta": eta}))
    assert isinstance(sampler, DiffusersSampler)
    out = sampler.sample(pe_model, noise, generator=torch.Generator().manual_seed(seed))
    out = sampler.to_scheduler_space(out)
    assert out.dtype == torch.float32 and torch.isfinite(ref).all()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    key = type(scheduler).__name__
    WORST[key] = max(WORST.get(key, 0.0), err)
    print(f"  {label:52s} steps={steps:3d} solver={sampler.solver:15s} rel err {err:.2e}")
    assert err < TOL, f"{label} at {steps} steps: relative error {err:.3e} > {TOL}"
    return sampler, ref_model, pe_model


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nworst parity error vs diffusers (float32, max|a-b|/max|b|):")
        for k, v in sorted(WORST.items()):
            print(f"  {k:34s} {v:.2e}")
        print(f"  {'overall':34s} {max(WORST.values()):.2e}")


# ---------------------------------------------------------------------------------------
# DDIM / DDPM
# ---------------------------------------------------------------------------------------

DDIM_CASES = [
    ("ddim eps", dict(), (10, 25)),
    ("ddim v, alpha_bar_0 final, steps_offset=1", dict(prediction_type="v_prediction",
                                                      set_alpha_to_one=False, steps_offset=1),
     (10,)),
    ("ddim sample, trailing", dict(prediction_type="sample", timestep_spacing="trailing"), (10,)),
    ("ddim eps, scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                     beta_end=0.012), (20,)),
]


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("label,cfg,steps", DDIM_CASES, ids=[c[0] for c in DDIM_CASES])
def test_ddim(label, cfg, steps, eta):
    for n in steps:
        check_parity(f"{label}, eta={eta}", D.DDIMScheduler(clip_sample=False, **cfg), n, eta=eta)


DDPM_CASES = [
    ("ddpm eps", dict(), (10, 25)),
    ("ddpm v, trailing", dict(prediction_type="v_prediction", timestep_spacing="trailing"), (7,)),
    ("ddpm sample, linspace", dict(prediction_type="sample", timestep_spacing="linspace"), (9,)),
]


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("label,cfg,steps", DDPM_CASES, ids=[c[0] for c in DDPM_CASES])
def test_ddpm(label, cfg, steps, variance_type):
    for n in steps:
        sch = D.DDPMScheduler(clip_sample=False, variance_type=variance_type, **cfg)
        check_parity(f"{label}, {variance_type}", sch, n)


# ---------------------------------------------------------------------------------------
# Euler, Euler ancestral, Heun, EDM Euler
# ---------------------------------------------------------------------------------------

EULER_CASES = [
    ("euler eps", dict(), (8, 20)),
    ("euler v, karras", dict(prediction_type="v_prediction", use_karras_sigmas=True), (12,)),
    ("euler sample, exponential", dict(prediction_type="sample", use_exponential_sigmas=True),
     (9,)),
    ("euler eps, leading, sigma_min final", dict(timestep_spacing="leading", steps_offset=1,
                                                 final_sigmas_type="sigma_min"), (10,)),
    ("euler eps, linspace, sigma_min final (zero-length last step)",
     dict(final_sigmas_type="sigma_min"), (10,)),
    ("euler v, zero terminal SNR, trailing", dict(
        prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing"), (10,)),
    ("euler v, continuous timesteps, log_linear", dict(
        prediction_type="v_prediction", timestep_type="continuous",
        interpolation_type="log_linear"), (10,)),
]


@pytest.mark.parametrize("label,cfg,steps", EULER_CASES, ids=[c[0] for c in EULER_CASES])
def test_euler(label, cfg, steps):
    for n in steps:
        check_parity(label, D.EulerDiscreteScheduler(**cfg), n)


EULER_A_CASES = [
    ("euler_a eps", dict(), (8, 20)),
    ("euler_a v, trailing", dict(prediction_type="v_prediction", timestep_spacing="trailing"),
     (11,)),
    ("euler_a v, zero terminal SNR, trailing", dict(
        prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing"), (10,)),
    ("euler_a eps, leading, scaled_linear", dict(timestep_spacing="leading", steps_offset=1,
                                                 beta_schedule="scaled_linear",
                                                 beta_start=0.00085, beta_end=0.012), (10,)),
]


@pytest.mark.parametrize("label,cfg,steps", EULER_A_CASES, ids=[c[0] for c in EULER_A_CASES])
def test_euler_ancestral(label, cfg, steps):
    for n in steps:
        check_parity(label, D.EulerAncestralDiscreteScheduler(**cfg), n)


HEUN_CASES = [
    ("heun eps", dict(), (6, 16)),
    ("heun v, karras", dict(prediction_type="v_prediction", use_karras_sigmas=True), (8,)),
    ("heun sample, trailing", dict(prediction_type="sample", timestep_spacing="trailing"), (7,)),
]


@pytest.mark.parametrize("label,cfg,steps", HEUN_CASES, ids=[c[0] for c in HEUN_CASES])
def test_heun(label, cfg, steps):
    for n in steps:
        check_parity(label, D.HeunDiscreteScheduler(**cfg), n)


EDM_CASES = [
    ("edm euler eps, karras", dict(), (8, 20)),
    ("edm euler v, exponential, sigma_min final", dict(
        prediction_type="v_prediction", sigma_schedule="exponential",
        final_sigmas_type="sigma_min"), (10,)),
    ("edm euler eps, sigma_data=1, rho=5", dict(sigma_data=1.0, rho=5.0, sigma_max=20.0), (9,)),
]


@pytest.mark.parametrize("label,cfg,steps", EDM_CASES, ids=[c[0] for c in EDM_CASES])
def test_edm_euler(label, cfg, steps):
    for n in steps:
        check_parity(label, D.EDMEulerScheduler(**cfg), n)


# ---------------------------------------------------------------------------------------
# DPM-Solver multistep (2M, 3M, SDE 2M), singlestep, UniPC
# ---------------------------------------------------------------------------------------

# 5, 8 and 14 steps: lower_order_final applies (diffusers: only below 15); 15 and 20: not.
MULTISTEP_STEPS = (5, 8, 14, 15, 20)

DPM_CASES = [
    ("2M eps", dict(), MULTISTEP_STEPS),
    ("2M v, heun", dict(prediction_type="v_prediction", solver_type="heun"), (8, 16)),
    ("2M sample, karras", dict(prediction_type="sample", use_karras_sigmas=True), (10, 16)),
    ("2M eps, karras, sigma_min final (zero-length last step)",
     dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), (10, 20)),
    ("2M eps, sigma_min final, lower_order_final=False",
     dict(final_sigmas_type="sigma_min", lower_order_final=False), (10,)),
    ("2M eps, sigma_min final, euler_at_final", dict(final_sigmas_type="sigma_min",
                                                     euler_at_final=True), (20,)),
    ("3M eps", dict(solver_order=3), MULTISTEP_STEPS),
    ("3M v, heun warm-up", dict(solver_order=3, prediction_type="v_prediction",
                                solver_type="heun"), (8, 16)),
    ("3M eps, sigma_min final", dict(solver_order=3, final_sigmas_type="sigma_min"), (10, 20)),
    ("2M v, zero terminal SNR, trailing", dict(
        prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing"), (10,)),
    ("3M sample, lu lambdas, trailing", dict(solver_order=3, prediction_type="sample",
                                             use_lu_lambdas=True, timestep_spacing="trailing"),
     (12,)),
    ("SDE 2M eps", dict(algorithm_type="sde-dpmsolver++"), MULTISTEP_STEPS),
    ("SDE 2M v, heun", dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                            prediction_type="v_prediction"), (8, 16)),
    ("SDE 2M eps, karras", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
     (16,)),
    ("SDE 1 (= DDIM eta 1)", dict(algorithm_type="sde-dpmsolver++", solver_order=1), (10,)),
    ("1 (= DDIM)", dict(solver_order=1, prediction_type="v_prediction"), (10,)),
    # noise prediction with noise (diffusers: nan on a step to sigma 0, hence sigma_min)
    ("sde-dpmsolver 2 eps", dict(algorithm_type="sde-dpmsolver",
                                 final_sigmas_type="sigma_min"), (1, 2, 5, 16)),
    ("sde-dpmsolver 2 v, heun", dict(algorithm_type="sde-dpmsolver", solver_type="heun",
                                     prediction_type="v_prediction",
                                     final_sigmas_type="sigma_min"), (8, 20)),
    ("sde-dpmsolver 2 sample, karras", dict(algorithm_type="sde-dpmsolver",
                                            prediction_type="sample", use_karras_sigmas=True,
                                            final_sigmas_type="sigma_min"), (12,)),
    ("sde-dpmsolver 1", dict(algorithm_type="sde-dpmsolver", solver_order=1,
                             final_sigmas_type="sigma_min"), (10,)),
    # order 3 with no third-order step (diffusers raises at one)
    ("sde-dpmsolver 3, 2 steps", dict(algorithm_type="sde-dpmsolver", solver_order=3,
                                      final_sigmas_type="sigma_min"), (2,)),
    ("SDE 3M eps", dict(algorithm_type="sde-dpmsolver++", solver_order=3), (5, 16, 20)),
    ("SDE 3M v, heun", dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                            solver_type="heun", prediction_type="v_prediction"), (10,)),
]


@pytest.mark.parametrize("label,cfg,steps", DPM_CASES, ids=[c[0] for c in DPM_CASES])
def test_dpm_multistep(label, cfg, steps):
    for n in steps:
        check_parity(label, D.DPMSolverMultistepScheduler(**cfg), n)


SINGLESTEP_CASES = [
    ("single o2 eps", dict(), (6, 7, 16)),
    ("single o3 eps", dict(solver_order=3), (6, 7, 8, 16)),
    ("single o3 v, heun", dict(solver_order=3, prediction_type="v_prediction",
                               solver_type="heun"), (12,)),
    ("single o2 sample, karras", dict(prediction_type="sample", use_karras_sigmas=True), (9,)),
    ("single o2 dpmsolver, sigma_min final", dict(algorithm_type="dpmsolver",
                                                  final_sigmas_type="sigma_min"), (10,)),
    ("single o3 dpmsolver heun, sigma_min final", dict(
        solver_order=3, algorithm_type="dpmsolver", solver_type="heun",
        final_sigmas_type="sigma_min"), (12,)),
    # a block ending on the repeated last level (kept, nudged by 2^-30)
    ("single o2 karras, sigma_min final", dict(use_karras_sigmas=True,
                                               final_sigmas_type="sigma_min"), (10,)),
    ("single o3 karras, sigma_min final", dict(use_karras_sigmas=True, solver_order=3,
                                               final_sigmas_type="sigma_min"), (9, 12)),
    # SDE: noise drawn in every step(), intermediate steps of a block too
    ("single sde o1", dict(algorithm_type="sde-dpmsolver++", solver_order=1), (1, 5)),
    ("single sde o2 eps", dict(algorithm_type="sde-dpmsolver++"), (2, 7, 16)),
    ("single sde o2 v, heun", dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                   prediction_type="v_prediction"), (10,)),
    ("single sde o3 sample", dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                                  prediction_type="sample"), (9, 16)),
]


@pytest.mark.parametrize("label,cfg,steps", SINGLESTEP_CASES,
                         ids=[c[0] for c in SINGLESTEP_CASES])
def test_dpm_singlestep(label, cfg, steps):
    for n in steps:
        check_parity(label, D.DPMSolverSinglestepScheduler(**cfg), n)


UNIPC_CASES = [
    # bh1 returns nan in diffusers on a step to sigma 0 (B(h) = h = inf): sigma_min final.
    ("unipc bh1 p2", dict(solver_type="bh1", final_sigmas_type="sigma_min"), (5, 8, 16)),
    ("unipc bh1 p3", dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
     (5, 8, 16)),
    ("unipc bh2 p2", dict(), (5, 8, 16)),
    ("unipc bh2 p3", dict(solver_order=3), (5, 8, 16)),
    ("unipc bh2 p3 v, karras", dict(solver_order=3, prediction_type="v_prediction",
                                    use_karras_sigmas=True), (10,)),
    ("unipc bh2 p3 sample, disable_corrector=[0, 3]", dict(
        solver_order=3, prediction_type="sample", disable_corrector=[0, 3]), (10,)),
    ("unipc bh1 p3, lower_order_final=False", dict(
        solver_type="bh1", solver_order=3, lower_order_final=False,
        final_sigmas_type="sigma_min"), (10,)),
    # Karras sigmas end at sigma_min, then sigma_min again: the last step's predictor is the
    # identity but the corrector of the step before still runs (the plan keeps that step on
    # a last level nudged by 2^-30)
    ("unipc bh2 p2 karras, sigma_min final", dict(use_karras_sigmas=True,
                                                  final_sigmas_type="sigma_min"), (2, 10)),
    ("unipc bh2 p3 karras, sigma_min final", dict(use_karras_sigmas=True, solver_order=3,
                                                  final_sigmas_type="sigma_min"), (16,)),
    ("unipc bh1 p2 karras, sigma_min final, lower_order_final=False", dict(
        use_karras_sigmas=True, solver_type="bh1", lower_order_final=False,
        final_sigmas_type="sigma_min"), (10,)),
]


@pytest.mark.parametrize("label,cfg,steps", UNIPC_CASES, ids=[c[0] for c in UNIPC_CASES])
def test_unipc(label, cfg, steps):
    for n in steps:
        check_parity(label, D.UniPCMultistepScheduler(**cfg), n)


# ---------------------------------------------------------------------------------------
# The model sees diffusers' own time values; the scheduler is left untouched
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,steps", [
    (lambda: D.DPMSolverMultistepScheduler(use_karras_sigmas=True), 10),      # rounded timesteps
    (lambda: D.EulerDiscreteScheduler(use_karras_sigmas=True), 10),           # fractional timesteps
    (lambda: D.HeunDiscreteScheduler(), 6),                                   # repeated timesteps
    (lambda: D.EDMEulerScheduler(), 6),                                       # 0.25 log sigma
], ids=["dpm_karras", "euler_karras", "heun", "edm"])
def test_model_sees_the_schedulers_timesteps(make, steps):
    scheduler = make()
    _, ref_model, pe_model = check_parity(f"timesteps of {type(scheduler).__name__}",
                                          scheduler, steps)
    assert len(pe_model.times) == len(ref_model.times)
    torch.testing.assert_close(torch.tensor(pe_model.times), torch.tensor(ref_model.times),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,eta", [
    (lambda: D.DDIMScheduler(clip_sample=False), 1.0),
    (lambda: D.DDPMScheduler(clip_sample=False), None),
    (lambda: D.EulerAncestralDiscreteScheduler(), None),
    (lambda: D.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), None),
], ids=["ddim_eta1", "ddpm", "euler_a", "sde_2m"])
def test_stochastic_parity_depends_on_the_generator(make, eta):
    # The parity above is not an accident of small noise: another seed moves the result.
    scheduler, steps = make(), 8
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ref = diffusers_loop(scheduler, NonlinearModel(), noise, steps, seed=1, eta=eta)
    sampler = from_diffusers(scheduler, steps, **({} if eta is None else {"eta": eta}))
    other = sampler.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(2))
    assert ((other - ref).abs().max() / ref.abs().max()).item() > 1e-2


def test_scheduler_not_modified_and_overrides():
    sch = D.DPMSolverMultistepScheduler()
    before = sch.timesteps.clone()
    sampler = from_diffusers(sch, 10, backend="torch", lower_order_final=False)
    assert sch.num_inference_steps is None and torch.equal(sch.timesteps, before)
    assert sampler.options["lower_order_final"] is False and sampler.backend == "torch"
    assert sampler.steps == 10 and sampler.scheduler_name == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match="sigmas"):
        from_diffusers(sch, 10, sigmas=[1.0, 0.0])


def test_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; "
            "import pyengine.integrations.diffusers as m; print(len(m.SUPPORTED))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(len(SUPPORTED))


# ---------------------------------------------------------------------------------------
# Configurations that do not fold into a linear plan raise, naming the config field
# ---------------------------------------------------------------------------------------


UNSUPPORTED = [
    ("ddpm", "variance_type",
     lambda: D.DDPMScheduler(clip_sample=False, variance_type="learned_range")),
    ("edm dpm sde order 3", "algorithm_type", lambda: D.EDMDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++", solver_order=3)),
    ("unipc", "predict_x0", lambda: D.UniPCMultistepScheduler(predict_x0=False)),
    ("ddim", "rescale_betas_zero_snr",
     lambda: D.DDIMScheduler(clip_sample=False, rescale_betas_zero_snr=True,
                             timestep_spacing="trailing")),
    ("dpm flow_prediction on VP sigmas", "use_flow_sigmas", lambda: D.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction")),
]


@pytest.mark.parametrize("field,make", [c[1:] for c in UNSUPPORTED],
                         ids=[f"{c[0]}-{c[1]}" for c in UNSUPPORTED])
def test_unsupported_configs_raise(field, make):
    with pytest.raises(NotImplementedError, match=field):
        from_diffusers(make(), 10)


def test_unrepresentable_or_nan_configs_raise():
    # DDIM's prev_timestep = t - N // n misses the next timestep with uneven trailing spacing.
    with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
        from_diffusers(D.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), 7)
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        from_diffusers(D.DDIMScheduler(clip_sample=False, timestep_spacing="linspace"), 10)
    # diffusers' own UniPC bh1 returns nan on the step to sigma 0.
    with pytest.raises(ValueError, match="bh1"):
        from_diffusers(D.UniPCMultistepScheduler(solver_type="bh1"), 10)
    # A zero-length final step on which diffusers' heun-type update divides by h = 0.
    with pytest.raises(ValueError, match="length 0"):
        from_diffusers(D.DPMSolverMultistepScheduler(
            solver_type="heun", use_karras_sigmas=True, final_sigmas_type="sigma_min"), 20)
    with pytest.raises(ValueError, match="order-3 UniPC"):
        from_diffusers(D.UniPCMultistepScheduler(
            use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False,
            solver_order=3), 10)
    with pytest.raises(ValueError, match="eta"):
        from_diffusers(D.EulerDiscreteScheduler(), 10, eta=0.5)
    with pytest.raises(NotImplementedError, match="ScoreSdeVeScheduler"):
        from_diffusers(D.ScoreSdeVeScheduler(), 10)
    with pytest.raises(NotImplementedError, match="IPNDMScheduler is not supported: its first "
                                                  "step is at alpha = 0"):
        from_diffusers(D.IPNDMScheduler(), 10)
    # PNDM's prev_timestep = t - N // n misses the next timestep with linspace spacing
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        from_diffusers(D.PNDMScheduler(skip_prk_steps=True, timestep_spacing="linspace"), 7)
    # sde-dpmsolver: diffusers raises at a third-order step
    with pytest.raises(ValueError, match="third-order"):
        from_diffusers(D.DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"), 5)
    # a single step of length 0 (PNDM with set_alpha_to_one=False at 1 step)
    with pytest.raises(ValueError, match="length 0"):
        from_diffusers(D.PNDMScheduler(skip_prk_steps=True), 1)


# ---------------------------------------------------------------------------------------
# clip_sample / thresholding: the clipped x0 as a custom op of the plan (clip_x0)
# ---------------------------------------------------------------------------------------

X0_CASES = [
    ("ddim default (clip_sample=True)", lambda: D.DDIMScheduler(), (1, 10), (0.0, 1.0)),
    ("ddim v, clip_sample_range=0.5", lambda: D.DDIMScheduler(
        prediction_type="v_prediction", clip_sample_range=0.5), (7,), (0.0,)),
    ("ddim thresholding", lambda: D.DDIMScheduler(thresholding=True, sample_max_value=2.0),
     (10,), (0.0, 1.0)),
    # the last step is from alpha_bar_0 to alpha_bar_0: not the identity with a clipped x0
    # and the model's own noise estimate
    ("ddim clip, zero-length last step", lambda: D.DDIMScheduler(set_alpha_to_one=False),
     (3,), (0.0, 1.0)),
    ("ddpm default (clip_sample=True)", lambda: D.DDPMScheduler(), (1, 10), (None,)),
    ("ddpm thresholding, fixed_large", lambda: D.DDPMScheduler(
        thresholding=True, variance_type="fixed_large"), (8,), (None,)),
    ("heun clip_sample_range=2", lambda: D.HeunDiscreteScheduler(
        clip_sample=True, clip_sample_range=2.0), (6,), (None,)),
    ("dpm 2M thresholding", lambda: D.DPMSolverMultistepScheduler(
        thresholding=True, sample_max_value=3.0), (10,), (None,)),
    ("dpm 3M thresholding", lambda: D.DPMSolverMultistepScheduler(
        thresholding=True, solver_order=3), (16,), (None,)),
    ("dpm SDE 2M thresholding", lambda: D.DPMSolverMultistepScheduler(
        thresholding=True, algorithm_type="sde-dpmsolver++"), (10,), (None,)),
    ("dpm dpmsolver 2 thresholding", lambda: D.DPMSolverMultistepScheduler(
        thresholding=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), (10,),
     (None,)),
    ("singlestep thresholding", lambda: D.DPMSolverSinglestepScheduler(thresholding=True),
     (10,), (None,)),
    ("unipc thresholding", lambda: D.UniPCMultistepScheduler(thresholding=True), (10,),
     (None,)),
    ("deis thresholding", lambda: D.DEISMultistepScheduler(thresholding=True), (12,), (None,)),
    ("lcm v clip_sample", lambda: D.LCMScheduler(prediction_type="v_prediction",
                                                  clip_sample=True), (4,), (None,)),
]


@pytest.mark.parametrize("label,make,steps,etas", X0_CASES, ids=[c[0] for c in X0_CASES])
def test_clip_sample_and_thresholding(label, make, steps, etas):
    for n in steps:
        for eta in etas:
            sampler, _, _ = check_parity(f"{label}, eta={eta}", make(), n, eta=eta)
            assert sampler.solver == "clip_x0"
    # the clip matters here: the same loop without it gives another result
    sch = make()
    cfg = {"thresholding": False, "clip_sample": False}
    plain = type(sch).from_config(sch.config, **{k: v for k, v in cfg.items()
                                                 if k in sch.config})
    assert not plain.config.get("clip_sample") and not plain.config.get("thresholding")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234 + steps[-1]))
    a = from_diffusers(sch, steps[-1], **({} if etas[0] is None else {"eta": etas[0]}))
    b = from_diffusers(plain, steps[-1], **({} if etas[0] is None else {"eta": etas[0]}))
    xa = a.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(1))
    xb = b.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(1))
    assert ((xa - xb).abs().max() / xb.abs().max()).item() > 1e-3


def test_use_clipped_model_output():
    sch = D.DDIMScheduler(prediction_type="v_prediction")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref_sch = copy.deepcopy(sch)
    ref_sch.set_timesteps(8)
    x, model = noise, NonlinearModel()
    for t in ref_sch.timesteps:
        x = ref_sch.step(model(x, t), t, x, use_clipped_model_output=True).prev_sample
    sampler = from_diffusers(sch, 8, use_clipped_model_output=True)
    out = sampler.sample(NonlinearModel(), noise)
    err = ((out - x).abs().max() / x.abs().max()).item()
    WORST["DDIMScheduler"] = max(WORST.get("DDIMScheduler", 0.0), err)
    assert err < TOL
    other = from_diffusers(sch, 8).sample(NonlinearModel(), noise)
    assert ((other - x).abs().max() / x.abs().max()).item() > 1e-3


# ---------------------------------------------------------------------------------------
# Distilled and classic schedulers
# ---------------------------------------------------------------------------------------

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

CLASSIC_CASES = [
    ("lcm eps (SD)", lambda: D.LCMScheduler(**SD), (1, 4, 8), (None,)),
    ("lcm v, original_inference_steps=30", lambda: D.LCMScheduler(
        prediction_type="v_prediction", original_inference_steps=30), (6,), (None,)),
    ("tcd eps (SD), gamma 0.3 default", lambda: D.TCDScheduler(**SD), (1, 4, 8), (None,)),
    ("tcd gamma 0, 0.5, 1", lambda: D.TCDScheduler(**SD), (6,), (0.0, 0.5, 1.0)),
    ("tcd sample", lambda: D.TCDScheduler(prediction_type="sample"), (5,), (0.4,)),
    ("pndm plms (SD 1.5)", lambda: D.PNDMScheduler(
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **SD), (2, 3, 5, 25),
     (None,)),
    # 2 steps, timestep 0 last: the second step goes from alpha_bar_0 to alpha_bar_0 (length
    # 0) and is what makes the first a pseudo-Heun pair
    ("pndm plms v, 2 steps ending on a zero-length step", lambda: D.PNDMScheduler(
        skip_prk_steps=True, prediction_type="v_prediction"), (2,), (None,)),
    ("pndm plms v, alpha_bar final 1", lambda: D.PNDMScheduler(
        skip_prk_steps=True, prediction_type="v_prediction", set_alpha_to_one=True), (1, 7),
     (None,)),
    # the pseudo Runge-Kutta warm-up (diffusers' default; set_timesteps needs >= 4 steps):
    # 9 steps make N // n = 111 odd (first midpoint state one timestep above its call's)
    ("pndm prk (default config, zero-length last step)", lambda: D.PNDMScheduler(),
     (4, 5, 9, 50), (None,)),
    ("pndm prk v, set_alpha_to_one", lambda: D.PNDMScheduler(
        prediction_type="v_prediction", set_alpha_to_one=True), (4, 9, 13), (None,)),
    ("pndm prk (SD 1.5 betas), steps_offset=1", lambda: D.PNDMScheduler(
        steps_offset=1, **SD), (6, 27), (None,)),
    # 100 of 100 timesteps: midpoint gap N // n // 2 = 0 (the first midpoint call is at the
    # next timestep on the unchanged state)
    ("pndm prk, 100 train timesteps", lambda: D.PNDMScheduler(num_train_timesteps=100),
     (7, 100), (None,)),
    ("lms eps", lambda: D.LMSDiscreteScheduler(), (1, 2, 10), (None,)),
    ("lms v, karras (SD)", lambda: D.LMSDiscreteScheduler(
        prediction_type="v_prediction", use_karras_sigmas=True, **SD), (12,), (None,)),
    ("lms sample, trailing", lambda: D.LMSDiscreteScheduler(
        prediction_type="sample", timestep_spacing="trailing"), (9,), (None,)),
    ("kdpm2 eps", lambda: D.KDPM2DiscreteScheduler(), (1, 6), (None,)),
    ("kdpm2 v, karras", lambda: D.KDPM2DiscreteScheduler(
        prediction_type="v_prediction", use_karras_sigmas=True), (5,), (None,)),
    ("kdpm2 ancestral eps", lambda: D.KDPM2AncestralDiscreteScheduler(), (1, 6), (None,)),
    ("kdpm2 ancestral v (SD)", lambda: D.KDPM2AncestralDiscreteScheduler(
        prediction_type="v_prediction", **SD), (4,), (None,)),
    ("edm dpm 2M eps", lambda: D.EDMDPMSolverMultistepScheduler(), (1, 10, 20), (None,)),
    ("edm dpm 3M v, sigma_data=1", lambda: D.EDMDPMSolverMultistepScheduler(
        solver_order=3, prediction_type="v_prediction", sigma_data=1.0), (12,), (None,)),
    ("edm dpm SDE 2M", lambda: D.EDMDPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver++"), (10,), (None,)),
    ("edm dpm exponential, sigma_min final (zero-length last step)",
     lambda: D.EDMDPMSolverMultistepScheduler(final_sigmas_type="sigma_min",
                                              sigma_schedule="exponential"), (10,), (None,)),
    ("deis order 3", lambda: D.DEISMultistepScheduler(), (1, 5, 14, 20), (None,)),
    ("deis order 3 karras (zero-length last step)", lambda: D.DEISMultistepScheduler(
        use_karras_sigmas=True), (12,), (None,)),
    ("deis order 3 exponential, 16 steps (order 3 on the zero-length last step)",
     lambda: D.DEISMultistepScheduler(use_exponential_sigmas=True), (16,), (None,)),
    ("deis order 2 v", lambda: D.DEISMultistepScheduler(solver_order=2,
                                                        prediction_type="v_prediction"),
     (8,), (None,)),
    ("dpm dpmsolver 2", lambda: D.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), (10,), (None,)),
    ("dpm dpmsolver 3 heun", lambda: D.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver", solver_order=3, solver_type="heun",
        final_sigmas_type="sigma_min"), (20,), (None,)),
    ("dpm sde (Brownian tree), eps", lambda: D.DPMSolverSDEScheduler(noise_sampler_seed=3),
     (1, 6), (None,)),
    ("dpm sde (Brownian tree), v karras", lambda: D.DPMSolverSDEScheduler(
        noise_sampler_seed=11, prediction_type="v_prediction", use_karras_sigmas=True), (8,),
     (None,)),
    ("euler log_linear", lambda: D.EulerDiscreteScheduler(interpolation_type="log_linear"),
     (1, 10), (None,)),
    ("euler v log_linear, trailing", lambda: D.EulerDiscreteScheduler(
        interpolation_type="log_linear", prediction_type="v_prediction",
        timestep_spacing="trailing"), (7,), (None,)),
]


@pytest.mark.parametrize("label,make,steps,etas", CLASSIC_CASES,
                         ids=[c[0] for c in CLASSIC_CASES])
def test_distilled_and_classic(label, make, steps, etas):
    for n in steps:
        for eta in etas:
            check_parity(f"{label}, eta={eta}", make(), n, eta=eta)


class _Float64Model:
    """NonlinearModel's formula in float64 (diffusers then steps in float64 from its float32
    tables, as pyengine does from the same tables)."""

    def __init__(self, channels: int = SHAPE[1], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = (torch.randn(channels, channels, generator=g) / channels ** 0.5).double()
        self.b = 0.1 * torch.randn(channels, generator=g).double()

    def __call__(self, x, t):
        t = torch.as_tensor(t).to(torch.float64)
        t = t.reshape(-1, 1, 1, 1) if t.dim() else t
        h = torch.einsum("oc,bchw->bohw", self.W.to(x.dtype), x) + \
            self.b.to(x.dtype).view(1, -1, 1, 1)
        return torch.tanh(h) * (1 + 0.5 * torch.sin(t / 157.0)) + 0.2 * x * torch.cos(t / 311.0)


@pytest.mark.parametrize("cfg,steps", [(dict(), 4), (dict(prediction_type="v_prediction"), 9),
                                       (dict(steps_offset=1, set_alpha_to_one=True), 20)])
def test_pndm_prk_float64(cfg, steps):
    # diffusers' tables as float64 (the same numbers: its float32 values converted), so that
    # its step computes its coefficients in float64 too; the rest is each side's own
    # arithmetic (pyengine: float64 coefficients from the grid, one fused update per op)
    sch = D.PNDMScheduler(**cfg)
    sch.alphas_cumprod = sch.alphas_cumprod.double()
    sch.final_alpha_cumprod = torch.as_tensor(sch.final_alpha_cumprod).double()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps),
                        dtype=torch.float64)
    ref = diffusers_loop(sch, _Float64Model(), noise, steps, 0)
    sampler = from_diffusers(sch, steps)
    assert sampler.solver == "pndm"
    out = sampler.to_scheduler_space(sampler.sample(_Float64Model(), noise))
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    WORST["PNDMScheduler float64"] = max(WORST.get("PNDMScheduler float64", 0.0), err)
    assert out.dtype == torch.float64 and err < 1e-12, err


def test_single_sde_o3_heun_amplified_rounding():
    # diffusers' third-order SDE heun update weighs D2 (a second divided difference of the
    # model outputs over r0 - r1) by (1 - e^-2h - 2h)/(2h)^2 - 1/2 ~ -1, where the ODE's
    # weight is ~h/6: float32 rounding of the outputs' differences (diffusers rounds each
    # operation, pyengine once per fused update) shows at 2.6e-5. In float64 (same draws) the
    # two agree to 1.2e-6 (diffusers' float32 coefficients).
    global TOL
    sch = D.DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3,
                                         solver_type="heun", final_sigmas_type="sigma_min")
    old, TOL = TOL, 5e-5
    try:
        check_parity("single sde o3 heun, sigma_min final (float32 rounding amplified)", sch,
                     12)
    finally:
        TOL = old
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = diffusers_loop(sch, _Float64Model(), noise, 12, 1)
    sampler = from_diffusers(sch, 12)
    out = sampler.sample(_Float64Model(), noise, generator=torch.Generator().manual_seed(1))
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-6


def test_deis_flow_float32_coefficients():
    # diffusers computes DEIS's log-rho coefficients with np.log of float32 tensors (and rho =
    # t / (1 - t) in float32): on this flow grid they differ from the exact float64 ones by up
    # to 4e-6 of the step, which shows in the result at 2e-5
    global TOL
    old, TOL = TOL, 5e-5
    try:
        check_parity("deis order 3, flow sigmas, flow_shift=3 (zero-length last step; "
                     "float32 coefficients in diffusers)", D.DEISMultistepScheduler(
                         use_flow_sigmas=True, prediction_type="flow_prediction",
                         flow_shift=3.0), 10)
    finally:
        TOL = old


def test_dpm_sde_noise_is_the_schedulers_brownian_tree():
    # another noise_sampler_seed moves the result; the generator does not
    sch = D.DPMSolverSDEScheduler(noise_sampler_seed=3)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    sampler = from_diffusers(sch, 6)
    a = sampler.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(1))
    b = sampler.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = from_diffusers(D.DPMSolverSDEScheduler(noise_sampler_seed=4), 6).sample(
        NonlinearModel(), noise)
    assert ((c - a).abs().max() / a.abs().max()).item() > 1e-2
