"""Randomized sweep of diffusers scheduler configurations against diffusers itself.

    .venv/bin/python bench/diffusers_config_sweep.py SEED COUNT

Draws COUNT random configurations (class, config options, step count 1-30, prediction kind)
of the classes pyengine.integrations.diffusers supports, runs diffusers' own loop and
from_diffusers(...).sample with the same nonlinear model, noise and generator seed (float32),
and prints every configuration off by more than 1e-5 ("small" up to 1e-3, "MISMATCH" above),
every refusal with its reason, and a summary. Configurations where diffusers itself raises
or returns non-finite values are counted; the latter must be refused by the adapter
("NONFINITE-REF-NOT-REFUSED" otherwise). docs/diffusers.md reports the figures of seeds 0-5.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import random
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import diffusers as D  # noqa: E402
from test_parity_diffusers import SHAPE, NonlinearModel  # noqa: E402

from pyengine.integrations.diffusers import from_diffusers  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

PRED3 = ["epsilon", "v_prediction", "sample"]
SIG = [None, "karras", "exponential", "beta"]
SPACING = ["linspace", "leading", "trailing"]
FLOWP = ["epsilon", "v_prediction", "flow_prediction"]

OPTS = {
    "FlowMatchEulerDiscreteScheduler": dict(
        shift=[1.0, 3.0], use_dynamic_shifting=[False, True],
        time_shift_type=["exponential", "linear"], shift_terminal=[None, 0.1],
        invert_sigmas=[False, True], stochastic_sampling=[False, True], sigmas_kind=SIG),
    "FlowMatchHeunDiscreteScheduler": dict(shift=[1.0, 3.0]),
    "DPMSolverMultistepScheduler": dict(
        use_flow_sigmas=[False, True], prediction_type=PRED3 + ["flow_prediction"],
        solver_order=[1, 2, 3], algorithm_type=["dpmsolver++", "sde-dpmsolver++", "dpmsolver"],
        final_sigmas_type=["zero", "sigma_min"], solver_type=["midpoint", "heun"],
        thresholding=[False, True], lower_order_final=[True, False],
        euler_at_final=[False, True], sigmas_kind=[None, "karras", "exponential", "lu"],
        timestep_spacing=SPACING),
    "UniPCMultistepScheduler": dict(
        use_flow_sigmas=[False, True], prediction_type=FLOWP, solver_order=[1, 2, 3],
        solver_type=["bh1", "bh2"], final_sigmas_type=["zero", "sigma_min"],
        lower_order_final=[True, False], thresholding=[False, True],
        sigmas_kind=[None, "karras"], flow_shift=[1.0, 3.0], timestep_spacing=SPACING),
    "DPMSolverSinglestepScheduler": dict(
        use_flow_sigmas=[False, True], prediction_type=FLOWP, solver_order=[1, 2, 3],
        algorithm_type=["dpmsolver++", "dpmsolver"], final_sigmas_type=["zero", "sigma_min"],
        thresholding=[False, True], sigmas_kind=[None, "karras"], flow_shift=[1.0, 3.0]),
    "DEISMultistepScheduler": dict(
        use_flow_sigmas=[False, True], prediction_type=FLOWP, solver_order=[1, 2, 3],
        thresholding=[False, True], sigmas_kind=SIG, lower_order_final=[True, False],
        flow_shift=[1.0, 3.0]),
    "LCMScheduler": dict(
        prediction_type=PRED3, clip_sample=[False, True], thresholding=[False, True],
        timestep_spacing=SPACING, original_inference_steps=[50, 20]),
    "TCDScheduler": dict(prediction_type=PRED3, eta=[0.0, 0.3, 1.0], timestep_spacing=SPACING),
    "PNDMScheduler": dict(
        skip_prk_steps=[True], prediction_type=["epsilon", "v_prediction"],
        set_alpha_to_one=[False, True], steps_offset=[0, 1], timestep_spacing=SPACING),
    "LMSDiscreteScheduler": dict(prediction_type=PRED3, sigmas_kind=SIG,
                                 timestep_spacing=SPACING),
    "KDPM2DiscreteScheduler": dict(prediction_type=["epsilon", "v_prediction"],
                                   sigmas_kind=SIG, timestep_spacing=SPACING),
    "KDPM2AncestralDiscreteScheduler": dict(prediction_type=["epsilon", "v_prediction"],
                                            sigmas_kind=SIG, timestep_spacing=SPACING),
    "EDMDPMSolverMultistepScheduler": dict(
        prediction_type=["epsilon", "v_prediction"], solver_order=[1, 2, 3],
        algorithm_type=["dpmsolver++", "sde-dpmsolver++"],
        final_sigmas_type=["zero", "sigma_min"], sigma_schedule=["karras", "exponential"],
        lower_order_final=[True, False], euler_at_final=[False, True],
        thresholding=[False, True], solver_type=["midpoint", "heun"]),
    "DPMSolverSDEScheduler": dict(prediction_type=["epsilon", "v_prediction"],
                                  sigmas_kind=SIG, timestep_spacing=SPACING,
                                  noise_sampler_seed=[3]),
    "DDIMScheduler": dict(
        prediction_type=PRED3, clip_sample=[False, True], thresholding=[False, True],
        eta=[0.0, 0.5, 1.0], timestep_spacing=["leading", "trailing"],
        set_alpha_to_one=[False, True]),
    "DDPMScheduler": dict(
        prediction_type=PRED3, clip_sample=[False, True], thresholding=[False, True],
        variance_type=["fixed_small", "fixed_large"], timestep_spacing=SPACING),
    "HeunDiscreteScheduler": dict(prediction_type=PRED3, clip_sample=[False, True],
                                  sigmas_kind=SIG),
    "EulerDiscreteScheduler": dict(
        prediction_type=PRED3, interpolation_type=["linear", "log_linear"], sigmas_kind=SIG,
        final_sigmas_type=["zero", "sigma_min"], timestep_spacing=SPACING),
}
KIND = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas",
        "beta": "use_beta_sigmas", "lu": "use_lu_lambdas"}


def loop(sch, steps, noise, eta, st):
    """diffusers' own loop."""
    sch = copy.deepcopy(sch)
    sch.set_timesteps(steps, **st)
    params = inspect.signature(sch.step).parameters
    kw = {"generator": torch.Generator().manual_seed(1)} if "generator" in params else {}
    if eta is not None:
        kw["eta"] = eta
    x = noise * getattr(sch, "init_noise_sigma", 1.0)
    m = NonlinearModel()
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        x = sch.step(m(inp, t), t, x, **kw).prev_sample
    return x


