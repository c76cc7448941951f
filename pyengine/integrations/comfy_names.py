"""ComfyUI's sampler and scheduler names -> pyengine's registry solvers and schedules.

Read by the adapter that generates ``pyengine.sampling.sample_<name>``. Each sampler entry is
``(registry solver, fixed options, arguments the ComfyUI function takes)``; the caller's
keyword arguments with the same names go through as solver options (``r`` of dpmpp_sde, ...).

ComfyUI's sigmas are in the model's own units: sigma of x for eps / v / EDM models, the flow
time t for flow (CONST) models, whose first level is usually exactly 1. pyengine plans hold
sigma of x / s: for a flow model give the plan ``schedules.flow_to_sigma(t)``, after replacing
a first level of 1 by ``ModelSampling.percent_to_sigma(1e-4)`` for the samplers marked
``snr_offset`` (ComfyUI's offset_first_sigma_for_snr does the same); the other samplers
evaluate the model at t = 1 (sigma = inf, s = 0), which the plan executor has to support for
flow models (x_c there is pure noise, and the ComfyUI-space solvers never divide by s).

Where ComfyUI differs from k-diffusion under the same name (ComfyUI is followed here):

* ipndm, ipndm_v, lms, deis, euler_ancestral, gradient_estimation, lcm, res_multistep and the
  SNR samplers return the denoised value on a step to sigma = 0 (k-diffusion's ipndm and lms
  take their multistep step to 0);
* euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral on flow models use the RF forms
  (sigma_down = sigma' (1 + (sigma'/sigma - 1) eta), renoising by (1 - sigma')/(1 - sigma_down));
* dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde, er_sde, seeds_*, exp_heun_2_x0, sa_solver use the
  model's half-log-SNR (log((1 - t)/t) on flow models, -log sigma otherwise) where
  k-diffusion always uses -log sigma;
* the stochastic samplers multiply ``s_noise`` by the model sampling's ``noise_scale``;
* euler (with churn), heun, dpm_2, dpmpp_2m, lms, ipndm(_v), heunpp2, res_multistep,
  gradient_estimation, ddpm and dpm_fast integrate in ComfyUI's own (x, sigma), which for a
  flow model is (x, t): hence the *_comfy registry entries where the registry's own solver
  of that name works in (x / s, t / (1 - t)) (identical for eps models);
* dpm_fast takes (sigma_min, sigma_max, n) instead of sigmas (ComfyUI's KSampler passes
  n = len(sigmas) - 1, sigma_max = sigmas[0], sigma_min = the smallest positive level):
  build the plan's grid with ``solvers.comfy.dpm_fast_sigmas`` and pass ``nfe=n``;
* the churn noise of euler / heun / dpm_2 comes from torch.randn_like in ComfyUI, not from
  its noise_sampler; res_multistep calls its noise_sampler at eta = 0 too (no effect);
* the *_cfg_pp samplers read the unconditional denoised of every model call: their plans
  must be built with ``guidance_scale`` (classifier-free guidance folded into the plan, the
  model called on [uncond, cond]); the caller gives the unconditional model through the
  plan's guided call, not through ComfyUI's post-CFG hook;
* uni_pc / uni_pc_bh2 run the official UniPC loop (order min(3, levels - 2), lower orders at
  the end, no corrector on the last step) in ComfyUI's space, stopping at 0.001 instead of 0
  (unipc_comfy); the registry's unipc follows diffusers' UniPCMultistepScheduler instead.
* dpmpp_3m_sde's phi_2 / phi_3 use h_eta = (1 + eta) h.
"""

from __future__ import annotations

from .. import schedules as S

__all__ = ["SAMPLERS", "SCHEDULERS", "NOT_PROVIDED", "solver_for", "scheduler_sigmas",
           "SNR_OFFSET", "COMFY_SAMPLER_NAMES", "COMFY_SCHEDULER_NAMES", "plan_sigmas",
           "NOISE_SAMPLER_ARGS"]

#: ComfyUI's sampler names (comfy/samplers.py KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2).
COMFY_SAMPLER_NAMES = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast",
    "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
    "ddim", "uni_pc", "uni_pc_bh2")
#: ComfyUI's scheduler names (comfy/samplers.py SCHEDULER_HANDLERS).
COMFY_SCHEDULER_NAMES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform",
                         "beta", "normal", "linear_quadratic", "kl_optimal")

_ANC = ("eta", "s_noise", "noise_sampler")

