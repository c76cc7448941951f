"""Flow matching through the diffusers adapter: from_diffusers(scheduler) and the drop-in
FusedScheduler against diffusers' own full loop, same nonlinear model, same noise, same
generator seed, for every FlowMatchEulerDiscreteScheduler option that changes the math, the
flow Heun scheduler, and DPM-Solver / UniPC with use_flow_sigmas.

The reference loop is the pipelines' (latents = noise; for each t: model, step); the custom
schedule keywords (mu, sigmas, timesteps) go to set_timesteps in both. float32, bound 1e-5
relative (max |a - b| / max |b|); `pytest -s` prints the worst error per configuration.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

D = pytest.importorskip("diffusers")

from pyengine.integrations.diffusers import (  # noqa: E402
    FLOW_T_TOP,
    FusedScheduler,
    from_diffusers,
)

from test_parity_diffusers import SHAPE, NonlinearModel  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
              pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
              # numpy 2 on diffusers' np.log(tensor) (DEIS), torchsde on diffusers' own
              # float32 query levels (DPMSolverSDE): both warn in diffusers' loop as well
              pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Should have:UserWarning")]

TOL = 1e-5
WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    if WORST:
        print("\nworst flow parity error vs diffusers (float32, max|a-b|/max|b|):")
        for k, v in sorted(WORST.items()):
            print(f"  {k:70s} {v:.2e}")


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def record(key, err):
    WORST[key] = max(WORST.get(key, 0.0), err)
    assert err < TOL, f"{key}: relative error {err:.3e} > {TOL}"


def reference_loop(sch, model, noise, steps, seed, st):
    """diffusers' own loop (what Flux / SD3 / Wan pipelines do)."""
    sch = copy.deepcopy(sch)
    if steps is None:
        sch.set_timesteps(**st)
    else:
        sch.set_timesteps(steps, **st)
    kw = {}
    if "generator" in inspect.signature(sch.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(seed)
    x = noise * getattr(sch, "init_noise_sigma", 1.0)
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        x = sch.step(model(inp, t), t, x, **kw).prev_sample
    return x


def check(label, sch, steps, seed=1, **st):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234 + (steps or 0)))
    ref_model, pe_model = NonlinearModel(), NonlinearModel()
    if steps == 1 and sch.config.get("shift_terminal"):
        # the stretch divides by 1 - t[-1] = 0 at one step: diffusers' own sigmas are nan
        # (its loop fails or returns nan), and the adapter refuses the schedule
        s = copy.deepcopy(sch)
        s.set_timesteps(1, **st)
        assert torch.isnan(s.sigmas).any()
        with pytest.raises(ValueError, match="nan"):
            from_diffusers(sch, steps, **st)
        return None, None
    if steps == 1 and sch.config.get("final_sigmas_type") == "sigma_min" and \
            not type(sch).__name__.startswith("DPMSolverMultistep"):
        # one step from the last level to itself: diffusers returns its input
        ref = reference_loop(sch, ref_model, noise, steps, seed, st)
        assert torch.equal(ref, noise)
        with pytest.raises(ValueError, match="only step has length 0"):
            from_diffusers(sch, steps, **st)
        return None, ref
    ref = reference_loop(sch, ref_model, noise, steps, seed, st)
    assert torch.isfinite(ref).all()
    sampler = from_diffusers(sch, steps, **st)
    out = sampler.sample(pe_model, noise, generator=torch.Generator().manual_seed(seed))
    out = sampler.to_scheduler_space(out)
    record(f"from_diffusers: {label}, steps={steps}", rel(out, ref))
    # the model sees diffusers' own time values
    torch.testing.assert_close(torch.tensor(pe_model.times), torch.tensor(ref_model.times),
                               rtol=0, atol=0)
    # the drop-in: the same loop with the scheduler replaced
    fused = FusedScheduler.from_scheduler(sch)
    out2 = reference_loop(fused, NonlinearModel(), noise, steps, seed, st)
    record(f"drop-in: {label}, steps={steps}", rel(out2, ref))
    return sampler, ref


FM = D.FlowMatchEulerDiscreteScheduler

FLOW_MATCH_EULER = [
    ("default", dict(), {}),
    ("shift=3 (SD3)", dict(shift=3.0), {}),
    ("dynamic exponential mu=1.15 (Flux)", dict(use_dynamic_shifting=True), dict(mu=1.15)),
    ("dynamic exponential, base/max shift config", dict(
        use_dynamic_shifting=True, base_shift=0.3, max_shift=1.5, base_image_seq_len=128,
        max_image_seq_len=2048), dict(mu=0.71)),
    ("dynamic linear mu=0.9", dict(use_dynamic_shifting=True, time_shift_type="linear"),
     dict(mu=0.9)),
    ("shift_terminal=0.1 (LTX)", dict(use_dynamic_shifting=True, shift_terminal=0.1),
     dict(mu=2.05)),
    ("invert_sigmas (Mochi)", dict(invert_sigmas=True), {}),
    ("karras, shift=3", dict(use_karras_sigmas=True, shift=3.0), {}),
    ("exponential, shift=3", dict(use_exponential_sigmas=True, shift=3.0), {}),
    ("beta, shift=3", dict(use_beta_sigmas=True, shift=3.0), {}),
    ("stochastic_sampling, shift=3", dict(stochastic_sampling=True, shift=3.0), {}),
    ("num_train_timesteps=500, shift=1.7", dict(num_train_timesteps=500, shift=1.7), {}),
]


