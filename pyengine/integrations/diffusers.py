"""Reproduce diffusers schedulers with pyengine plans: a Sampler, or a drop-in scheduler.

    pipe.scheduler = FusedScheduler.from_scheduler(pipe.scheduler)   # in any pipeline

:class:`FusedScheduler` speaks the scheduler protocol pipelines call (``set_timesteps``,
``timesteps``, ``scale_model_input``, ``step``, ``init_noise_sigma``, ``order``,
``add_noise``, ``set_begin_index``, ``config``) and runs the plan below one model evaluation
per ``step()``: same results as the scheduler it replaces, its update fused, no host syncs.

The Sampler that reproduces a scheduler's whole loop:

    sampler = from_diffusers(scheduler, num_inference_steps=20)
    x0 = sampler.sample(unet_fn, torch.randn(shape), generator=torch.Generator().manual_seed(0))

equals diffusers' own loop (``latents = noise * init_noise_sigma``; for each t in
``timesteps``: ``x = step(model(scale_model_input(x, t), t), t, x, generator=g).prev_sample``)
to float32 rounding, for the same model, noise and generator seed.

How: a deep copy of the scheduler runs ``set_timesteps``; its own float32 tables
(``alphas_cumprod``, ``sigmas``, ``timesteps``) give the float64 sigma grid and the model's
time values, which are passed to the Sampler explicitly, so the model sees the very ``t``
diffusers gives it (rounded Karras timesteps, fractional Euler ones, EDM's 0.25 log sigma).
Everything diffusers decides at ``set_timesteps`` or inside ``step`` (timestep spacing,
sigma interpolation, ``final_sigmas_type``, ``lower_order_final`` with its ``< 15 steps``
rule, the forced first-order step to sigma 0, singlestep order lists, UniPC's corrector
schedule) becomes the grid and the solver options. Nothing here imports diffusers at import
time: schedulers are recognized by class name (FusedScheduler draws its noise with diffusers'
own ``randn_tensor``, imported when it first draws).

State spaces. pyengine keeps x = s (x0 + sigma eps) (s = 1/sqrt(1 + sigma^2) for VP). DDIM,
DDPM, DPM-Solver and UniPC schedulers keep the same x; the Euler-type schedulers (Euler,
Euler ancestral, Heun) keep x_hat = x / s and divide by sqrt(sigma^2 + 1) in
``scale_model_input``, so the model input is pyengine's x again. Both agree wherever sigma is
0; with ``final_sigmas_type="sigma_min"`` an Euler-type scheduler returns x_hat at sigma_min
and pyengine x = s x_hat: :meth:`DiffusersSampler.to_scheduler_space` converts.

Only the scheduler is read, not arguments of its ``step()``: DDIM's ``eta`` (TCD's gamma)
and ``use_clipped_model_output`` are :func:`from_diffusers`'s own arguments, the generator
goes to ``sample``; Euler's step-time ``s_churn`` is not mapped (diffusers adds that noise
after the model call, at the model's un-churned input, which differs from EDM Algorithm 2
that pyengine's ``euler`` follows).

Flow matching (FlowMatchEuler / FlowMatchHeun, and ``use_flow_sigmas`` of DPM-Solver, UniPC,
DEIS): diffusers' flow time t is the RectifiedFlow process's t (x = (1 - t) x0 + t eps, the
same state), pyengine sigma = t / (1 - t); a top level t = 1 (sigma = inf) becomes
:data:`FLOW_T_TOP` (the model is still told t = 1). FlowMatchEuler's step is Euler, with
``stochastic_sampling`` the re-noising step x' = (1 - t') x0 + t' z (solver ``lcm``);
``invert_sigmas`` (Mochi) is Euler in 1 - t with the model's output negated; FlowMatchHeun is
Heun in (x, t) (``heun_comfy``).

x0 processing: ``clip_sample`` / ``thresholding`` clip or dynamically threshold the x0
estimate after every model call, which no coefficient holds: the plan is ``clip_x0`` (the
scheduler's solver with a :class:`~pyengine.solvers.diffusers_compat.ProcessX0` custom op
after each model call, one extra pass), in the classes whose step reads those fields.

Noise: drawn as diffusers draws it (the generator in its order), except DPMSolverSDE, whose
noise is its own Brownian tree (torchsde, seeded by ``noise_sampler_seed``): the adapter
queries that same tree at the same float32 levels, so the result equals diffusers'.

EDMEulerScheduler and EDMDPMSolverMultistepScheduler precondition the network: it is called
as F(c_in x, 0.25 log sigma) and the denoiser is c_skip x + c_out F. ``sample`` wraps the
user's F in that preconditioning (a :class:`~pyengine.parameterization.Denoiser`) on the EDM
process, so the same F plugs into both loops.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import backends
from ..noise import seeds_tensor
from ..parameterization import Denoiser, edm_scalings, output_tensor
from ..parameterization import affine as param_affine
from ..plan import Custom, Eval
from ..processes import EDM, Process, RectifiedFlow, VPDiscrete
from ..runtime.walk import PhiloxDraws, Program, SuppliedDraws, Walker
from ..sampler import Sampler

__all__ = ["from_diffusers", "DiffusersSampler", "SUPPORTED", "EDMPreconditioned",
           "FusedScheduler", "FusedSchedulerOutput", "fused_class"]


class DiffusersSampler(Sampler):
    """A :class:`pyengine.Sampler` built by :func:`from_diffusers`; it remembers the scheduler
    it reproduces and, for EDM schedulers, wraps the model in the scheduler's preconditioning."""

    def __init__(self, *args, scheduler_name: str, state_space: str, model_wrapper=None,
                 noise_source=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.scheduler_name = scheduler_name
        #: "x" when the scheduler's state is pyengine's x, "x_hat" when it is x / s.
        self.state_space = state_space
        self.model_wrapper = model_wrapper
        #: a callable making the scheduler's own noise draws (DPMSolverSDE's Brownian tree);
        #: None: the generator (diffusers' randn order) or Philox
        self.noise_source = noise_source

    def sample(self, model, noise, seed=0, **kwargs):
        if self.model_wrapper is not None:
            model = self.model_wrapper(model)
        if self.noise_source is None:
            return super().sample(model, noise, seed, **kwargs)
        # the scheduler's own noise (not the generator): the plan walked with those draws
        from ..runtime import run_plan
        from ..runtime.walk import SuppliedDraws
        unsupported = sorted(k for k in kwargs if k not in ("generator", "backend",
                                                            "extra_args", "callback"))
        if unsupported:
            raise NotImplementedError(f"{self.scheduler_name}: sample({unsupported[0]}=...) "
                                      f"with the scheduler's Brownian-tree noise")
        plan, x = self.start(noise)
        draws = self.noise_source()
        scale = float(self.process.s_of_sigma(float(self.sigmas[0])))

        def fn(op, like):
            # the tree is made from the scheduler's state x_hat (shape, dtype, device)
            return draws(op, like if scale == 1.0 else like / scale)
        return run_plan(plan, model, x, noise=SuppliedDraws(fn),
                        backend=kwargs.get("backend") or self.backend,
                        extra_args=kwargs.get("extra_args"), callback=kwargs.get("callback"))

    def to_scheduler_space(self, x: torch.Tensor) -> torch.Tensor:
        """The final state as the scheduler's own loop returns it (x / s(sigma_last) for
        Euler-type schedulers; unchanged otherwise, and always unchanged at sigma 0)."""
        if self.state_space == "x":
            return x
        s = float(self.process.s_of_sigma(float(self.sigmas[-1])))
        return x if s == 1.0 else x / s

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", from={self.scheduler_name})"


class EDMPreconditioned(Denoiser):
    """The EDM denoiser of diffusers' EDM schedulers (Karras et al. 2022, Table 1):
    D(x; sigma) = c_skip x + c_out F(c_in x, 0.25 log sigma), c_in = 1/sqrt(sigma^2 + sd^2),
    c_skip = sd^2/(sigma^2 + sd^2), c_out = +-sigma sd/sqrt(sigma^2 + sd^2) (minus for
    v_prediction)."""

    def __init__(self, model, sigma_data: float, sign: float):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        super().__init__(model)
        self.sigma_data = float(sigma_data)
        self.sign = float(sign)

    def __call__(self, x_hat, sigma, **kwargs):
        view = (-1,) + (1,) * (x_hat.dim() - 1)
        sig = sigma.to(x_hat.dtype).view(view)
        c_skip, c_out, c_in = edm_scalings(sig, self.sigma_data)
        out = self.fn(x_hat * c_in, 0.25 * torch.log(sigma), **kwargs)
        out = output_tensor(out)
        return c_skip * x_hat + (self.sign * c_out) * out


def _edm_denoised(backend, x_hat, out, sigma: float, sigma_data: float, sign: float):
    """D = c_skip x_hat + c_out F for a model output F the pipeline computed (one fused
    update; the plan's model is D)."""
    c_skip, c_out, _ = edm_scalings(float(sigma), sigma_data)
    d = torch.empty_like(x_hat)
    backend.fused_update(d, [x_hat, out], [c_skip, sign * c_out])
    return d


# ---------------------------------------------------------------------------------------
# What a scheduler folds into
# ---------------------------------------------------------------------------------------


@dataclass
class _Recipe:
    process: Process
    sigmas: np.ndarray                 # float64 grid, one level per model call plus the last
    timesteps: np.ndarray | None       # float64, one per level but the last
    solver: str
    prediction: str
    init_noise_scale: float
    state_space: str                   # "x" or "x_hat"
    options: dict = field(default_factory=dict)
    model_wrapper: object = None
    orders: list | None = None         # the scheduler's order at every step (multistep solvers)
    dropped_final: bool = False        # a zero-length final step (the identity) was dropped
    identity: list = field(default_factory=list)   # entries of interior zero-length steps
    mean_channels: int | None = None   # the model output's channels the class reads
    output_sign: float = 1.0           # -1: the model's output is minus the plan's prediction
    x0: dict | None = None             # clip_x0 options (clip_sample / thresholding)
    noise: str = "generator"           # "brownian": the scheduler's Brownian-tree noise
    noise_source: object = None        # () -> draws, for noise="brownian"

    @property
    def last_order(self) -> int:
        return self.orders[-1] if self.orders else 1


_PREDICTIONS = {"epsilon": "epsilon", "sample": "sample", "original_sample": "sample",
                "v_prediction": "v", "flow_prediction": "flow"}
# Sampler keywords that would change the grid diffusers chose; not accepted as overrides.
_GRID_KEYWORDS = ("steps", "sigmas", "schedule", "schedule_options", "to_zero", "timesteps")


def _f64(t) -> np.ndarray:
    """A scheduler table as float64 (float32 values kept exactly, integers converted)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        t = t.to(torch.float64) if t.is_floating_point() else t
        return t.numpy().astype(np.float64)
    return np.asarray(t, dtype=np.float64)


def _sigma_of_abar(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt((1.0 - a) / a)       # inf / nan where alpha_bar <= 0: refused


def _s_vp(sigma: float) -> float:
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def _prediction(name: str, cfg, allowed=("epsilon", "sample", "v_prediction")) -> str:
    p = cfg.get("prediction_type", "epsilon")
    if p == "v_prediction" and cfg.get("use_flow_sigmas", False):
        raise NotImplementedError(
            f"{name}(prediction_type='v_prediction', use_flow_sigmas=True): diffusers then "
            f"takes x0 = (1 - t) x - t v, the VP formula, which on the flow (alpha^2 + "
            f"sigma^2 != 1) is not the x0 of a v-model (that is ((1 - t) x - t v) / ((1 - t)^2 "
            f"+ t^2)); use prediction_type='flow_prediction' (or epsilon / sample)")
    if p == "flow_prediction" and "flow_prediction" not in allowed:
        if cfg.get("use_flow_sigmas", False):
            return "flow"
        raise NotImplementedError(
            f"{name}(prediction_type='flow_prediction', use_flow_sigmas=False): diffusers then "
            f"takes x0 = x - sigma_VP * out on the VP process, which is no velocity of that "
            f"process (x0 = x - t out holds on the flow x = (1 - t) x0 + t eps only); set "
            f"use_flow_sigmas=True")
    if p not in allowed:
        raise NotImplementedError(
            f"{name}(prediction_type={p!r}) is not supported by from_diffusers for this "
            f"scheduler (supported: {', '.join(allowed)})")
    return _PREDICTIONS[p]


def _vp_process(name: str, sch) -> VPDiscrete:
    """The discrete VP process of the scheduler's float32 alpha_bar table.

    The grid and the model's time values are passed explicitly, so the process contributes
    s(sigma) = 1/sqrt(1 + sigma^2) and defaults only. diffusers' zero-terminal-SNR fix for
    the Euler, DPM-Solver and UniPC schedulers sets alpha_bar[-1] = 2^-24, above
    alpha_bar[-2]; the process then gets the table's decreasing envelope."""
    abar = _f64(sch.alphas_cumprod)
    if not 0 < abar[0] < 1:
        raise NotImplementedError(f"{name}: alpha_bar[0] = {abar[0]:g} is no noise level "
                                  f"(betas must lie in (0, 1))")
    # Entries that are no noise level (alpha_bar <= 0: zero terminal SNR, betas > 1) matter
    # only where the schedule visits them, which _check_levels refuses; elsewhere the process
    # gets the table's decreasing envelope there.
    for i in range(1, abar.size):
        if not 0 < abar[i] < abar[i - 1]:
            abar[i] = abar[i - 1] * (1.0 - 1e-9)
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    return VPDiscrete(trained_betas=betas)


#: classes whose step reads only the mean of a model that also predicts its variance
#: (variance_type "learned" / "learned_range": with epsilon prediction they take the first 3
#: channels of the output, otherwise the whole output)
_MEAN_OF_LEARNED = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler")


def _mean_channels(name: str, cfg) -> int | None:
    """How many leading channels of the model output the class reads (None: all)."""
    if name in _MEAN_OF_LEARNED and cfg.get("variance_type") in ("learned", "learned_range") \
            and cfg.get("prediction_type") == "epsilon":
        return 3            # diffusers' own constant (model_output[:, :3])
    return None


def _reject_common(name: str, cfg) -> None:
    if cfg.get("variance_type") in ("learned", "learned_range") and \
            name not in _MEAN_OF_LEARNED:
        raise NotImplementedError(
            f"{name}(variance_type={cfg.get('variance_type')!r}): a learned variance is read "
            f"from the model output at sampling time, not a coefficient known in advance")


def _no_eta(name: str, eta: float) -> None:
    if eta != 0.0:
        raise ValueError(f"eta={eta} is an argument of DDIMScheduler.step(); {name}.step() "
                         f"has none")


def _multistep_state(sch):
    """(grid, timesteps) of the schedulers that keep ``sigmas`` with one level per step
    (flow times converted to pyengine sigmas with ``use_flow_sigmas``)."""
    if _is_flow(sch):
        return _flow_grid(type(sch).__name__, _f64(sch.sigmas)), _f64(sch.timesteps)
    return _f64(sch.sigmas), _f64(sch.timesteps)


# ---------------------------------------------------------------------------------------
# Flow matching: diffusers keeps flow times t (x = (1 - t) x0 + t eps), pyengine the
# RectifiedFlow process with sigma = t / (1 - t) and s = 1 - t, the same state x.
# ---------------------------------------------------------------------------------------

#: Flow time that stands for t = 1 (pure noise, sigma = inf, which no plan can hold) at the
#: top of a grid. A first step from t = 1 - d instead of 1 changes its coefficients by O(d)
#: and the float64 cancellation in x_hat = x / s costs O(1e-16 / d): d = 2^-27 (7.5e-9)
#: keeps both below float32 rounding (6e-8), so the result is diffusers' to float32 rounding.
FLOW_T_TOP = 1.0 - 2.0 ** -27


def _is_flow(sch) -> bool:
    return bool(sch.config.get("use_flow_sigmas", False)) or \
        type(sch).__name__.startswith("FlowMatch")


def _flow_grid(name: str, t: np.ndarray, where: str = "sigmas") -> np.ndarray:
    """pyengine sigmas of diffusers' flow times ``t`` (a t of 1 at the top becomes
    :data:`FLOW_T_TOP`)."""
    t = np.array(t, dtype=np.float64)
    if t.size and t[0] == 1.0:
        t[0] = FLOW_T_TOP
    bad = np.flatnonzero(~((t >= 0) & (t < 1)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}: its {where} (flow times) hold {t[i]!r} at entry {i}, outside [0, 1); a "
            f"flow time of 1 below the top level (sigma = inf) or above 1 (alpha_t = 1 - t < "
            f"0, e.g. Karras/exponential/beta sigmas of the VP table read as flow times) is "
            f"no noise level of the flow x = (1 - t) x0 + t eps")
    return t / (1.0 - t)


def _flow_process(sch) -> RectifiedFlow:
    """The rectified-flow process; the grid and the model's times are passed explicitly, so
    it contributes s(sigma) = 1/(1 + sigma) = 1 - t only."""
    return RectifiedFlow(time_scale=float(sch.config.get("num_train_timesteps", 1000)))


def _process(name: str, sch) -> Process:
    return _flow_process(sch) if _is_flow(sch) else _vp_process(name, sch)


# ---------------------------------------------------------------------------------------
# One builder per scheduler class
# ---------------------------------------------------------------------------------------


def _ddim(name, sch, eta):
    cfg = sch.config
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    proc = _vp_process(name, sch)
    abar = _f64(sch.alphas_cumprod)
    ts = sch.timesteps.cpu().numpy().astype(np.int64)
    ratio = cfg.num_train_timesteps // sch.num_inference_steps
    # DDIMScheduler.step() moves from t to prev_t = t - N // n; the next call must be there.
    for i in range(len(ts) - 1):
        prev = int(ts[i]) - ratio
        if prev != int(ts[i + 1]):
            raise ValueError(
                f"{name}(timestep_spacing={cfg.timestep_spacing!r}) with num_inference_steps="
                f"{sch.num_inference_steps}: step() moves the state from timestep {int(ts[i])} "
                f"to prev_timestep = t - num_train_timesteps // num_inference_steps = {prev}, "
                f"but the next model call is at timestep {int(ts[i + 1])}, so the model is "
                f"told a noise level the state was not moved to; no sigma grid reproduces "
                f"that. Use timestep_spacing='leading', or 'trailing' with num_train_timesteps "
                f"divisible by num_inference_steps")
    prev = int(ts[-1]) - ratio
    a_last = abar[prev] if prev >= 0 else float(sch.final_alpha_cumprod)
    grid = np.concatenate([_sigma_of_abar(abar[ts]), _sigma_of_abar([a_last])])
    return _Recipe(proc, grid, ts.astype(np.float64), "ddim", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x", dict(eta=float(eta)))


def _ddpm(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    vt = cfg.variance_type
    # fixed_small_log draws with exp(0.5 log var) = sqrt(var): the same as fixed_small.
    variance = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                "fixed_large": "fixed_large"}.get(vt)
    if variance is None:
        raise NotImplementedError(f"{name}(variance_type={vt!r}) is not supported "
                                  f"(fixed_small, fixed_small_log, fixed_large are)")
    proc = _vp_process(name, sch)
    abar = _f64(sch.alphas_cumprod)
    ts = sch.timesteps.cpu().numpy().astype(np.int64)
    # previous_timestep() walks the timestep list and ends at alpha_bar = 1 (sigma 0).
    grid = np.concatenate([_sigma_of_abar(abar[ts]), [0.0]])
    return _Recipe(proc, grid, ts.astype(np.float64), "ddpm", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x", dict(variance_type=variance))


def _euler(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _vp_process(name, sch)
    grid, ts = _multistep_state(sch)
    if grid.size == ts.size + 2:
        # interpolation_type="log_linear": n + 1 log-uniform levels and a final 0, but n
        # timesteps, so the n steps end at the last positive level (the 0 is never reached)
        grid = grid[:-1]
    init = float(sch.init_noise_sigma) * _s_vp(grid[0])
    pred = _prediction(name, cfg, allowed=("epsilon", "sample", "original_sample",
                                           "v_prediction"))
    return _Recipe(proc, grid, ts, "euler", pred, init, "x_hat")


def _euler_ancestral(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _vp_process(name, sch)
    grid, ts = _multistep_state(sch)
    init = float(sch.init_noise_sigma) * _s_vp(grid[0])
    # diffusers' step() raises for prediction_type="sample": nothing to reproduce.
    pred = _prediction(name, cfg, allowed=("epsilon", "v_prediction"))
    return _Recipe(proc, grid, ts, "euler_ancestral", pred, init, "x_hat",
                   dict(eta=1.0, s_noise=1.0))


def _two_call_grid(name, sch):
    """(grid, timesteps, initial scale) of a scheduler with two model calls per step, whose
    set_timesteps repeats every inner level: sigmas [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0],
    timesteps [t0, t1, t1, ..., t_{n-1}, t_{n-1}] (Heun, DPMSolverSDE)."""
    sig, ts = _multistep_state(sch)
    if sig.size % 2 or not np.array_equal(sig[1:-1:2], sig[2:-1:2]):
        raise RuntimeError(f"{name}: unexpected sigma layout {sig}")
    grid = np.concatenate([sig[0:-1:2], sig[-1:]])
    return grid, ts, float(sch.init_noise_sigma) * _s_vp(grid[0])


def _heun(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _vp_process(name, sch)
    grid, ts, init = _two_call_grid(name, sch)
    return _Recipe(proc, grid, ts[0::2], "heun", _prediction(name, cfg), init, "x_hat")


def _dpm_multistep_orders(cfg, n: int, final_zero: bool) -> list[int]:
    """The order DPMSolverMultistepScheduler.step() uses at each of its n steps: warm-up
    min(order, i + 1); the last step first order with euler_at_final, with lower_order_final
    below 15 steps, and always on a step to sigma 0; the second-to-last at most second order
    with lower_order_final below 15 steps."""
    order = int(cfg.solver_order)
    lof = bool(cfg.lower_order_final) and n < 15
    orders = [min(order, i + 1) for i in range(n)]
    if n >= 2 and lof:
        orders[n - 2] = min(orders[n - 2], 2)
    if cfg.euler_at_final or lof or final_zero:
        orders[n - 1] = 1
    return orders


def _dpm_multistep(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _process(name, sch)
    grid, ts = _multistep_state(sch)
    pred = _prediction(name, cfg)
    alg, order, n = cfg.algorithm_type, int(cfg.solver_order), len(ts)
    recipe = dict(process=proc, sigmas=grid, timesteps=ts, prediction=pred,
                  init_noise_scale=float(sch.init_noise_sigma), state_space="x",
                  orders=_dpm_multistep_orders(cfg, n, grid[-1] == 0))
    # lower_order_final of the pyengine solvers is set from the order list at the end
    # (_settle_orders), once the grid is final.
    if order == 1 and alg in ("dpmsolver++", "dpmsolver"):
        # First-order DPM-Solver and DPM-Solver++ are both DDIM (Lu et al. 2022, eq. 3.7).
        return _Recipe(solver="ddim", options=dict(eta=0.0), **recipe)
    if order == 1 and alg == "sde-dpmsolver++":
        # First-order SDE-DPM-Solver++ is DDIM with eta = 1 (same mean and variance), and
        # both draw noise in every step.
        return _Recipe(solver="ddim", options=dict(eta=1.0), **recipe)
    if alg == "dpmsolver++" and order in (2, 3):
        return _Recipe(solver=f"dpmpp_{order}m", options=dict(solver_type=cfg.solver_type),
                       **recipe)
    if alg == "sde-dpmsolver++" and order == 2:
        return _Recipe(solver="dpmpp_2m_sde", options=dict(
            eta=1.0, s_noise=1.0, solver_type=cfg.solver_type), **recipe)
    if alg == "dpmsolver" and order in (2, 3):
        return _Recipe(solver="dpm_multistep", options=dict(
            order=order, algorithm="dpmsolver", solver_type=cfg.solver_type), **recipe)
    if alg == "sde-dpmsolver++" and order == 3:
        return _Recipe(solver="dpm_multistep", options=dict(
            order=3, algorithm=alg, solver_type=cfg.solver_type), **recipe)
    if alg == "sde-dpmsolver":
        # (final_sigmas_type="zero" is refused by the class itself: its step to sigma 0 is nan)
        if 3 in recipe["orders"]:
            raise ValueError(
                f"{name}(algorithm_type='sde-dpmsolver', solver_order={order}): diffusers' "
                f"third-order update has no sde-dpmsolver branch (its step raises at the first "
                f"third-order step), so there is no result to reproduce; use solver_order=2")
        return _Recipe(solver="dpm_multistep", options=dict(
            order=min(order, 2), algorithm=alg, solver_type=cfg.solver_type), **recipe)
    raise NotImplementedError(
        f"{name}(algorithm_type={alg!r}, solver_order={order}) has no pyengine solver")


#: max order of the pyengine DPM-Solver++ multistep solvers whose lower_order_final is settled
#: from the scheduler's order list.
_PP_MULTISTEP = {"dpmpp_2m": 2, "dpmpp_3m": 3, "dpmpp_2m_sde": 2}


def _pp_orders(max_order: int, n: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The per-step orders of pyengine's DPM-Solver++ multistep plans (solvers/dpm.py)."""
    orders = [min(max_order, i + 1) for i in range(n)]
    if lower_order_final:
        if n >= 2:
            orders[n - 2] = min(orders[n - 2], 2)
        orders[n - 1] = 1
    if final_zero:
        orders[n - 1] = 1
    return orders


def _settle_orders(r: _Recipe, name: str) -> None:
    """Pick the lower_order_final that makes the pyengine plan use the scheduler's orders."""
    max_order = _PP_MULTISTEP.get(r.solver)
    if r.solver == "dpm_multistep":
        max_order = int(r.options["order"])
    if max_order is None:
        return
    n, final_zero = r.sigmas.size - 1, r.sigmas[-1] == 0
    for lof in (False, True):
        if _pp_orders(max_order, n, lof, final_zero) == r.orders:
            r.options["lower_order_final"] = lof
            return
    raise NotImplementedError(
        f"{name}: the scheduler's per-step orders {r.orders} (solver_order, lower_order_final, "
        f"euler_at_final, final_sigmas_type) are not an option of {r.solver}")


def _dpm_singlestep(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    alg = cfg.algorithm_type
    if alg not in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        raise NotImplementedError(
            f"{name}(algorithm_type={alg!r}) has no pyengine solver (dpmsolver++, dpmsolver "
            f"and sde-dpmsolver++ are supported)")
    proc = _process(name, sch)
    grid, ts = _multistep_state(sch)
    # set_timesteps has settled the order of every step (and may have switched
    # lower_order_final on, for an uneven step count or a final step to sigma 0).
    order_list = [int(o) for o in sch.order_list]
    options = dict(order=int(cfg.solver_order), algorithm=alg,
                   solver_type=cfg.solver_type, order_list=order_list,
                   lower_order_final=bool(cfg.lower_order_final))
    return _Recipe(proc, grid, ts, "dpm_singlestep", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x", options, orders=order_list)


def _unipc(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    if not cfg.predict_x0:
        raise NotImplementedError(f"{name}(predict_x0=False): the noise-prediction UniPC has no "
                                  f"pyengine solver (predict_x0=True is supported)")
    if sch.solver_p is not None:
        raise NotImplementedError(f"{name}(solver_p=...): a foreign predictor scheduler is not "
                                  f"supported")
    proc = _process(name, sch)
    grid, ts = _multistep_state(sch)
    order, n = int(cfg.solver_order), len(ts)
    variant = cfg.solver_type
    if grid[-1] == 0:
        # On the step to sigma 0, h = inf: diffusers' B(h) = h (bh1) times a zero predictor
        # residual is nan, and at order >= 2 its residual divides by r_k = 0 (inf).
        p_last = 1 if cfg.lower_order_final else min(order, n)
        if variant == "bh1" or p_last >= 2:
            raise ValueError(
                f"{name}(solver_type={variant!r}, solver_order={order}, lower_order_final="
                f"{cfg.lower_order_final}, final_sigmas_type='zero'): diffusers' own step to "
                f"sigma 0 returns nan/inf here (h = inf makes B(h) = h or the divided "
                f"differences non-finite), so there is no result to reproduce. Use "
                f"final_sigmas_type='sigma_min', or solver_type='bh2' with lower_order_final="
                f"True; pe.Sampler(..., solver='unipc') takes the finite limit")
    options = dict(order=order, variant=variant, corrector=True,
                   disable_corrector=[int(j) for j in (cfg.disable_corrector or [])],
                   lower_order_final=bool(cfg.lower_order_final))
    return _Recipe(proc, grid, ts, "unipc", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x", options)


def _edm_euler(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    pred = cfg.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise NotImplementedError(f"{name}(prediction_type={pred!r}) is not supported")
    proc = EDM(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data)
    grid = _f64(sch.sigmas)
    sign, sd = (1.0 if pred == "epsilon" else -1.0), float(cfg.sigma_data)

    def wrapper(model):
        return EDMPreconditioned(model, sd, sign)

    # The wrapped model is a denoiser D(x, sigma): prediction "sample" on the EDM process.
    # EDM's s is 1, so init_noise_sigma scales the noise as it is.
    return _Recipe(proc, grid, None, "euler", "sample", float(sch.init_noise_sigma), "x_hat",
                   model_wrapper=wrapper)


def _flow_match_euler(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    t = _f64(sch.sigmas)
    ts = _f64(sch.timesteps)
    sign = 1.0
    if cfg.get("invert_sigmas", False):
        # Mochi: the scheduler walks u = 1 - t upward (u' > u) with x' = x + (u' - u) out, the
        # model called at u N: Euler on the flow in t with velocity -out.
        if cfg.get("stochastic_sampling", False):
            raise NotImplementedError(
                f"{name}(invert_sigmas=True, stochastic_sampling=True): the stochastic step "
                f"then takes x0 = x - u out and re-noises to (1 - u') x0 + u' z with the "
                f"inverted levels u (increasing), which is not a step of the inverted flow "
                f"(whose x0 is x + (1 - u) out); no decreasing grid reproduces it")
        t = 1.0 - t
        sign = -1.0
    grid = _flow_grid(name, t)
    if cfg.get("stochastic_sampling", False):
        # x' = (1 - t') (x - t out) + t' z: x_hat' = D + sigma' z, the renoising step; the
        # noise is drawn in every step (the last one's, times t' = 0, is not drawn)
        return _Recipe(_flow_process(sch), grid, ts, "lcm", "flow", 1.0, "x",
                       dict(s_noise=1.0), output_sign=sign)
    # x' = x + (t' - t) out is the first-order step, which is Euler in x_hat as well
    return _Recipe(_flow_process(sch), grid, ts, "euler", "flow", 1.0, "x", output_sign=sign)


def _flow_match_heun(name, sch, eta):
    _no_eta(name, eta)
    t, ts = _f64(sch.sigmas), _f64(sch.timesteps)
    # set_timesteps repeats every inner level for the corrector call, as HeunDiscrete does
    if t.size % 2 or not np.array_equal(t[1:-1:2], t[2:-1:2]):
        raise RuntimeError(f"{name}: unexpected sigma layout {t}")
    grid = _flow_grid(name, np.concatenate([t[0:-1:2], t[-1:]]))
    # Heun in (x, t) with the velocity as derivative: heun_comfy's flow form
    return _Recipe(_flow_process(sch), grid, ts[0::2], "heun_comfy", "flow", 1.0, "x")


def _lcm(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _vp_process(name, sch)
    abar = _f64(sch.alphas_cumprod)
    ts = sch.timesteps.cpu().numpy().astype(np.int64)
    # every step re-noises to the next timestep's level; the last returns the consistency
    # estimate itself (sigma 0), whatever set_alpha_to_one says
    grid = np.concatenate([_sigma_of_abar(abar[ts]), [0.0]])
    return _Recipe(proc, grid, ts.astype(np.float64), "lcm_boundary", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x",
                   dict(timestep_scaling=float(cfg.timestep_scaling), sigma_data=0.5))


def _tcd(name, sch, eta):
    cfg = sch.config
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"{name}: eta (gamma) must lie in [0, 1], got {eta}")
    proc = _vp_process(name, sch)
    abar = _f64(sch.alphas_cumprod)
    ts = sch.timesteps.cpu().numpy().astype(np.int64)
    # the last step ends at timestep floor((1 - gamma) 0) = 0: the table's first level
    grid = np.concatenate([_sigma_of_abar(abar[ts]), _sigma_of_abar(abar[:1])])
    return _Recipe(proc, grid, ts.astype(np.float64), "tcd", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x", dict(gamma=float(eta)))


def _pndm(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    pred = _prediction(name, cfg, allowed=("epsilon", "v_prediction"))
    proc = _vp_process(name, sch)
    abar = _f64(sch.alphas_cumprod)
    T = np.asarray(sch._timesteps, dtype=np.int64)[::-1]          # descending, one per step
    ratio = cfg.num_train_timesteps // sch.num_inference_steps
    # step() moves from t to t - N // n (and the pseudo-Heun step starts at t_1 + N // n):
    # the next model call must be there
    for i in range(len(T) - 1):
        if int(T[i]) - ratio != int(T[i + 1]):
            raise ValueError(
                f"{name}(timestep_spacing={cfg.timestep_spacing!r}) with num_inference_steps="
                f"{sch.num_inference_steps}: step() moves the state from timestep {int(T[i])} "
                f"to t - num_train_timesteps // num_inference_steps = {int(T[i]) - ratio}, but "
                f"the next model call is at timestep {int(T[i + 1])}; no sigma grid "
                f"reproduces that. Use timestep_spacing='leading'")
    prev = int(T[-1]) - ratio
    a_last = abar[prev] if prev >= 0 else float(sch.final_alpha_cumprod)
    grid = np.concatenate([_sigma_of_abar(abar[T]), _sigma_of_abar([a_last])])
    # PNDMScheduler combines the raw model outputs (for v models that is not the same as
    # combining noise estimates)
    if not cfg.skip_prk_steps:
        # the pseudo Runge-Kutta warm-up (set_timesteps needs 4 steps or more for it): its
        # midpoint calls at T' + (N // n) // 2, the first midpoint state at T - (N // n) // 2
        return _Recipe(proc, grid, T.astype(np.float64), "pndm", pred,
                       float(sch.init_noise_sigma), "x",
                       dict(combine="output", midpoint="integer"))
    return _Recipe(proc, grid, T.astype(np.float64), "pndm_plms", pred,
                   float(sch.init_noise_sigma), "x", dict(combine="output"))


def _lms(name, sch, eta):
    r = _euler(name, sch, eta)
    # step()'s order argument (4 by default): the pipelines never pass it
    return dataclasses.replace(r, solver="lms_integrated", options=dict(order=4))


def _kdpm2_layout(name, sch):
    """(grid, timesteps at the levels) of the KDPM2 schedulers: ``sigmas`` is [s0, s1, s1,
    ..., s_{n-1}, s_{n-1}, 0, 0, 0] and ``timesteps`` [t0, t_mid1, t1, ..., t_mid, t_{n-1}]:
    a first-order call at each level and a second at the midpoint before the next."""
    sig, ts = _f64(sch.sigmas), _f64(sch.timesteps)
    n = (ts.size + 1) // 2
    grid = np.concatenate([sig[:1], sig[1:2 * n:2]])
    if grid.size != n + 1 or grid[-1] != 0 or not np.array_equal(sig[1:2 * n - 1:2],
                                                                 sig[2:2 * n:2]):
        raise RuntimeError(f"{name}: unexpected sigma layout {sig}")
    return grid, ts[0::2]


def _kdpm2(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _vp_process(name, sch)
    grid, ts = _kdpm2_layout(name, sch)
    init = float(sch.init_noise_sigma) * _s_vp(grid[0])
    # diffusers' step() raises for prediction_type="sample"
    pred = _prediction(name, cfg, allowed=("epsilon", "v_prediction"))
    # DPM-2 (midpoint sqrt(sigma sigma') in log sigma, the model at the midpoint's
    # interpolated timestep), Euler on the step to 0
    if name == "KDPM2AncestralDiscreteScheduler":
        # the scheduler's own float32 (mid, down, up) of step j, at entry 2j of its
        # interleaved tables: its sigma_down = sqrt(sigma'^2 - sigma_up^2) cancels in float32
        # (1e-4 relative), and its samples follow those rounded levels
        rows = np.stack([_f64(sch.sigmas_interpol), _f64(sch.sigmas_down),
                         _f64(sch.sigmas_up)], axis=1)[0:2 * (grid.size - 1):2]
        return _Recipe(proc, grid, ts, "dpm_2_ancestral", pred, init, "x_hat",
                       dict(eta=1.0, s_noise=1.0, levels=[tuple(r) for r in rows.tolist()]))
    # its float32 sigma_interpol of step j (sqrt(sigma_j sigma_j+1)) at entry 2j + 1
    mids = _f64(sch.sigmas_interpol)[1:2 * (grid.size - 1):2]
    return _Recipe(proc, grid, ts, "dpm_2", pred, init, "x_hat",
                   dict(mid_levels=mids.tolist()))


def _edm_dpm_multistep(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    pred = cfg.prediction_type
    if pred not in ("epsilon", "v_prediction"):
        raise NotImplementedError(f"{name}(prediction_type={pred!r}): its "
                                  f"precondition_outputs has no such branch")
    proc = EDM(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data)
    grid = _f64(sch.sigmas)
    sign, sd = (1.0 if pred == "epsilon" else -1.0), float(cfg.sigma_data)
    alg, order, n = cfg.algorithm_type, int(cfg.solver_order), grid.size - 1
    # step() lowers the last order for euler_at_final, for lower_order_final below 15 steps
    # and always with final_sigmas_type="zero", as DPMSolverMultistep does at sigma 0
    orders = [min(order, i + 1) for i in range(n)]
    lof = bool(cfg.lower_order_final) and n < 15
    if n >= 2 and lof:
        orders[n - 2] = min(orders[n - 2], 2)
    if cfg.euler_at_final or lof or cfg.final_sigmas_type == "zero":
        orders[n - 1] = 1

    def wrapper(model):
        return EDMPreconditioned(model, sd, sign)

    recipe = dict(process=proc, sigmas=grid, timesteps=None, prediction="sample",
                  init_noise_scale=float(sch.init_noise_sigma), state_space="x",
                  orders=orders, model_wrapper=wrapper)
    if order == 1:
        return _Recipe(solver="ddim", options=dict(eta=1.0 if alg == "sde-dpmsolver++" else 0.0),
                       **recipe)
    if alg == "dpmsolver++":
        return _Recipe(solver=f"dpmpp_{order}m", options=dict(solver_type=cfg.solver_type),
                       **recipe)
    if alg == "sde-dpmsolver++" and order == 2:
        return _Recipe(solver="dpmpp_2m_sde", options=dict(
            eta=1.0, s_noise=1.0, solver_type=cfg.solver_type), **recipe)
    raise NotImplementedError(
        f"{name}(algorithm_type={alg!r}, solver_order={order}): diffusers' third-order "
        f"update has only the dpmsolver++ branch (its step raises at the first third-order "
        f"step of an sde-dpmsolver++ run), so there is no result to reproduce")


def _deis(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    if cfg.algorithm_type != "deis" or cfg.solver_type != "logrho":
        raise NotImplementedError(f"{name}(algorithm_type={cfg.algorithm_type!r}, solver_type="
                                  f"{cfg.solver_type!r}): diffusers implements log-rho DEIS "
                                  f"only")
    proc = _process(name, sch)
    grid, ts = _multistep_state(sch)
    n, order = len(ts), int(cfg.solver_order)
    # step(): warm-up min(order, i + 1); below 15 steps with lower_order_final the last step
    # first order and the one before at most second
    orders = [min(order, i + 1) for i in range(n)]
    if cfg.lower_order_final and n < 15:
        orders[-1] = 1
        if n >= 2:
            orders[-2] = min(orders[-2], 2)
    return _Recipe(proc, grid, ts, "deis_logrho", _prediction(name, cfg),
                   float(sch.init_noise_sigma), "x",
                   dict(order=order, order_list=list(orders)), orders=orders)


def _dpm_sde(name, sch, eta):
    cfg = sch.config
    _no_eta(name, eta)
    proc = _vp_process(name, sch)
    # the second call of each step is at the log-midpoint sqrt(s_i s_{i+1}) (timesteps[1::2])
    grid, ts, init = _two_call_grid(name, sch)
    pred = _prediction(name, cfg, allowed=("epsilon", "v_prediction"))
    return _Recipe(proc, grid, ts[0::2], "dpmpp_sde", pred, init, "x_hat",
                   dict(eta=1.0, s_noise=1.0, r=0.5), noise="brownian")


class _BrownianDraws:
    """DPMSolverSDEScheduler's noise: its own ``BrownianTreeNoiseSampler`` (torchsde's
    Brownian interval, seeded with ``noise_sampler_seed``), created at the first draw from that
    step's state as diffusers does, and queried at the very float32 levels diffusers passes:
    (sigma_i, exp(-(t_i + (t_{i+1} - t_i) / 2))) for the midpoint stage and (sigma_i,
    sigma_{i+1}) for the full step, t = -log sigma. The tree is not smooth in its query times
    (a one-ulp change moves a draw by ~sqrt(ulp)), so the levels are recomputed with diffusers'
    float32 operations, not taken from the plan's float64 grid."""

    def __init__(self, sch, offset: int = 0):
        sig = sch.sigmas.detach().cpu().to(torch.float32)
        self.levels = torch.cat([sig[0:-1:2], sig[-1:]])
        pos = sig[sig > 0]
        self.lo, self.hi = pos.min().item(), sig.max().item()
        self.seed = sch.noise_sampler_seed
        self.offset = int(offset)
        self.sampler = None

    def __call__(self, op, like):
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
        if self.sampler is None:
            self.sampler = BrownianTreeNoiseSampler(like, self.lo, self.hi, self.seed)
        i = op.step + self.offset
        t = self.levels[i].log().neg()
        t_next = self.levels[i + 1].log().neg()
        if op.kind == "dpmpp_sde_1":
            t_next = t + (t_next - t) * 0.5
        z = self.sampler(t.neg().exp(), t_next.neg().exp())
        return z if op.noise != 0.0 else None


_BUILDERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler_ancestral,
    "HeunDiscreteScheduler": _heun,
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "DPMSolverSinglestepScheduler": _dpm_singlestep,
    "UniPCMultistepScheduler": _unipc,
    "EDMEulerScheduler": _edm_euler,
    "FlowMatchEulerDiscreteScheduler": _flow_match_euler,
    "FlowMatchHeunDiscreteScheduler": _flow_match_heun,
    "LCMScheduler": _lcm,
    "TCDScheduler": _tcd,
    "PNDMScheduler": _pndm,
    "LMSDiscreteScheduler": _lms,
    "KDPM2DiscreteScheduler": _kdpm2,
    "KDPM2AncestralDiscreteScheduler": _kdpm2,
    "EDMDPMSolverMultistepScheduler": _edm_dpm_multistep,
    "DEISMultistepScheduler": _deis,
    "DPMSolverSDEScheduler": _dpm_sde,
}

#: Classes whose step() computes in float32 and returns prev_sample in the model output's
#: dtype (a float16 model's output gives a float16 state, as diffusers' own).
_CASTS_TO_OUTPUT_DTYPE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                          "EDMEulerScheduler", "FlowMatchEulerDiscreteScheduler",
                          "FlowMatchHeunDiscreteScheduler")

#: step()'s default eta where it is not 0 (TCD's gamma).
_DEFAULT_ETA = {"TCDScheduler": 0.3}

#: Classes whose set_timesteps repeats every inner level for a second (corrector) call.
_HEUN_LAYOUT = ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                "DPMSolverSDEScheduler")

#: The diffusers scheduler classes :func:`from_diffusers` reads.
SUPPORTED = tuple(_BUILDERS)

#: Classes refused with the reason (the real limitation).
_REFUSED = {
    "IPNDMScheduler": (
        "its first step is at alpha = 0 (pure noise), where it computes x0 = (x - sigma "
        "eps) / max(alpha, 1e-8) = 0/1e-8 = 0 and ignores the model output (x' = sigma' x); "
        "that degenerate step is no limit of a step of the v-model it assumes (the limit "
        "keeps -s' * model output), so no plan reproduces it. pe.Sampler(..., "
        "solver='ipndm') is the same Adams-Bashforth method from a finite noise level"),
    "ScoreSdeVeScheduler": (
        "its pipeline calls step_correct / step_pred (Langevin corrector + predictor), not "
        "the step() protocol; pe.Sampler(pe.processes.VE(...), solver='pc_langevin') is "
        "that sampler"),
    "DDIMInverseScheduler": (
        "inversion walks the grid upward; use pe.invert (or solver='ddim_inverse')"),
    "RePaintScheduler": (
        "its resampling jumps go back up the schedule (undo steps) inside one run, which a "
        "plan of decreasing levels cannot hold"),
}


def _refuse_class(name: str) -> None:
    if name in _REFUSED:
        raise NotImplementedError(f"{name} is not supported: {_REFUSED[name]}")


#: Relative step that stands for a final step of length 0 that is not the identity (UniPC's
#: last corrector, a singlestep block ending on a repeated level).
FINAL_NUDGE = 2.0 ** -30


#: classes whose integer-rounded timesteps can repeat inside the schedule (a step of length
#: 0 between two equal levels; one timestep entry per grid step)
_INTERIOR_REPEATS = ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                     "UniPCMultistepScheduler", "DEISMultistepScheduler")


def _drop_interior_repeats(r: _Recipe, name: str) -> None:
    """A schedule whose rounded timesteps repeat inside it (DPM-Solver, UniPC, DEIS at
    num_inference_steps close to num_train_timesteps) has steps of length 0 between two equal
    levels. diffusers' first- and second-order updates are exactly the identity there (every
    coefficient is 0 but sigma'/sigma = 1); the step after it divides by the previous step's
    h = 0 at order >= 2 and returns nan. The grid keeps one copy of each level; the entry of
    the zero-length step is recorded in ``r.identity`` (the drop-in returns its input
    there, having ignored the model output, and the plan's next step reads the history before
    it)."""
    if name not in _INTERIOR_REPEATS:
        return
    g = r.sigmas
    rep = [i for i in range(g.size - 2) if abs(g[i] - g[i + 1]) <= 1e-7 * g[i]]
    if name == "DPMSolverSinglestepScheduler" and r.orders is not None:
        # a zero-length step at position >= 2 of a singlestep block is no identity: it
        # updates from the block's start to the repeated level with the block's outputs (and
        # the SDE form draws that update's noise); as at the grid's end, its level is
        # nudged down by FINAL_NUDGE (coefficients move by O(1e-9)). Where diffusers divides
        # by 0 next (the middle of an order-3 block with solver_type="heun": r0 = r1), the
        # step stays dropped and the block restarts (diffusers is nan there)
        mid_ok = r.options.get("solver_type", "midpoint") == "midpoint"

        def nudged(i):
            end = i + 1 >= len(r.orders) or r.orders[i + 1] <= 1
            return r.orders[i] >= 2 and (end or mid_ok) and \
                g[i] * (1.0 - FINAL_NUDGE) > g[i + 2]
        ends = [i for i in rep if nudged(i)]
        if ends:
            g = r.sigmas = g.copy()
            for i in ends:
                g[i + 1] = g[i] * (1.0 - FINAL_NUDGE)
            rep = [i for i in rep if i not in ends]
    if not rep:
        return
    keep = np.ones(g.size, dtype=bool)
    keep[rep] = False
    r.sigmas = g[keep]
    r.identity = rep
    if r.timesteps is not None:
        t = np.asarray(r.timesteps)
        r.timesteps = t[keep[: t.size]]
    if r.orders is not None:
        r.orders = [o for i, o in enumerate(r.orders) if keep[i]]
        if r.solver == "dpm_singlestep":
            # a block of order k runs 1, ..., k: a block cut by a dropped step restarts
            prev = 0
            for i, o in enumerate(r.orders):
                if o != 1 and o != prev + 1:
                    r.orders[i] = o = 1
                prev = o
        if "order_list" in r.options:
            r.options["order_list"] = r.orders
    if r.options.get("disable_corrector"):
        # the corrector indices count steps: renumber them over the kept ones
        new_index = np.cumsum(keep) - 1
        r.options["disable_corrector"] = sorted({int(new_index[j]) for j in
                                                 r.options["disable_corrector"]
                                                 if j < keep.size and keep[j]})


class _EmptyRun(ValueError):
    """The run's only step has length 0: diffusers returns its input (the drop-in does the
    same; a Sampler has nothing to sample)."""


def _drop_zero_length_final_step(r: _Recipe, name: str) -> None:
    """Some configurations end on a repeated level (final_sigmas_type="sigma_min" when the last
    timestep is 0 already, or with Karras/exponential sigmas, whose last level is sigma_min).
    diffusers then takes a final step of length 0. Where that step leaves the state exactly
    as it is, it is dropped (a sigma grid must decrease strictly); elsewhere it is an error."""
    g = r.sigmas
    if g.size == 2 and abs(g[0] - g[1]) <= 1e-6 * g[0]:
        raise _EmptyRun(f"{name}: the run's only step has length 0 (sigma {g[0]:.6g} twice): "
                         f"diffusers returns its input unchanged; there is nothing to sample "
                         f"(use 2 or more steps)")
    # a final level equal to the one before to float32 rounding (EDM's karras/exponential
    # schedule ends at sigma_min, then sigma_min is appended) is a step of length 0 too:
    # diffusers moves the state by O(1e-7) of itself there, below float32 rounding
    if not (g.size >= 3 and abs(g[-1] - g[-2]) <= 1e-6 * g[-2]):
        return
    where = (f"{name}: the grid ends with a step of length 0 (sigma {g[-1]:.6g} twice, "
             f"final_sigmas_type='sigma_min')")
    # DDIM with a clipped x0 and the model's own noise estimate moves the state even over a
    # step of length 0 (x_hat' = D' + sigma eps != x_hat)
    ddim_clipped = r.solver == "ddim" and r.x0 is not None and not r.x0["eps_from_clipped"]
    # PNDM's first step is a pseudo-Heun pair that needs a second step: with two steps the
    # zero-length last one is what makes the first a pair
    if r.solver in ("unipc", "pndm_plms") or \
            (r.solver == "dpm_singlestep" and r.last_order > 1) or ddim_clipped:
        # The step is not the identity as a whole: UniPC still corrects the previous step
        # there with the model output at the repeated level (then its first-order predictor
        # over h = 0 is the identity), and a singlestep block spanning it updates from the
        # block's start. The plan keeps the step, on a last level nudged down by
        # FINAL_NUDGE: every coefficient moves by O(1e-9), below float32 rounding.
        if r.solver == "unipc" and not r.options.get("lower_order_final") and \
                min(int(r.options.get("order", 1)), g.size - 1) >= 3:
            # (order 2 takes rho = 1/2 without a solve, and B(0) = 0 makes it the identity)
            raise ValueError(f"{where}: with lower_order_final=False diffusers' order-3 UniPC "
                             f"predictor solves for rho with r_k = (lambda_k - lambda)/h "
                             f"infinite there and returns nan; there is no result to "
                             f"reproduce")
        r.sigmas = np.concatenate([g[:-1], [g[-2] * (1.0 - FINAL_NUDGE)]])
        return
    if r.solver == "deis_logrho":
        pass        # DEIS integrates its polynomial over [rho, rho]: 0 at any order
    elif r.last_order >= 3 or (r.last_order == 2 and r.options.get("solver_type") == "heun"):
        raise ValueError(f"{where}: diffusers' order-{r.last_order} "
                         f"{r.options.get('solver_type', '')} update divides by h = 0 there "
                         f"and returns nan; there is no result to reproduce")
    r.sigmas = g[:-1]
    r.dropped_final = True
    if r.timesteps is not None:
        r.timesteps = r.timesteps[: r.sigmas.size - 1]
    if r.orders is not None:
        r.orders = r.orders[:-1]
    if "order_list" in r.options:
        r.options["order_list"] = r.orders


def from_diffusers(scheduler, num_inference_steps: int | None = None, *,
                   eta: float | None = None, use_clipped_model_output: bool = False,
                   mu: float | None = None, sigmas=None, timesteps=None,
                   timestep_options: dict | None = None, **overrides) -> DiffusersSampler:
    """The pyengine Sampler that reproduces ``scheduler`` at ``num_inference_steps``.

    ``scheduler`` is a diffusers scheduler instance of a class in :data:`SUPPORTED`; it is not
    modified (a deep copy runs ``set_timesteps``). ``mu``, ``sigmas`` and ``timesteps`` are
    passed to the scheduler's ``set_timesteps`` (Flux's dynamic shift, a custom schedule;
    ``num_inference_steps`` may then be None where the scheduler allows it), and so is
    ``timestep_options`` (other keywords of that ``set_timesteps``: LCM's
    ``original_inference_steps``, ``strength``). ``eta`` and ``use_clipped_model_output`` are
    the scheduler's ``step()`` arguments (DDIM's eta, TCD's gamma: 0.3 by default as in
    ``TCDScheduler.step``). ``overrides`` are Sampler keywords (``backend=``) or solver options
    that replace the ones read from the scheduler. Raises NotImplementedError (naming the
    config field) for configurations that have no pyengine solver (a learned variance read
    from the model output, ...), and ValueError for those no sigma
    grid reproduces (DDIM's and PNDM's uneven trailing/linspace spacings) or where diffusers
    itself returns non-finite values.
    """
    name = type(scheduler).__name__
    build = _BUILDERS.get(name)
    if build is None:
        _refuse_class(name)
        raise NotImplementedError(f"from_diffusers does not support {name}; supported: "
                                  f"{', '.join(SUPPORTED)}")
    custom = {k: v for k, v in (("mu", mu), ("sigmas", sigmas), ("timesteps", timesteps))
              if v is not None}
    if timestep_options is not None:
        if not isinstance(timestep_options, dict):
            raise TypeError(f"timestep_options must be a dict of set_timesteps keywords, got "
                            f"{type(timestep_options).__name__}")
        custom.update(timestep_options)
    if num_inference_steps is not None or not ({"sigmas", "timesteps"} & set(custom)):
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps,
                                                                   (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        num_inference_steps = int(num_inference_steps)
    bad = sorted(set(overrides) & set(_GRID_KEYWORDS))
    if bad:
        raise ValueError(f"from_diffusers takes the grid from the scheduler; {bad[0]!r} cannot "
                         f"be overridden (build pe.Sampler directly for another grid)")
    _reject_common(name, scheduler.config)
    sch = copy.deepcopy(scheduler)
    _set_timesteps(sch, name, num_inference_steps, None, custom)
    if eta is None:
        eta = _DEFAULT_ETA.get(name, 0.0)
    r = _recipe(name, sch, float(eta), bool(use_clipped_model_output))
    _settle_orders(r, name)
    return _sampler(r, name, overrides)


def _check_timestep(where: str, timestep) -> None:
    """A step's timestep: a finite real number or a tensor (its value is not read here), or
    None (diffusers' schedulers read no timestep after set_begin_index or past the first
    step)."""
    if timestep is None:
        return
    if isinstance(timestep, torch.Tensor):
        if timestep.is_complex() or timestep.dtype == torch.bool:
            raise TypeError(f"{where}: timestep must be a real number, got a "
                            f"{timestep.dtype} tensor")
        return
    if isinstance(timestep, (bool, np.bool_)) or not isinstance(timestep, numbers.Real):
        raise TypeError(f"{where}: timestep must be a number or a tensor, got "
                        f"{timestep!r}")
    if not math.isfinite(float(timestep)):
        raise ValueError(f"{where}: timestep must be finite, got {timestep!r}")


def _set_timesteps(sch, name: str, n, device, custom: dict) -> None:
    """``sch.set_timesteps(n, device, **custom)``; a keyword the class does not take is a
    ValueError naming it."""
    import inspect
    params = inspect.signature(sch.set_timesteps).parameters
    for key in custom:
        if key not in params:
            raise ValueError(f"{name}.set_timesteps() takes no {key}= (it takes: "
                             f"{', '.join(k for k in params if k != 'self')})")
    if n is not None:
        sch.set_timesteps(n, device=device, **custom)
    else:
        sch.set_timesteps(device=device, **custom)


def _check_levels(r: _Recipe, name: str, sch) -> None:
    """A grid level that is no noise level (alpha_bar <= 0 at a visited timestep: zero
    terminal SNR, a beta schedule past 1) is refused; diffusers divides by sqrt(alpha_bar)
    = 0 there (or takes the root of a negative number) and returns inf / nan for x0."""
    g = np.asarray(r.sigmas, dtype=np.float64)
    if np.all(np.isfinite(g)):
        return
    i = int(np.flatnonzero(~np.isfinite(g))[0])
    field_ = ("rescale_betas_zero_snr=True" if sch.config.get("rescale_betas_zero_snr")
              else "its alphas_cumprod table")
    t = f" (timestep {r.timesteps[i]:g})" if r.timesteps is not None and \
        i < len(r.timesteps) else ""
    raise NotImplementedError(
        f"{name} with {field_}: the schedule visits alpha_bar <= 0{t} (zero terminal SNR or "
        f"betas > 1), an infinite or undefined noise level which a sigma grid cannot hold "
        f"(diffusers' x0 there is inf or nan for epsilon prediction; a v-prediction step "
        f"from alpha_bar = 0 would need a plan level at sigma = inf). Schedules that do not "
        f"visit it (e.g. timestep_spacing='leading') are reproduced")


def _recipe(name: str, sch, eta: float, clipped_eps: bool = False) -> _Recipe:
    """The recipe of a scheduler whose ``set_timesteps`` has run (orders not yet settled)."""
    r = _BUILDERS[name](name, sch, eta)
    _check_levels(r, name, sch)
    if r.noise == "brownian":
        snapshot = copy.deepcopy(sch)
        r.noise_source = lambda: _BrownianDraws(snapshot)
    r.x0 = _x0_processing(name, sch.config, r, clipped_eps)
    r.mean_channels = _mean_channels(name, sch.config)
    _drop_interior_repeats(r, name)
    _drop_zero_length_final_step(r, name)
    return r


#: diffusers classes whose step reads ``thresholding`` / ``clip_sample`` (thresholding wins
#: where both are set); the others ignore those config fields (TCD has them but never
#: reads them).
_THRESHOLDING = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
                 "DEISMultistepScheduler", "EDMDPMSolverMultistepScheduler")
_CLIP_SAMPLE = ("DDIMScheduler", "DDPMScheduler", "HeunDiscreteScheduler", "LCMScheduler")


def _x0_processing(name: str, cfg, r: _Recipe, clipped_eps: bool) -> dict | None:
    """clip_x0's options for the scheduler's clip_sample / thresholding, or None."""
    thr = bool(cfg.get("thresholding", False)) and name in _THRESHOLDING
    clip = bool(cfg.get("clip_sample", False)) and name in _CLIP_SAMPLE
    if not (thr or clip):
        return None
    # DDIM alone keeps the model's own noise estimate next to the clipped x0 (unless
    # use_clipped_model_output); every other step reads x0 only, or derives its noise
    # estimate from the clipped x0 (Heun, DEIS, DPM-Solver's noise form, and the DPM-Solver
    # first-order steps that run as the ddim solver)
    eps_clipped = name != "DDIMScheduler" or clipped_eps
    if thr:
        return dict(thresholding=True, clip_sample_range=math.inf,
                    dynamic_thresholding_ratio=float(cfg.dynamic_thresholding_ratio),
                    sample_max_value=float(cfg.sample_max_value),
                    eps_from_clipped=bool(eps_clipped))
    return dict(thresholding=False, clip_sample_range=float(cfg.clip_sample_range),
                eps_from_clipped=bool(eps_clipped))


class _MeanOutput:
    """The model with its output cut to the leading ``channels`` channels (the mean of a
    model that also predicts its variance, as DPM-Solver reads it)."""

    def __init__(self, model, channels: int):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model, self.channels = model, channels

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out = output_tensor(out)
        return out[:, : self.channels]


class _NegatedOutput:
    """The model with its output negated (Mochi's inverted flow: the model's velocity is
    x0 - eps where the plan's flow prediction is eps - x0)."""

    def __init__(self, model):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        out = output_tensor(out)
        return -out


def _sampler(r: _Recipe, name: str, overrides: dict) -> DiffusersSampler:
    solver, options = r.solver, r.options
    if r.x0 is not None:
        solver, options = "clip_x0", dict(base=r.solver, base_options=dict(r.options), **r.x0)
    kwargs = dict(prediction=r.prediction, init_noise_scale=r.init_noise_scale, **options)
    kwargs.update(overrides)
    wrapper = r.model_wrapper
    if r.noise == "brownian":
        kwargs["noise_source"] = r.noise_source
    if r.mean_channels is not None:
        inner_m, channels = wrapper, r.mean_channels

        def wrapper(model):
            return _MeanOutput(model if inner_m is None else inner_m(model), channels)
    if r.output_sign != 1.0:
        inner = wrapper

        def wrapper(model):
            return _NegatedOutput(model if inner is None else inner(model))
    return DiffusersSampler(r.process, solver, sigmas=r.sigmas, timesteps=r.timesteps,
                            scheduler_name=name, state_space=r.state_space,
                            model_wrapper=wrapper, **kwargs)


# ---------------------------------------------------------------------------------------
# The drop-in scheduler
# ---------------------------------------------------------------------------------------


class FusedSchedulerOutput:
    """What :meth:`FusedScheduler.step` returns, shaped as the wrapped class's own output
    (diffusers' ``BaseOutput``: attributes, ``out["prev_sample"]``, ``out[0]``, ``keys()`` /
    ``values()`` / ``items()``, ``to_tuple()``): ``prev_sample`` and, where that class returns
    them, ``pred_original_sample`` (x0_hat of the step's model output) or LCM's ``denoised``,
    each computed by one fused update on first access."""

    def __init__(self, prev_sample: torch.Tensor, x0=None, denoised=None, fields=None,
                 noised=None):
        self.prev_sample = prev_sample
        self._x0 = x0
        self._denoised = denoised
        self._noised = noised
        if fields is None:
            fields = ("prev_sample",) + (("denoised",) if denoised is not None else ())
        self._fields = tuple(fields)

    @property
    def pred_original_sample(self):
        if callable(self._x0):
            self._x0 = self._x0()
        return self._x0

    @property
    def denoised(self):
        """LCMScheduler's consistency estimate c_skip x + c_out x0 (its step's second
        output; LCM pipelines unpack ``latents, denoised = step(..., return_dict=False)``)."""
        if callable(self._denoised):
            self._denoised = self._denoised()
        return self._denoised

    @property
    def pred_noised_sample(self):
        """TCDScheduler's x0 re-noised to the intermediate level s = floor((1 - gamma) t')
        (its step's second output)."""
        if callable(self._noised):
            self._noised = self._noised()
        return self._noised

    def keys(self):
        # as BaseOutput: the fields that are set
        return [k for k in self._fields if getattr(self, k) is not None]

    def values(self):
        return [getattr(self, k) for k in self.keys()]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __getitem__(self, key):
        # like diffusers' outputs: by name, or by position in to_tuple()
        if isinstance(key, str):
            if key not in self._fields or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


#: the fields of each class's step output, in its ``return_dict=False`` tuple order
_OUTPUT_FIELDS = {
    **{n: ("prev_sample", "pred_original_sample") for n in (
        "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "EDMEulerScheduler",
        "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler")},
    "LCMScheduler": ("prev_sample", "denoised"),
    "TCDScheduler": ("prev_sample", "pred_noised_sample"),
}

#: classes whose scale_model_input returns the sample (the timestep unread)
_IDENTITY_INPUT = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler",
                   "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
                   "TCDScheduler", "PNDMScheduler", "DEISMultistepScheduler",
                   "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def _same(a, b) -> bool:
    try:
        return bool(a == b) or (a is None and b is None)
    except Exception:       # tensors, arrays
        return a is b


class _StepMethod:
    """``FusedScheduler.step``: bound with the signature of the wrapped class's own ``step``
    (``inspect.signature(scheduler.step)`` is what pipelines read to decide whether to pass
    ``eta`` and ``generator``)."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            wrapped = getattr(objtype, "_wrapped_class", None)
            fn = functools.partial(FusedScheduler._step)
            fn.__signature__ = inspect.signature(wrapped.step if wrapped is not None
                                                 else FusedScheduler._step)
            return fn
        fn = functools.partial(FusedScheduler._step, obj)
        fn.__signature__ = obj._step_signature
        return fn


class _PhaseMethod:
    """PNDMScheduler's ``step_prk`` / ``step_plms`` on the drop-in: a ``step()`` of the run,
    which must be in that phase (the pseudo Runge-Kutta warm-up's 12 timestep entries, then
    PLMS). Before ``set_timesteps`` they are the wrapped scheduler's own (diffusers raises
    there). Other classes have no such attribute."""

    def __init__(self, phase: str):
        self.phase = phase

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        if obj.__dict__.get("_name") != "PNDMScheduler":
            raise AttributeError(f"'{type(obj).__name__}' object has no attribute "
                                 f"'{self.name}'")
        return functools.partial(FusedScheduler._phase_step, obj, self.phase)


def _scheduler_space(plan, convs: list[float], final_conv: float, output: str):
    """``plan`` rewritten for a state kept in the scheduler's space (x = conv * state).

    Every slot has a host-side factor (true value = factor * stored tensor): the state the
    pipeline passes at model call k has conv(k), model outputs 1, and the update that
    produces the pipeline's next state writes it directly in the scheduler's space (factor
    conv(k + 1)); every other update writes true values. The factors fold into the float64
    coefficients, so a step is the plan's fused update(s) and nothing else. Returns the
    rewritten plan and, per model call, the factor by which the segment's final state still
    differs from the scheduler's space (1.0 when an update wrote it there)."""
    ops = list(plan.ops)
    evals = [j for j, op in enumerate(ops) if isinstance(op, Eval)]
    scale: dict[str, float] = {}
    new_ops, tails = list(ops), []
    for k, j0 in enumerate(evals):
        e = ops[j0]
        scale[e.src] = convs[k]
        for d in (e.dst, e.dst + "/u", e.dst + "/c"):
            scale[d] = 1.0
        k1 = k + 1
        end = evals[k1] if k1 < len(evals) else len(ops)
        target = ops[end].src if k1 < len(evals) else output
        target_conv = convs[k1] if k1 < len(evals) else final_conv
        for j in range(j0 + 1, end):
            op = ops[j]
            if isinstance(op, Custom):
                new_ops[j] = _custom_in_space(op, scale)
                continue
            out_scale = target_conv if (j == end - 1 and op.dst == target) else 1.0
            in_scale = np.array([scale[b] for b in op.bufs])
            new_ops[j] = dataclasses.replace(
                op, coefs=op.coefs * in_scale / out_scale, noise=op.noise / out_scale,
                aux_coefs=None if op.aux_coefs is None else op.aux_coefs * in_scale)
            scale[op.dst] = out_scale
            if op.aux_dst is not None:
                scale[op.aux_dst] = 1.0
        tails.append((target, scale[target] / target_conv))
    return dataclasses.replace(plan, ops=new_ops), tails


def _custom_in_space(op, scale: dict):
    """A custom op of a plan rewritten by :func:`_scheduler_space`: one that reads a linear
    combination (``bufs``, ``coefs``: ProcessX0) gets the factors of its inputs folded in;
    any other must read true values. What it writes holds true values."""
    factors = [scale.get(b, 1.0) for b in op.reads]
    if hasattr(op, "bufs") and hasattr(op, "coefs"):
        op = copy.copy(op)
        op.coefs = np.asarray(op.coefs, dtype=np.float64) * np.array(
            [scale.get(b, 1.0) for b in op.bufs])
    elif any(f != 1.0 for f in factors):
        raise NotImplementedError(f"FusedScheduler: the custom op {op!r} reads the state in "
                                  f"the scheduler's scaled space")
    for d in op.writes:
        scale[d] = 1.0
    return op


class _Walk:
    """One run through a plan, one model evaluation per ``step()`` call: the executor's
    walker over the plan rewritten for the scheduler's space (:func:`_scheduler_space`).

    The pipeline holds the state in the scheduler's space: x_hat = x / s for the Euler-type
    schedulers, pyengine's x otherwise, so x = conv * state with conv = s(sigma) or 1."""

    def __init__(self, sampler: DiffusersSampler, recipe: _Recipe, begin: int, eta: float,
                 n_entries: int):
        self.plan, self.sampler, self.begin, self.eta = sampler.plan, sampler, begin, eta
        ops = self.plan.ops
        self.evals = [j for j, op in enumerate(ops) if isinstance(op, Eval)]
        if not self.evals or self.evals[0] != 0:
            raise NotImplementedError(f"FusedScheduler: the {sampler.solver} plan updates the "
                                      f"state before its first model call")
        self.x_hat = recipe.state_space == "x_hat"
        self.sign = recipe.output_sign
        self.mean_channels = recipe.mean_channels
        self.clips = recipe.x0 is not None
        last = float(sampler.sigmas[-1])
        self.final_conv = float(sampler.process.s_of_sigma(last)) if self.x_hat else 1.0
        self.final_sigma = last
        # timestep entries whose step is the identity (zero-length steps diffusers takes):
        # interior repeated levels and a dropped final step
        self.identity = set(recipe.identity)
        if recipe.dropped_final:
            self.identity.add(len(self.evals) + len(recipe.identity))
        self.n = len(self.evals) + len(self.identity)
        if self.n != n_entries:
            raise RuntimeError(f"FusedScheduler bug: {self.n} model calls in the plan for "
                               f"{n_entries} timesteps")
        scaled, self.tails = _scheduler_space(
            self.plan, [self.conv(k) for k in range(len(self.evals))], self.final_conv,
            self.plan.output)
        self.program = Program(scaled)
        # scale_model_input's divisor sqrt(sigma^2 + 1) per model call, computed as the
        # schedulers compute it: in float32 torch ops on their float32 levels (a float64
        # sqrt rounded to float32 differs in the last bit for ~1% of the levels)
        self.divisors = ((torch.tensor([self.sigma(k) for k in range(len(self.evals))],
                                       dtype=torch.float32) ** 2 + 1) ** 0.5).tolist() \
            if self.x_hat else None
        self.k = 0                  # model calls of the plan consumed
        self.j = 0                  # timestep entries consumed (step() calls)
        self.walker: Walker | None = None
        self.seeds = None
        self.brownian = None        # DPMSolverSDE's Brownian-tree draws, per run

    def __deepcopy__(self, memo):
        # the walker holds a backend module (not copyable): the copy makes its own
        new = copy.copy(self)
        memo[id(self)] = new
        for key, val in self.__dict__.items():
            if key != "walker":
                setattr(new, key, copy.deepcopy(val, memo))
        new.walker = None
        if self.walker is not None:
            new.walker = Walker(self.program, None, self.walker.backend, recycle=False)
            new.walker.slots = dict(self.walker.slots)
            new.walker.like = self.walker.like
        return new

    def conv(self, k: int) -> float:
        if k >= len(self.evals):
            return self.final_conv
        return float(self.plan.ops[self.evals[k]].s) if self.x_hat else 1.0

    def sigma(self, k: int) -> float:
        return float(self.plan.ops[self.evals[k]].sigma) if k < len(self.evals) \
            else self.final_sigma


class _IdentityRun:
    """A run whose every step is the identity (its only step has length 0)."""

    def __init__(self, begin: int, eta, n_entries: int, sigma: float):
        self.begin, self.eta, self.n = begin, eta, n_entries
        self.identity = set(range(n_entries))
        self.k = self.j = 0
        self.evals, self.x_hat, self._sigma = [], False, sigma

    def sigma(self, k: int) -> float:
        return self._sigma


#: step() keywords of diffusers' Euler-type schedulers accepted at their no-op defaults.
_CHURN_KEYS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_STEP_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0,
                  "per_token_timesteps": None, "order": 4}


class FusedScheduler:
    """A diffusers scheduler whose ``step()`` is pyengine's fused update:

        pipe.scheduler = FusedScheduler.from_scheduler(pipe.scheduler)

    ``set_timesteps`` builds the plan that reproduces the wrapped scheduler (as
    :func:`from_diffusers` does) and each ``step(model_output, t, sample)`` feeds the model
    output in and runs the plan's update(s) up to the next model call; Heun's two
    evaluations per step are two ``step()`` calls, as diffusers' repeated timesteps ask. The
    pipeline's state keeps the wrapped scheduler's convention (x / s for the Euler-type
    schedulers, whose ``scale_model_input`` multiplies by s). ``sample`` is taken as the
    current state at every call, so pipelines that edit latents between steps work.

    No host syncs per step: coefficients are host floats and ``timestep`` is not read (the
    plan's position is), except by the first call of a run when ``set_begin_index`` was not
    called: it looks its timestep up once, as diffusers' ``_init_step_index`` does, to know
    where the run starts (img2img pipelines start partway).

    Noise: ``noise="torch"`` (default) draws where and as the wrapped scheduler does
    (``randn_tensor`` with the generator given to ``step``, or ``variance_noise``), so the
    result equals it; ``noise="philox"`` uses pyengine's in-kernel noise keyed by ``seed``.
    DPMSolverSDE's noise is its own Brownian tree, queried as diffusers does.
    ``backend`` forces a pyengine backend. Supported: the classes in :data:`SUPPORTED`
    (DDIM, DDPM, Euler, Euler ancestral, Heun, DPM-Solver multistep incl. SDE, singlestep,
    UniPC, EDM Euler, EDM DPM-Solver, flow-matching Euler and Heun, LCM, TCD, PNDM,
    LMS, KDPM2, KDPM2 ancestral, DEIS, DPM-Solver SDE) in the configurations
    :func:`from_diffusers` accepts; others raise. Plans with custom ops (clip_sample /
    thresholding) run through the same walker.

    diffusers' protocol as its own scheduler tests exercise it: ``step`` takes the wrapped
    class's own ``step`` arguments (its signature is that class's: DDIM's 4th positional
    argument is eta) and returns an output shaped as that class's (dict access;
    ``return_dict=False`` gives its tuple); before ``set_timesteps`` the wrapped scheduler's
    own ``step`` / ``scale_model_input`` run; a timestep not in the schedule falls back as
    the wrapped class does; ``from_config`` / ``from_pretrained`` / ``save_pretrained`` /
    ``register_to_config`` act on the wrapped class's config (:func:`fused_class` for a
    class-shaped drop-in).
    """

    def __new__(cls, scheduler=None, *args, **kwargs):
        # FusedScheduler(sch) is an instance of fused_class(type(sch)): a SchedulerMixin too,
        # so a pipeline holding it can save_pretrained / from_pretrained
        if cls is FusedScheduler and scheduler is not None:
            inner = scheduler._orig if isinstance(scheduler, FusedScheduler) else scheduler
            if type(inner).__name__ in _BUILDERS:
                cls = fused_class(type(inner))
        return object.__new__(cls)

    def __init__(self, scheduler, *, backend: str | None = None, noise: str = "torch",
                 seed=0):
        if isinstance(scheduler, FusedScheduler):
            scheduler = scheduler._orig
        name = type(scheduler).__name__
        if name not in _BUILDERS:
            _refuse_class(name)
            raise NotImplementedError(f"FusedScheduler does not support {name}; supported: "
                                      f"{', '.join(SUPPORTED)}")
        if noise not in ("torch", "philox"):
            raise ValueError(f"noise must be 'torch' or 'philox', got {noise!r}")
        _reject_common(name, scheduler.config)
        self._orig = scheduler
        self._name = name
        self._inner = copy.deepcopy(scheduler)
        self._step_signature = inspect.signature(self._inner.step)
        self._backend_name = backend
        self._noise = noise
        self._seed = seed
        self._begin_index: int | None = None
        self._walk: _Walk | None = None
        self._plans: dict = {}
        self._ready = False
        cfg = scheduler.config
        self._edm = None
        if name in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"):
            sign = -1.0 if cfg.prediction_type == "v_prediction" else 1.0
            self._edm = (float(cfg.sigma_data), sign)

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> FusedScheduler:
        """The drop-in for ``scheduler`` (a diffusers scheduler instance, not modified)."""
        return cls(scheduler, **kwargs)

    #: the diffusers class a :func:`fused_class` class wraps (None: read ``_class_name``)
    _wrapped_class = None
    _fused_kwargs: dict = {}

    @classmethod
    def _wrap(cls, scheduler) -> FusedScheduler:
        obj = cls.__new__(cls)
        FusedScheduler.__init__(obj, scheduler, **cls._fused_kwargs)
        return obj

    @classmethod
    def _class_for(cls, config):
        if cls._wrapped_class is not None:
            return cls._wrapped_class
        name = (config or {}).get("_class_name") if isinstance(config, dict) else \
            getattr(config, "get", lambda k: None)("_class_name")
        if not name:
            raise ValueError("FusedScheduler.from_config: the config names no scheduler class "
                             "(no '_class_name'); use fused_class(SchedulerClass).from_config")
        import diffusers
        sch_cls = getattr(diffusers, name, None)
        if sch_cls is None:
            raise ValueError(f"FusedScheduler.from_config: config's _class_name {name!r} is no "
                             f"diffusers class")
        return sch_cls

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """The drop-in wrapping ``SchedulerClass.from_config(config, **kwargs)``; the class is
        the one :func:`fused_class` was given, or the config's ``_class_name``."""
        if config is not None and hasattr(config, "config") and \
                not isinstance(config, dict):
            config = config.config          # a scheduler (diffusers accepts it, deprecated)
        sch_cls = cls._class_for(config)
        made = sch_cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if return_unused_kwargs:
            return cls._wrap(made[0]), made[1]
        return cls._wrap(made)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None,
                        return_unused_kwargs: bool = False, **kwargs):
        """The drop-in wrapping the scheduler saved at ``pretrained_model_name_or_path``
        (``SchedulerClass.from_pretrained``, same arguments)."""
        sch_cls = cls._wrapped_class
        if sch_cls is None:
            from diffusers import DDPMScheduler     # any scheduler class reads the file
            config = DDPMScheduler.load_config(pretrained_model_name_or_path,
                                               subfolder=subfolder, **kwargs)
            sch_cls = cls._class_for(config)
        made = sch_cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                       return_unused_kwargs=return_unused_kwargs, **kwargs)
        if return_unused_kwargs:
            return cls._wrap(made[0]), made[1]
        return cls._wrap(made)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the wrapped scheduler's config (its class name: loading it back without
        pyengine gives the diffusers scheduler)."""
        self._inner.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        self._inner.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def register_to_config(self, **kwargs):
        """Change config fields (as diffusers' ``register_to_config``): the next
        ``set_timesteps`` builds its plan from the new config."""
        self._inner.register_to_config(**kwargs)
        _reject_common(self._name, self._inner.config)
        cfg = self._inner.config
        if self._edm is not None:
            sign = -1.0 if cfg.prediction_type == "v_prediction" else 1.0
            self._edm = (float(cfg.sigma_data), sign)
        self._walk, self._plans = None, {}

    # -- what pipelines read ---------------------------------------------------------------
    @property
    def config(self):
        return self._inner.config

    @property
    def compatibles(self):
        """The diffusers classes compatible with the wrapped one (its own list)."""
        return self._inner.compatibles

    @property
    def order(self) -> int:
        return self._orig.order

    @property
    def timesteps(self) -> torch.Tensor:
        return self._inner.timesteps

    @property
    def init_noise_sigma(self):
        return self._inner.init_noise_sigma

    @property
    def begin_index(self):
        return self._begin_index

    @property
    def step_index(self):
        w = self._walk
        return None if w is None else w.begin + w.j

    def __len__(self) -> int:
        return len(self._orig)

    def __getattr__(self, name):
        # Anything else (sigmas, alphas_cumprod, num_inference_steps, ...) from the wrapped
        # scheduler, as set up by the last set_timesteps.
        inner = self.__dict__.get("_inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        try:
            return getattr(inner, name)
        except AttributeError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute "
                                 f"'{name}'") from None

    def __repr__(self) -> str:
        return f"FusedScheduler({self._name}, noise={self._noise!r})"

    # -- the protocol ----------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device=None, *,
                      sigmas=None, timesteps=None, mu: float | None = None, **kwargs):
        """Set the wrapped scheduler's timesteps (same arguments: ``sigmas``, ``timesteps``
        and ``mu`` where its class takes them) and start a new run."""
        for key, val in (("sigmas", sigmas), ("timesteps", timesteps), ("mu", mu)):
            if val is not None:
                kwargs[key] = val
        if num_inference_steps is not None and (
                isinstance(num_inference_steps, bool) or
                not isinstance(num_inference_steps, (int, np.integer)) or
                num_inference_steps < 1):
            raise ValueError(f"num_inference_steps must be a positive integer, got "
                             f"{num_inference_steps!r}")
        _set_timesteps(self._inner, self._name, num_inference_steps, device, kwargs)
        self._begin_index = None
        if hasattr(self._inner, "_begin_index"):
            self._inner._begin_index = None
        self._walk, self._plans, self._ready = None, {}, True
        self.__dict__.pop("_handed_over", None)
        self._start(0, self._default_opts())   # builds the plan now: unsupported ones raise
        self._walk = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at timestep entry ``begin_index`` (img2img); the plan is rebuilt on
        the remaining grid, with the warm-up the wrapped scheduler does there."""
        self._begin_index = int(begin_index)
        if hasattr(self._inner, "set_begin_index"):
            self._inner.set_begin_index(begin_index)
        self._walk = None

    def add_noise(self, original_samples, noise, timesteps):
        return self._inner.add_noise(original_samples, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs):
        """The model input for the current evaluation: the state itself, x_hat * s for the
        Euler-type schedulers, c_in x_hat for EDM. Before ``set_timesteps`` it is the wrapped
        scheduler's own (its training schedule, as diffusers does)."""
        if not self._ready:
            return self._inner.scale_model_input(sample, timestep, *args, **kwargs)
        if self._name in _IDENTITY_INPUT:
            return sample           # the timestep is not read (diffusers ignores it too)
        if self._walk is None:
            # before the run's first step: the wrapped class's own rule finds the level
            # (its timestep lookup and fallback), on a copy; step() starts the run
            return copy.deepcopy(self._inner).scale_model_input(sample, timestep, *args,
                                                                **kwargs)
        w = self._current(timestep, None)
        sigma = w.sigma(w.k)
        if self._edm is not None:
            return sample / math.sqrt(sigma * sigma + self._edm[0] ** 2)
        if w.x_hat:
            return sample / (w.divisors[w.k] if w.k < len(w.divisors)
                             else math.sqrt(sigma * sigma + 1.0))
        return sample

    step = _StepMethod()

    def _step_args(self, args, kwargs) -> dict:
        """``step``'s arguments bound as the wrapped class's own ``step`` binds them (DDIM's
        4th positional argument is eta, Euler's s_churn, DPM-Solver's generator): a keyword
        the class does not take is a TypeError naming it, as it is in diffusers."""
        sig = self._step_signature
        fast = self.__dict__.get("_step_fast")
        if fast is None:
            params = list(sig.parameters.values())
            plain = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
            fast = self._step_fast = (
                plain and [p.name for p in params[:3]] == ["model_output", "timestep",
                                                            "sample"],
                {p.name: p.default for p in params[3:]})
        if fast[0] and len(args) == 3 and kwargs.keys() <= fast[1].keys():
            # the pipelines' call step(out, t, x, **extra_step_kwargs): no binding needed
            a = dict(fast[1])
            a.update(kwargs)
            a["model_output"], a["timestep"], a["sample"] = args
            return a
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"FusedScheduler({self._name}).step{sig}: {exc} (the drop-in's step "
                            f"takes the arguments of {self._name}.step)") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                a.update(a.pop(p.name, {}))
            elif p.kind is p.VAR_POSITIONAL:
                a.pop(p.name, None)
        return a

    step_prk = _PhaseMethod("prk")
    step_plms = _PhaseMethod("plms")

    @property
    def ets(self):
        """PNDMScheduler's multistep history (its past model outputs): the wrapped
        scheduler's. Writing it hands the run to the wrapped scheduler until the next
        ``set_timesteps``: the drop-in's history is its plan's buffers, filled by its own model
        calls, so a caller-written history is stepped with the wrapped class's own
        ``step`` / ``step_prk`` / ``step_plms``."""
        return self._inner.ets

    @ets.setter
    def ets(self, value):
        if self._name != "PNDMScheduler":
            raise AttributeError(f"FusedScheduler({self._name}) has no multistep history "
                                 f"'ets' (PNDMScheduler's)")
        self._inner.ets = value
        self.__dict__["_handed_over"] = True

    def _phase_step(self, phase: str, *args, **kwargs):
        """``step_prk`` / ``step_plms`` (PNDMScheduler): the drop-in's step, in its phase."""
        if not self._ready or self.__dict__.get("_handed_over"):
            return getattr(self._inner, "step_" + phase)(*args, **kwargs)
        j = self.step_index or 0
        n_prk = 0 if self._inner.config.skip_prk_steps else len(self._inner.prk_timesteps)
        now = "prk" if j < n_prk else "plms"
        if now != phase:
            raise ValueError(f"FusedScheduler({self._name}).step_{phase}: the run is at "
                             f"timestep entry {j}, in its {now} phase (the pseudo Runge-Kutta "
                             f"warm-up takes the first {n_prk} entries); call step_{now} or "
                             f"step()")
        return self._step(*args, **kwargs)

    def _step(self, *args, **kwargs):
        """One model output in, the fused update(s) up to the next model call, the next state
        out (in the wrapped scheduler's space)."""
        if not self._ready or self.__dict__.get("_handed_over"):
            # before set_timesteps: the wrapped scheduler's own step on its training schedule
            # (diffusers' Euler-type schedulers step there; DDIM / DDPM raise their own
            # error); after a caller wrote PNDM's history (``ets``): the wrapped class's step
            return self._inner.step(*args, **kwargs)
        a = self._step_args(args, kwargs)
        model_output, timestep, sample = a.pop("model_output"), a.pop("timestep"), \
            a.pop("sample")
        generator = a.pop("generator", None)
        return_dict = a.pop("return_dict", True)
        eta = a.pop("eta", None)
        use_clipped_model_output = a.pop("use_clipped_model_output", False)
        variance_noise = a.pop("variance_noise", None)
        defaults = {k: p.default for k, p in self._step_signature.parameters.items()}
        for key, val in a.items():
            if key in _STEP_DEFAULTS and _STEP_DEFAULTS[key] == val:
                continue
            if key in defaults and defaults[key] is not inspect.Parameter.empty and \
                    _same(defaults[key], val):
                continue            # at the class's own default (Euler: no churn)
            if self._name == "FlowMatchEulerDiscreteScheduler" and key in _CHURN_KEYS:
                continue            # FlowMatchEuler's step() takes them and never reads them
            raise NotImplementedError(f"FusedScheduler({self._name}).step: {key}={val!r} is "
                                      f"not supported")
        self._check_step_inputs(model_output, timestep, sample)
        cast_to = None
        if self._name in _CASTS_TO_OUTPUT_DTYPE:
            # these classes step in float32 (a float16 / bfloat16 sample upcast) and return
            # the model output's dtype
            if sample.is_floating_point() and sample.element_size() < 4:
                sample = sample.float()
            if model_output.dtype != sample.dtype:
                cast_to = model_output.dtype
        if self._walk is None and self._begin_index is None and \
                self._detached(timestep):
            # a timestep outside the schedule, in a class whose step reads it (DDIM, DDPM,
            # PNDM compute the previous timestep from it): diffusers' own step at that time
            return self._inner.step(*args, **kwargs)
        if eta is None:
            eta = _DEFAULT_ETA.get(self._name, 0.0)
        try:
            eta = float(eta)
        except (TypeError, ValueError):
            raise ValueError(f"eta must be a number, got {eta!r}") from None
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        w = self._current(timestep, (eta, bool(use_clipped_model_output)))
        if w.j >= w.n:
            ts = self._inner.timesteps
            dup = len(torch.unique(ts)) < len(ts) and self._name not in _HEUN_LAYOUT
            cause = (" The scheduler's timesteps repeat (this beta schedule maps several of its "
                     "sigmas to one discrete timestep, e.g. cosine betas with Karras sigmas), "
                     "so the timestep passed to the first step() was found at its second "
                     "occurrence and the run started late; call set_begin_index(0) before "
                     "the loop, or use another sigma spacing." if dup else "")
            raise RuntimeError(f"FusedScheduler({self._name}): step() called more times than "
                               f"there are timesteps; call set_timesteps() to start a new "
                               f"run.{cause}")
        if w.j in w.identity:
            # diffusers' zero-length step (a repeated level): the identity, where the SDE
            # classes still draw their step's noise (the generator moves on as in diffusers)
            if self._noise == "torch" and variance_noise is None and self._draws_each_step():
                self._randn(model_output, generator)
            w.j += 1
            self._sync_step_index(w)
            return self._output(sample if cast_to is None else sample.to(cast_to), None,
                                return_dict)
        if w.walker is None:
            w.walker = Walker(w.program, None, backends.get(self._backend_name,
                                                             device=sample.device,
                                                             dtype=sample.dtype),
                              recycle=False)
        walker = w.walker
        be = walker.backend
        e = w.plan.ops[w.evals[w.k]]
        if w.mean_channels is not None:
            model_output = model_output[:, : w.mean_channels]
        out = model_output if w.sign == 1.0 else -model_output
        if self._edm is not None:
            out = _edm_denoised(be, sample, model_output, e.sigma, *self._edm)
        # the noise of this step's updates: pyengine's Philox, or drawn where and as the
        # wrapped scheduler draws (its generator, or the pipeline's variance_noise)
        if self._noise == "philox":
            if w.seeds is None:
                w.seeds = seeds_tensor(self._seed, sample.shape[0]).to(sample.device)
            walker.noise = PhiloxDraws(w.seeds)
        elif w.brownian is not None:
            walker.noise = SuppliedDraws(lambda op, like: w.brownian(op, sample))
        else:
            drawn = []

            def draw(op, like):
                if variance_noise is not None:
                    if drawn:
                        raise NotImplementedError("variance_noise given to a step that "
                                                  "draws noise twice")
                    z = variance_noise
                else:
                    z = self._randn(model_output, generator)
                drawn.append(True)
                # drawn as diffusers does (same generator state) even when unused
                return z if op.noise != 0.0 else None
            walker.noise = SuppliedDraws(draw)
        walker.like = sample
        walker.slots[e.src] = sample
        walker.run_segment(w.k, output=out)
        target, f = w.tails[w.k]
        prev = walker.slots[target]
        if f != 1.0:
            prev = prev * f
        x0 = self._x0_fn(be, e, sample, w.conv(w.k), out, w.sampler.prediction)
        clipped = walker.slots.get(e.dst + "_x0") if w.clips else None
        if clipped is not None:
            x0 = clipped                    # the clipped / thresholded x0 the step used
        denoised = noised = None
        if self._name == "LCMScheduler":
            denoised = self._lcm_denoised(be, e, sample, x0, w.sampler)
        elif self._name == "TCDScheduler":
            noised = self._tcd_noised(be, e, sample, x0, w)
        self._advance(w)
        if cast_to is not None:
            prev = prev.to(cast_to)
        out = FusedSchedulerOutput(prev, x0, denoised, _OUTPUT_FIELDS.get(self._name),
                                   noised)
        return out if return_dict else out.to_tuple()

    # -- helpers ---------------------------------------------------------------------------
    def _advance(self, w: _Walk) -> None:
        w.k += 1
        w.j += 1
        self._sync_step_index(w)

    def _sync_step_index(self, w: _Walk) -> None:
        # add_noise of the wrapped scheduler reads its step index (inpainting pipelines noise
        # the original latents to the next level after every step): keep it where ours is.
        if hasattr(self._inner, "_step_index"):
            self._inner._step_index = w.begin + w.j

    def _output(self, prev, x0, return_dict):
        out = FusedSchedulerOutput(prev, x0, None, _OUTPUT_FIELDS.get(self._name))
        return out if return_dict else out.to_tuple()

    def _lcm_denoised(self, be, e, sample, x0, sampler):
        """c_skip(t) sample + c_out(t) x0 with LCMScheduler's boundary scalings (lazy)."""
        base = sampler.options.get("base_options") or sampler.options
        sd2 = float(base.get("sigma_data", 0.5)) ** 2
        tau = float(e.t) * float(base.get("timestep_scaling", 10.0))
        c_skip, c_out = sd2 / (tau * tau + sd2), tau / math.sqrt(tau * tau + sd2)

        def denoised():
            x = x0() if callable(x0) else x0
            d = torch.empty_like(sample)
            be.fused_update(d, [sample, x], [c_skip, c_out])
            return d
        return denoised

    def _tcd_noised(self, be, e, sample, x0, w):
        """TCD's pred_noised_sample sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, eps the noise
        estimate of (sample, x0) at the step's level, s = floor((1 - gamma) t') (lazy)."""
        ts = self._inner.timesteps
        i = w.begin + w.j + 1
        t_next = float(ts[i]) if i < len(ts) else 0.0
        t_s = int(math.floor((1.0 - float(w.eta[0])) * t_next))
        abar_s = float(self._inner.alphas_cumprod[t_s])
        a_t, b_t = float(e.s), float(e.s) * float(e.sigma)        # sqrt(abar), sqrt(1-abar)
        c_x = math.sqrt(1.0 - abar_s) / b_t
        c_x0 = math.sqrt(abar_s) - c_x * a_t

        def noised():
            x = x0() if callable(x0) else x0
            d = torch.empty_like(sample)
            be.fused_update(d, [sample, x], [c_x, c_x0])
            return d
        return noised

    def _x0_fn(self, be, e, sample, conv, out, prediction):
        if self._edm is not None:
            return out                      # already D
        (dx, do), _ = param_affine(prediction, e.s, e.s * e.sigma)

        def x0():
            d = torch.empty_like(sample)
            be.fused_update(d, [sample, out], [dx * conv, do])
            return d
        return x0

    def _draws_each_step(self) -> bool:
        """Whether the wrapped class draws noise in every step() call (its SDE forms), a
        zero-length step included."""
        return self._name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler") \
            and str(self._inner.config.algorithm_type).startswith("sde-")

    def _randn(self, model_output, generator):
        from diffusers.utils.torch_utils import randn_tensor
        # DPMSolverMultistepScheduler draws its SDE noise in float32, FlowMatchEuler in the
        # dtype of the sample it upcast to float32; the others in the model output's dtype.
        dtype = torch.float32 if self._name in ("DPMSolverMultistepScheduler",
                                                "FlowMatchEulerDiscreteScheduler") \
            else model_output.dtype
        return randn_tensor(model_output.shape, generator=generator,
                            device=model_output.device, dtype=dtype)

    def _current(self, timestep, opts) -> _Walk:
        """The run in progress; ``opts`` = (eta, use_clipped_model_output) of a step() call
        (None: scale_model_input, which keeps the run's)."""
        if not self._ready:
            raise RuntimeError(f"FusedScheduler({self._name}): call set_timesteps() first")
        w = self._walk
        if w is None:
            begin = self._begin_index
            if begin is None:
                begin = self._lookup(timestep)
            self._walk = w = self._start(begin, self._default_opts() if opts is None else opts)
            self._sync_step_index(w)
        elif opts is not None and opts != w.eta:
            if w.j != 0:
                raise ValueError(f"FusedScheduler({self._name}): the step arguments (eta, "
                                 f"use_clipped_model_output) changed from {w.eta} to {opts} "
                                 f"in the middle of a run")
            self._walk = w = self._start(w.begin, opts)
        return w

    def _check_step_inputs(self, model_output, timestep, sample) -> None:
        """step()'s tensors and timestep checked by type (no host read: a tensor timestep's
        value is read once per run, by :meth:`_lookup`)."""
        where = f"FusedScheduler({self._name}).step"
        for name, val in (("model_output", model_output), ("sample", sample)):
            if not isinstance(val, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got "
                                f"{type(val).__name__}")
        _check_timestep(where, timestep)

    def _default_opts(self) -> tuple:
        return (_DEFAULT_ETA.get(self._name, 0.0), False)

    def _detached(self, timestep) -> bool:
        """True for a timestep outside the schedule in a class that steps from the timestep
        itself (no step index: DDIM, DDPM, PNDM)."""
        if timestep is None or hasattr(self._inner, "index_for_timestep"):
            return False
        ts = self._inner.timesteps
        if isinstance(timestep, torch.Tensor) and not bool(torch.isfinite(timestep).all()):
            raise ValueError(f"FusedScheduler({self._name}).step: timestep must be finite, "
                             f"got {timestep!r}")
        t = torch.as_tensor(timestep, device=ts.device).to(ts.dtype)
        return not bool((ts == t).any())

    def _lookup(self, timestep) -> int:
        """Where a run starts when set_begin_index was not called: diffusers' rule (the
        timestep's index, the second one when it repeats; a timestep not in the schedule
        falls back as the wrapped class does, e.g. to the last entry for DPM-Solver and
        UniPC). The one host sync of a run."""
        if timestep is None:
            return 0
        if isinstance(timestep, torch.Tensor) and (
                timestep.numel() != 1 or not math.isfinite(float(timestep.reshape(-1)[0]))):
            raise ValueError(f"FusedScheduler({self._name}): the first step's timestep must "
                             f"be one finite number, got {timestep!r}")
        if hasattr(self._inner, "index_for_timestep"):
            t = timestep
            if isinstance(t, torch.Tensor):
                t = t.to(self._inner.timesteps.device)
            return int(self._inner.index_for_timestep(t))
        ts = self._inner.timesteps
        t = torch.as_tensor(timestep, device=ts.device).to(ts.dtype)
        hits = (ts == t).nonzero()
        if len(hits) == 0:
            raise ValueError(f"FusedScheduler({self._name}): timestep {timestep} is not one "
                             f"of the scheduler's timesteps")
        return int(hits[1 if len(hits) > 1 else 0])

    def _start(self, begin: int, opts: tuple) -> _Walk:
        key = (begin, opts)
        eta = opts
        if key not in self._plans:
            try:
                r = _recipe(self._name, self._inner, *opts)
            except _EmptyRun:
                # one step of length 0 (1 step with final_sigmas_type="sigma_min" on a grid
                # whose one level is the last): diffusers returns its input
                return _IdentityRun(begin, opts, len(self._inner.timesteps) - begin,
                                    float(np.asarray(self._inner.sigmas)[0]))
            r = _slice_recipe(r, begin, self._name)
            _settle_orders(r, self._name)
            self._plans[key] = (_sampler(r, self._name, {}), r)
        sampler, r = self._plans[key]
        w = _Walk(sampler, r, begin, eta, len(self._inner.timesteps) - begin)
        if r.noise == "brownian":
            w.brownian = _BrownianDraws(self._inner, offset=begin // 2)
        return w


def _slice_recipe(r: _Recipe, begin: int, name: str) -> _Recipe:
    """The recipe of a run that starts at timestep entry ``begin``: the remaining grid, with
    the warm-up diffusers' multistep schedulers restart there (their order counters start
    from the first step() call)."""
    if begin == 0:
        return r
    if name == "PNDMScheduler":
        raise NotImplementedError(f"{name}: a run that starts at timestep entry {begin} "
                                  f"(img2img) is not supported; its first step makes two "
                                  f"model calls at a repeated timestep")
    g = begin
    if name in _HEUN_LAYOUT:
        if begin % 2:
            raise ValueError(f"{name}: begin_index {begin} is the second evaluation of a Heun "
                             f"step; a run starts at an even index")
        g = begin // 2
    # interior zero-length steps before the start hold no grid level of their own
    g -= sum(1 for j in r.identity if j < begin)
    if not 0 < g < r.sigmas.size - 1:
        raise ValueError(f"{name}: begin_index {begin} leaves no step of the "
                         f"{r.sigmas.size - 1}-step grid")
    prior = r.sigmas[:g]
    r = dataclasses.replace(r, sigmas=r.sigmas[g:], options=dict(r.options),
                            timesteps=None if r.timesteps is None else r.timesteps[g:],
                            identity=[j - begin for j in r.identity if j >= begin])
    for key in ("levels", "mid_levels"):                  # per-step rows
        if r.options.get(key) is not None:
            r.options[key] = r.options[key][g:]
    if r.solver == "lms_integrated":
        # diffusers' LMS takes order min(step_index + 1, 4) over the schedule's levels, those
        # before the start included, and pairs the coefficients with the outputs it has
        r.options["prior_levels"] = [float(v) for v in prior]
    if r.orders is not None:
        tail = [int(o) for o in r.orders[g:]]
        if "order_list" in r.options:
            r.options["order_list"] = r.orders = tail   # the plan lowers what it lacks
        else:
            r.orders = [min(o, j + 1) for j, o in enumerate(tail)]
    if "disable_corrector" in r.options:
        r.options["disable_corrector"] = [j - g for j in r.options["disable_corrector"]
                                          if j >= g]
    return r


def fused_class(scheduler_class, **fused_kwargs) -> type:
    """A class that stands where the diffusers ``scheduler_class`` does: its constructor
    (same signature), ``from_config`` and ``from_pretrained`` build a ``scheduler_class``
    and return its drop-in, ``FusedScheduler(instance, **fused_kwargs)``. For code that
    constructs schedulers from a class (``Pipeline.from_pretrained(..., scheduler=...)``
    takes an instance: use :meth:`FusedScheduler.from_scheduler` there)."""
    name = getattr(scheduler_class, "__name__", repr(scheduler_class))
    if name not in _BUILDERS:
        _refuse_class(name)
        raise NotImplementedError(f"fused_class does not support {name}; supported: "
                                  f"{', '.join(SUPPORTED)}")
    key = scheduler_class if not fused_kwargs else None
    if key is not None and key in _FUSED_CLASSES:
        return _FUSED_CLASSES[key]
    from diffusers import SchedulerMixin

    def __init__(self, *args, **kwargs):
        if len(args) == 1 and isinstance(args[0], (scheduler_class, FusedScheduler)):
            # FusedScheduler(instance, backend=..., noise=..., seed=...)
            FusedScheduler.__init__(self, args[0], **{**fused_kwargs, **kwargs})
            return
        FusedScheduler.__init__(self, scheduler_class(*args, **kwargs), **fused_kwargs)
    __init__.__signature__ = inspect.signature(scheduler_class.__init__)
    ns = {"__init__": __init__, "_wrapped_class": scheduler_class,
          "_fused_kwargs": dict(fused_kwargs), "__doc__": f"pyengine's drop-in for {name}.",
          "__module__": __name__}
    for attr in ("_deprecated_kwargs", "_compatibles", "config_name", "has_compatibles"):
        if hasattr(scheduler_class, attr):
            ns[attr] = getattr(scheduler_class, attr)
    made = type("Fused" + name, (FusedScheduler, SchedulerMixin), ns)
    if key is not None:
        _FUSED_CLASSES[key] = made
    return made


_FUSED_CLASSES: dict = {}


def __getattr__(attr: str):
    # the classes of fused_class by name (pipelines' model_index.json names them:
    # ["pyengine.integrations.diffusers", "FusedDDIMScheduler"])
    if attr.startswith("Fused") and attr[5:] in _BUILDERS:
        import diffusers
        return fused_class(getattr(diffusers, attr[5:]))
    if attr == "SchedulerMixin":
        # diffusers' pipeline loader looks its base classes up in the component's module
        from diffusers import SchedulerMixin
        return SchedulerMixin
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