#: ComfyUI sampler name -> (registry solver, fixed options, the function's own options)
SAMPLERS: dict[str, tuple[str, dict, tuple]] = {
    "euler": ("euler_comfy", {}, ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "ddim": ("euler_comfy", {}, ()),
    "euler_ancestral": ("euler_ancestral_comfy", {}, _ANC),
    "heun": ("heun_comfy", {}, ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "dpm_2": ("dpm_2_comfy", {}, ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "dpm_2_ancestral": ("dpm_2_ancestral", {}, _ANC),
    "lms": ("lms", {}, ("max_order",)),
    "dpmpp_2s_ancestral": ("dpmpp_2s_ancestral", {}, _ANC),
    "dpmpp_sde": ("dpmpp_sde", {}, _ANC + ("r",)),
    "dpmpp_sde_gpu": ("dpmpp_sde", {}, _ANC + ("r",)),
    "dpmpp_2m": ("dpmpp_2m_comfy", {}, ()),
    "dpm_fast": ("dpm_fast", {}, ("eta", "s_noise", "noise_sampler", "nfe")),
    "ddpm": ("ddpm_comfy", {}, ("noise_sampler",)),
    "deis": ("deis", {}, ("max_order",)),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {"solver_type": "midpoint", "lower_order_final": False},
                     _ANC + ("solver_type",)),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", {"solver_type": "midpoint",
                                          "lower_order_final": False}, _ANC + ("solver_type",)),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun", "lower_order_final": False},
                          _ANC),
    "dpmpp_2m_sde_heun_gpu": ("dpmpp_2m_sde", {"solver_type": "heun",
                                               "lower_order_final": False}, _ANC),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, _ANC),
    "dpmpp_3m_sde_gpu": ("dpmpp_3m_sde", {}, _ANC),
    "ipndm": ("ipndm_comfy", {}, ("max_order",)),
    "ipndm_v": ("ipndm_v", {}, ("max_order",)),
    "heunpp2": ("heunpp2", {}, ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "lcm": ("lcm", {}, ("s_noise", "s_noise_end", "noise_sampler")),
    "gradient_estimation": ("gradient_estimation", {}, ("ge_gamma",)),
    "res_multistep": ("res_multistep", {"eta": 0.0}, ("s_noise", "noise_sampler")),
    "res_multistep_ancestral": ("res_multistep", {}, _ANC),
    "er_sde": ("er_sde", {}, ("s_noise", "noise_sampler", "max_stage")),
    "seeds_2": ("seeds_2", {}, _ANC + ("r", "solver_type")),
    "seeds_3": ("seeds_3", {}, _ANC + ("r_1", "r_2")),
    "exp_heun_2_x0": ("exp_heun_2_x0", {"eta": 0.0, "s_noise": 0.0}, ("solver_type",)),
    "exp_heun_2_x0_sde": ("exp_heun_2_x0", {}, _ANC + ("solver_type",)),
    "sa_solver": ("sa_solver", {}, ("s_noise", "noise_sampler", "predictor_order",
                                    "corrector_order", "simple_order_2")),
    "sa_solver_pece": ("sa_solver", {"use_pece": True}, ("s_noise", "noise_sampler",
                                                         "predictor_order", "corrector_order",
                                                         "simple_order_2")),
    "euler_cfg_pp": ("euler_ancestral_cfg_pp", {"eta": 0.0, "s_noise": 0.0}, ()),
    "euler_ancestral_cfg_pp": ("euler_ancestral_cfg_pp", {}, _ANC),
    "dpmpp_2s_ancestral_cfg_pp": ("dpmpp_2s_ancestral", {"cfg_pp": True}, _ANC),
    "dpmpp_2m_cfg_pp": ("dpmpp_2m_comfy", {"cfg_pp": True}, ()),
    "res_multistep_cfg_pp": ("res_multistep", {"eta": 0.0, "cfg_pp": True},
                             ("s_noise", "noise_sampler")),
    "res_multistep_ancestral_cfg_pp": ("res_multistep", {"cfg_pp": True}, _ANC),
    "gradient_estimation_cfg_pp": ("gradient_estimation", {"cfg_pp": True}, ("ge_gamma",)),
    "uni_pc": ("unipc_comfy", {"variant": "bh1"}, ()),
    "uni_pc_bh2": ("unipc_comfy", {"variant": "bh2"}, ()),
}

#: Samplers whose first flow level of 1 ComfyUI replaces by percent_to_sigma(1e-4).
SNR_OFFSET = frozenset({"dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
                        "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde",
                        "dpmpp_3m_sde_gpu", "er_sde", "seeds_2", "seeds_3", "exp_heun_2_x0",
                        "exp_heun_2_x0_sde", "sa_solver", "sa_solver_pece"})