@pytest.mark.parametrize("label,cfg,st", FLOW_MATCH_EULER, ids=[c[0] for c in FLOW_MATCH_EULER])
@pytest.mark.parametrize("steps", [1, 4, 13])
def test_flow_match_euler(label, cfg, st, steps):
    check(f"FlowMatchEuler {label}", FM(**cfg), steps, **st)


@pytest.mark.parametrize("label,make,st", [
    ("FlowMatchEuler dynamic mu=1.15", lambda: FM(use_dynamic_shifting=True), dict(mu=1.15)),
    ("FlowMatchHeun shift=3", lambda: D.FlowMatchHeunDiscreteScheduler(shift=3.0), {}),
    ("DPMSolverMultistep 2M flow_shift=3", lambda: D.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), {}),
    ("UniPCMultistep bh2 p3 flow_shift=5", lambda: D.UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0,
        solver_order=3), {}),
], ids=["euler", "heun", "dpm", "unipc"])
def test_flow_50_steps(label, make, st):
    check(f"{label}, 50 steps", make(), 50, **st)


@pytest.mark.parametrize("st", [
    dict(sigmas=np.array([1.0, 0.83, 0.61, 0.4, 0.12])),
    dict(sigmas=np.array([0.9, 0.5, 0.2]), mu=0.8),
    dict(timesteps=[1000.0, 700.0, 420.0, 100.0]),
    dict(sigmas=np.array([1.0, 0.7, 0.3]), timesteps=[990.0, 640.0, 300.0]),
], ids=["sigmas", "sigmas+mu", "timesteps", "sigmas+timesteps"])
def test_flow_match_euler_custom_schedules(st):
    cfg = dict(use_dynamic_shifting=True) if "mu" in st else dict(shift=3.0)
    check(f"FlowMatchEuler custom {sorted(st)}", FM(**cfg), None, **st)


def test_stochastic_sampling_depends_on_the_generator():
    sch = FM(stochastic_sampling=True, shift=3.0)
    sampler, ref = check("FlowMatchEuler stochastic", sch, 6, seed=3)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1240))
    other = sampler.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(4))
    assert rel(other, ref) > 1e-2


def test_top_level_of_pure_noise():
    # a flow time of 1 (sigma = inf) becomes FLOW_T_TOP; the model still sees t = 1000
    sampler = from_diffusers(FM(shift=3.0), 5)
    assert sampler.sigmas[0] == pytest.approx(FLOW_T_TOP / (1 - FLOW_T_TOP))
    assert sampler.plan.ops[0].t == 1000.0


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_heun(steps, shift):
    check(f"FlowMatchHeun shift={shift}", D.FlowMatchHeunDiscreteScheduler(shift=shift), steps)


# ---------------------------------------------------------------------------------------
# DPM-Solver and UniPC with use_flow_sigmas (SANA, Wan)
# ---------------------------------------------------------------------------------------

FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")

DPM_FLOW = [
    ("2M flow_shift=3", dict(flow_shift=3.0)),
    ("3M flow_shift=3", dict(flow_shift=3.0, solver_order=3)),
    ("2M heun, sigma_min final", dict(flow_shift=3.0, solver_type="heun",
                                      final_sigmas_type="sigma_min")),
    ("SDE 2M flow_shift=3", dict(flow_shift=3.0, algorithm_type="sde-dpmsolver++")),
    ("2M lower_order_final=False, euler_at_final", dict(flow_shift=2.0, lower_order_final=False,
                                                         euler_at_final=True)),
]


@pytest.mark.parametrize("label,cfg", DPM_FLOW, ids=[c[0] for c in DPM_FLOW])
@pytest.mark.parametrize("steps", [1, 5, 16])
def test_dpm_multistep_flow(label, cfg, steps):
    check(f"DPMSolverMultistep {label}", D.DPMSolverMultistepScheduler(**FLOW, **cfg), steps)


def test_dpm_multistep_flow_dynamic_shift_and_epsilon():
    check("DPMSolverMultistep dynamic mu=0.8", D.DPMSolverMultistepScheduler(
        **FLOW, use_dynamic_shifting=True), 12, mu=0.8)
    # an epsilon model on the flow grid: x0 = (x - t eps) / (1 - t)
    check("DPMSolverMultistep epsilon on flow sigmas", D.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0), 10)


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("order", [2, 3])
def test_dpm_singlestep_flow(order, final):
    check(f"DPMSolverSinglestep o{order} flow, final {final}", D.DPMSolverSinglestepScheduler(
        **FLOW, flow_shift=3.0, solver_order=order, final_sigmas_type=final), 9)