def main(seed: int, count: int) -> dict:
    rng = random.Random(seed)
    stats = {"ok": 0, "small": 0, "MISMATCH": 0, "refused": 0, "diffusers_fails": 0,
             "nonfinite_ref": 0}
    for it in range(count):
        name = rng.choice(list(OPTS))
        cfg = {k: rng.choice(v) for k, v in OPTS[name].items()}
        kind, eta = cfg.pop("sigmas_kind", None), cfg.pop("eta", None)
        if kind:
            cfg[KIND[kind]] = True
        st = {"mu": rng.choice([0.5, 1.15])} if cfg.get("use_dynamic_shifting") else {}
        steps = rng.choice([1, 2, 3, 5, 8, 13, 21, 30])
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(it))
        etakw = {} if eta is None else {"eta": eta}
        try:
            sch = getattr(D, name)(**cfg)
            ref = loop(sch, steps, noise, eta, st)
        except Exception:
            stats["diffusers_fails"] += 1
            continue
        if not torch.isfinite(ref).all():
            stats["nonfinite_ref"] += 1
            try:
                from_diffusers(sch, steps, **etakw, **st)
                print("NONFINITE-REF-NOT-REFUSED", name, cfg, steps)
            except (NotImplementedError, ValueError):
                pass
            continue
        try:
            s = from_diffusers(sch, steps, **etakw, **st)
        except (NotImplementedError, ValueError) as e:
            stats["refused"] += 1
            print("refused", name, steps, cfg, "|", str(e)[:110])
            continue
        out = s.sample(NonlinearModel(), noise, generator=torch.Generator().manual_seed(1))
        out = s.to_scheduler_space(out)
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        if err < 1e-5:
            stats["ok"] += 1
            continue
        key = "MISMATCH" if err > 1e-3 else "small"
        stats[key] += 1
        print(f"{key} {err:.2e}", name, steps, cfg, st, eta, s.solver)
    print(stats)
    return stats


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0,
         int(sys.argv[2]) if len(sys.argv) > 2 else 200)