#: Arguments ComfyUI passes to ``noise_sampler(a, b)`` for a plan's noisy update: b is the
#: level (in the model's units) the update writes; a is the step's first level ("step", every
#: sampler but those listed) or the level of the stage before within the step ("stage": SEEDS
#: and exp_heun_2_x0_sde, whose stage noises are chained). ComfyUI's churn noise (euler, heun,
#: dpm_2, heunpp2) is torch.randn_like, not the noise sampler.
NOISE_SAMPLER_ARGS = {name: "stage" for name in ("seeds_2", "seeds_3", "exp_heun_2_x0_sde")}

#: ComfyUI names without a registry solver, and why.
NOT_PROVIDED: dict[str, str] = {
    "dpm_adaptive": "adaptive steps: each step size depends on the error of the previous one "
                    "(a host sync per step); a precomputed plan cannot hold it",
    "deis[deis_mode=rhoab]": "ComfyUI's rhoab DEIS weights are Adams-Bashforth integrals in "
                             "sigma (the lms weights); only the default 'tab' mode is mapped",
    "sa_solver[tau_func]": "a caller's tau_func (a Python function of sigma) is not mapped: "
                           "the solver takes ComfyUI's default interval (eta inside "
                           "percent 0.2..0.8, options eta / tau_start / tau_end)",
    "lcm[noise_clip_std>0]": "the clamp of the injected noise at N standard deviations depends "
                             "on the drawn noise's own std: a data-dependent op",
}


def solver_for(name: str, **kwargs) -> tuple[str, dict]:
    """(registry solver, options) of ComfyUI sampler ``name`` called with ``kwargs``; the
    ComfyUI-only arguments (noise_sampler) are left to the caller."""
    try:
        solver, fixed, own = SAMPLERS[name]
    except KeyError:
        why = NOT_PROVIDED.get(name)
        if why is not None:
            raise NotImplementedError(f"ComfyUI sampler {name!r}: {why}") from None
        raise ValueError(f"unknown ComfyUI sampler {name!r}; known: "
                         f"{', '.join(sorted(SAMPLERS))}") from None
    unknown = sorted(set(kwargs) - set(own))
    if unknown:
        raise ValueError(f"ComfyUI sampler {name!r} takes no argument(s) {unknown}; it takes "
                         f"{', '.join(own) or 'none'}")
    opts = dict(fixed)
    opts.update({k: v for k, v in kwargs.items() if k != "noise_sampler"})
    if name == "lcm" and opts.get("s_noise_end") is None:
        opts.pop("s_noise_end", None)
    return solver, opts


#: ComfyUI scheduler name -> f(model_sampling, steps) -> levels in the model's units, ending
#: in 0 (schedules.COMFY_SCHEDULERS; the AYS node and explicit lists are separate).
SCHEDULERS = dict(S.COMFY_SCHEDULERS)


def scheduler_sigmas(name: str, model_sampling, steps: int, denoise: float = 1.0):
    """ComfyUI's BasicScheduler: the levels of scheduler ``name`` for ``steps`` steps, with
    ``denoise`` < 1 computing int(steps / denoise) steps and keeping the last steps + 1."""
    try:
        fn = SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown ComfyUI scheduler {name!r}; known: "
                         f"{', '.join(SCHEDULERS)}") from None
    return S.truncate_denoise(lambda n: fn(model_sampling, n), steps, denoise)


def plan_sigmas(name: str, sigmas, model_sampling=None):
    """The plan grid (pyengine sigmas of x / s) for ComfyUI sampler ``name`` called with
    ComfyUI's ``sigmas`` on a model with ``model_sampling`` (a schedules.ModelSampling; None or
    a non-flow one: the grid is ``sigmas`` itself). Flow models: t / (1 - t), a first level of
    1 replaced by percent_to_sigma(1e-4) for the SNR samplers as ComfyUI does, else kept as
    sigma = inf (pure noise). dpm_fast: its own lambda-uniform grid between the smallest
    positive level and the first, with len(sigmas) - 1 model calls (ComfyUI's KSampler)."""
    import numpy as np

    from ..solvers.comfy import dpm_fast_sigmas
    s = np.asarray(sigmas.detach().cpu() if hasattr(sigmas, "detach") else sigmas,
                   dtype=np.float64)
    if s.ndim != 1 or s.size < 2:
        raise ValueError(f"sigmas must be a 1-D list of at least 2 levels, got shape "
                         f"{tuple(s.shape)}")
    flow = model_sampling is not None and model_sampling.flow
    if name == "dpm_fast":
        s = dpm_fast_sigmas(float(s[s > 0].min()), float(s.max()), s.size - 1)
    elif flow and name in SNR_OFFSET and s[0] >= 1:
        s = s.copy()
        s[0] = model_sampling.percent_to_sigma(1e-4)
    if not flow:
        return s
    with np.errstate(divide="ignore"):
        return np.where(s >= 1, np.inf, s / np.where(s >= 1, 1.0, 1.0 - s))