UNIPC_FLOW = [
    ("bh2 p2 flow_shift=3", dict(flow_shift=3.0)),
    ("bh2 p3 flow_shift=5 (Wan)", dict(flow_shift=5.0, solver_order=3)),
    ("bh2 p2 karras", dict(use_karras_sigmas=True)),
    ("bh2 p2 shift_terminal=0.2", dict(shift_terminal=0.2)),
    ("bh2 p3 sigma_min final (the last corrector at a repeated level)",
     dict(flow_shift=3.0, solver_order=3, final_sigmas_type="sigma_min")),
    ("bh1 p2 sigma_min final", dict(flow_shift=2.0, solver_type="bh1",
                                    final_sigmas_type="sigma_min")),
]


@pytest.mark.parametrize("label,cfg", UNIPC_FLOW, ids=[c[0] for c in UNIPC_FLOW])
@pytest.mark.parametrize("steps", [1, 5, 16])
def test_unipc_flow(label, cfg, steps):
    check(f"UniPCMultistep {label}", D.UniPCMultistepScheduler(**FLOW, **cfg), steps)


def test_unipc_flow_custom_sigmas_and_mu():
    check("UniPCMultistep flow, sigmas", D.UniPCMultistepScheduler(**FLOW, flow_shift=3.0),
          None, sigmas=np.array([1.0, 0.8, 0.55, 0.3, 0.1]))
    check("UniPCMultistep flow, dynamic mu", D.UniPCMultistepScheduler(
        **FLOW, use_dynamic_shifting=True), 8, mu=0.7)


# ---------------------------------------------------------------------------------------
# The drop-in inside a loop that starts partway (img2img) and refusals
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,steps,begin", [
    (lambda: FM(shift=3.0), 10, 4),
    (lambda: D.FlowMatchHeunDiscreteScheduler(shift=3.0), 6, 4),
    (lambda: D.UniPCMultistepScheduler(**FLOW, flow_shift=3.0), 10, 3),
], ids=["euler", "heun", "unipc"])
def test_drop_in_img2img_start(make, steps, begin):
    sch = make()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    outs = []
    for s in (copy.deepcopy(sch), FusedScheduler.from_scheduler(sch)):
        s.set_timesteps(steps)
        s.set_begin_index(begin)
        y, model = x, NonlinearModel()
        for t in s.timesteps[begin:]:
            y = s.step(model(y, t), t, y).prev_sample
        outs.append(y)
    record(f"drop-in img2img: {type(sch).__name__} from entry {begin}", rel(outs[1], outs[0]))


def test_refusals_name_the_option():
    # diffusers' v formula on flow sigmas is the VP one (x0 = (1 - t) x - t v)
    with pytest.raises(NotImplementedError, match="v_prediction"):
        from_diffusers(D.UniPCMultistepScheduler(use_flow_sigmas=True,
                                                 prediction_type="v_prediction"), 8)
    with pytest.raises(NotImplementedError, match="invert_sigmas=True, stochastic_sampling"):
        from_diffusers(FM(invert_sigmas=True, stochastic_sampling=True), 6)
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        from_diffusers(D.DPMSolverMultistepScheduler(prediction_type="flow_prediction"), 10)
    # Karras sigmas of the VP table read as flow times (> 1): no flow noise level
    with pytest.raises(ValueError, match="flow times"):
        from_diffusers(D.DPMSolverMultistepScheduler(**FLOW, use_karras_sigmas=True), 10)
    with pytest.raises(ValueError, match="mu"):
        from_diffusers(D.EulerDiscreteScheduler(), 10, mu=1.0)
    with pytest.raises(ValueError, match="sigmas"):
        FusedScheduler.from_scheduler(D.DDIMScheduler(clip_sample=False)).set_timesteps(
            sigmas=[0.5, 0.1])


def test_flux_pipeline_schedule_calls():
    # what FluxPipeline does (its module needs transformers, so restated): mu from the image
    # sequence length (calculate_shift = pe.schedules.flow_mu), retrieve_timesteps (checks
    # that set_timesteps takes sigmas, then set_timesteps(sigmas=..., device=..., mu=...)),
    # set_begin_index(0), step(..., return_dict=False)[0]
    import pyengine as pe
    cfg = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
               base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    steps = 9
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = pe.schedules.flow_mu(1024, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                              cfg["base_shift"], cfg["max_shift"])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    outs = []
    for s in (FM(**cfg), FusedScheduler.from_scheduler(FM(**cfg))):
        assert "sigmas" in inspect.signature(s.set_timesteps).parameters
        assert "timesteps" in inspect.signature(s.set_timesteps).parameters
        s.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
        ts = s.timesteps
        assert len(ts) == steps
        s.set_begin_index(0)
        x, model = noise, NonlinearModel()
        for t in ts:
            x = s.step(model(x, t), t, x, return_dict=False)[0]
        outs.append(x)
    record("Flux pipeline calls (set_timesteps(sigmas=, mu=))", rel(outs[1], outs[0]))
