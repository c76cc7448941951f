"""k-diffusion-style sampling functions on pyengine's fused plans.

Code written against ``k_diffusion.sampling`` switches by changing the import:

    import pyengine as pe
    sigmas = pe.sampling.get_sigmas_karras(20, 0.03, 14.6)
    x = pe.sampling.sample_dpmpp_2m(model, torch.randn(shape) * sigmas[0], sigmas)

with k-diffusion's contract: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning
x0_hat (s_in a [B] vector of ones), ``x`` is already at the level ``sigmas[0]``, ``sigmas``
is a decreasing tensor (usually ending in 0), ``callback`` receives
``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step, ``disable`` turns off the
progress bar (tqdm, when installed). Each function compiles the registry solver of the same
math (EDM process, prediction "sample", the model as a :class:`pyengine.Denoiser`) into a
float64 plan and runs it through :func:`pyengine.runtime.run_plan` on the best backend for
``x``'s device, so every solver update is one fused kernel.

| k-diffusion name | registry solver | supported |
|---|---|---|
| sample_euler | euler (s_churn, s_tmin, s_tmax, s_noise) | all options |
| sample_euler_ancestral | euler_ancestral (eta, s_noise) | all options |
| sample_heun | heun (churn) | all options |
| sample_dpm_2 | dpm_2 (churn) | all options |
| sample_dpmpp_2m | dpmpp_2m (no lower-order final step) | all options |
| sample_dpmpp_2m_sde | dpmpp_2m_sde (eta, s_noise, solver_type) | all options |
| sample_dpm_2_ancestral | dpm_2 | eta = 0 only |
| sample_dpmpp_2s_ancestral | dpmpp_2s | eta = 0 only |
| sample_dpmpp_sde | dpmpp_2s | eta = 0, r = 1/2 only |
| sample_dpmpp_3m_sde | dpmpp_3m (heun warm-up, no lower-order final) | eta = 0 only |
| sample_ipndm (ComfyUI's name) | ipndm (max_order) | all options |

For a k-diffusion denoiser (no ComfyUI model_sampling) the "eta = 0 only" rows refuse
eta > 0 with NotImplementedError, as before; ComfyUI's names below cover the rest.

**ComfyUI's names.** Every name of ComfyUI's sampler list (``comfy_names.COMFY_SAMPLER_NAMES``:
euler, euler_ancestral, heun, heunpp2, dpm_2(_ancestral), lms, dpm_fast, dpmpp_2s_ancestral,
dpmpp_sde, dpmpp_2m, dpmpp_2m_sde(_heun), dpmpp_3m_sde (and the _gpu forms), ddpm, lcm, ipndm,
ipndm_v, deis, res_multistep(_ancestral), gradient_estimation, er_sde, seeds_2, seeds_3,
exp_heun_2_x0(_sde), sa_solver(_pece), ddim, uni_pc, uni_pc_bh2 and the *_cfg_pp forms) is
``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``,
generated from ``comfy_names.SAMPLERS`` (registry solver, fixed options, ComfyUI's options), so
a ComfyUI custom node can hand it to ``comfy.samplers.KSAMPLER`` in place of ComfyUI's
``comfy.k_diffusion.sampling.sample_<name>``. ``sample_dpm_fast`` keeps its own signature
``(model, x, sigma_min, sigma_max, n, ...)``; ``sample_dpm_adaptive`` raises
NotImplementedError (``comfy_names.NOT_PROVIDED``: adaptive steps do not fit a precomputed plan).
ComfyUI arguments taken at their defaults only (another value raises NotImplementedError with
the reason): lcm's noise_clip_std, deis's deis_mode, sa_solver's tau_func, er_sde's
noise_scaler.

* Model kind, read as ComfyUI's functions read it: ``model.inner_model.model_patcher
  .get_model_object("model_sampling")``. A model without it is a k-diffusion denoiser: where
  k-diffusion has the name (the table above) today's function runs unchanged; the other names
  run ComfyUI's eps-model form. With it, a model sampling whose class has ``CONST`` in its MRO
  (checked by name) is a flow model, anything else an eps / v / EDM model (ComfyUI hands
  every non-CONST sampler the state x = x0 + sigma eps).
* **Rule where both have the name and differ: a model carrying ComfyUI's model_sampling gets
  ComfyUI's form** (ipndm's last step returns the denoised value; euler_ancestral,
  dpm_2_ancestral, dpmpp_2s_ancestral take the RF forms on flow models; dpmpp_sde,
  dpmpp_2m_sde, dpmpp_3m_sde use the model's half-log-SNR and ComfyUI's first-level offset;
  eta > 0 works for every ancestral / SDE name); a plain denoiser gets k-diffusion's. The
  names this module did not have before (lms, dpm_fast, ...) follow ComfyUI for every model
  (ComfyUI's lms returns the denoised value on a step to 0 where k-diffusion's takes its
  multistep step; they agree on grids that do not end at 0).
* The plan: ``comfy_names.solver_for`` maps the name and options to the registry solver,
  built over ``comfy_names.plan_sigmas`` on the EDM process (eps kind: the state is x) or
  the rectified-flow process (flow kind: the state is x = (1 - t) x0 + t eps itself; a first
  level t = 1 is sigma = inf, pure noise), prediction "sample", with ComfyUI's own levels as
  the plan's explicit model times: the model is called as ``model(x, sigma * s_in,
  **extra_args)`` with exactly ComfyUI's sigma (eps) or t (flow) values at the grid's levels
  (intermediate stage levels are computed in float64 and rounded to x's dtype). The samplers
  marked ``comfy_names.SNR_OFFSET`` replace a first flow level >= 1 by
  ``model_sampling.percent_to_sigma(1e-4)`` in the caller's sigmas tensor, as ComfyUI does.
* ``s_noise`` is multiplied by ``model_sampling.noise_scale`` (default 1) where ComfyUI's
  function does (not for lcm, ddpm, dpm_fast, the churn of euler / heun / dpm_2 / heunpp2,
  nor the eps forms of euler / dpm_2 / dpmpp_2s ancestral). ComfyUI's defaults hold
  (``res_multistep_ancestral`` and ``exp_heun_2_x0_sde`` default to eta = 1).
* Noise: a caller's ``noise_sampler`` is called once per noisy update of the plan, in
  ComfyUI's call order, as ``noise_sampler(a, b)`` in the model's units
  (``comfy_names.NOISE_SAMPLER_ARGS``: b the level the update writes, the caller's tensor
  entry where it is a grid level; a the step's first level, or the previous stage's level for
  seeds_2 / seeds_3 / exp_heun_2_x0_sde), and its tensor goes into the fused update
  (:class:`pyengine.runtime.SuppliedDraws`): the same noise sampler gives ComfyUI's path. No
  call on a step to 0, nor at eta = 0 (res_multistep at eta = 0 calls it without effect in
  ComfyUI; here it is not called). Without one, ComfyUI's defaults:
  :func:`comfy_default_noise_sampler` ``(x, seed=extra_args.get("seed"))`` (torch.randn from
  a generator on x's device seeded with seed, seed + 1 on the CPU; the global generator when
  there is no seed), and for dpmpp_sde / dpmpp_2m_sde(_heun) / dpmpp_3m_sde (and _gpu) a
  Brownian tree over the caller's positive levels seeded with the same seed (queried at
  float32 times; torchsde needed, else the former with a warning).
  ``noise_sampler=PhiloxNoise(seed)`` draws pyengine's in-kernel noise instead. The churn
  noise of euler, heun, dpm_2, heunpp2 is ``torch.randn_like(x)`` drawn where ComfyUI draws
  it (heunpp2: at every step once churn is on anywhere, used or not; ComfyUI's heunpp2 draws
  even with no churn at all, which pyengine does not).
* CFG++ (``*_cfg_pp``): the unconditional denoised comes from ComfyUI's own hook: the
  function appends a ``sampler_post_cfg_function`` to ``extra_args["model_options"]`` (and
  sets ``disable_cfg1_optimization``), exactly as ComfyUI's CFG++ samplers do, and the plan is
  built with guidance w = 1 so that its guided call reads (uncond, denoised) as its two
  halves; the model is still called once per evaluation on x. A model that never calls the
  hook raises RuntimeError.
* ``callback`` receives {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} once per step (x in
  ComfyUI's state, sigma the caller's level).
* Sigma helpers: :func:`comfy_sigmas` (ComfyUI's BasicScheduler by scheduler name over a
  :class:`pyengine.schedules.ModelSampling`), :func:`split_sigmas`,
  :func:`split_sigmas_denoise`, :func:`flip_sigmas`.

Noise. Stochastic configurations call ``noise_sampler(sigma, sigma_next)`` exactly where
k-diffusion calls it, and pass the tensor it returns into the fused update, so with the same
noise sampler (or the same ``torch.manual_seed`` and the default samplers: ``torch.randn_like``
for the ancestral and churn samplers, a Brownian tree seeded from the global generator for
the SDE ones) the result is k-diffusion's up to float rounding. ``noise_sampler=PhiloxNoise(seed)``
uses pyengine's own in-kernel noise instead (batch-invariant, no noise tensors in memory).
Deterministic configurations (no churn, eta = 0) draw nothing, so unlike k-diffusion they
leave the global generator untouched.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import numpy as np
import torch

from . import backends
from . import schedules as _sched
from .errors import as_device, check_callable, check_int, check_real, check_tensor
from .parameterization import Denoiser
from .plan import Eval, Plan
from .processes import EDM
from .runtime import SuppliedDraws, run_plan
from .sampler import build_plan
from .solvers._common import churn_gamma
from .solvers.registry import OPTION_SPECS

__all__ = [
    "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2",
    "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
    "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_ipndm",
    "SAMPLERS", "PhiloxNoise", "BrownianTreeNoiseSampler", "default_noise_sampler",
    "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_polyexponential",
    "get_sigmas_vp", "append_zero", "to_d", "get_ancestral_step",
]

#: k-diffusion name -> the registry solver it runs (see the module docstring for limits).
SAMPLERS = {
    "sample_euler": "euler",
    "sample_euler_ancestral": "euler_ancestral",
    "sample_heun": "heun",
    "sample_dpm_2": "dpm_2",
    "sample_dpm_2_ancestral": "dpm_2",
    "sample_dpmpp_2s_ancestral": "dpmpp_2s",
    "sample_dpmpp_sde": "dpmpp_2s",
    "sample_dpmpp_2m": "dpmpp_2m",
    "sample_dpmpp_2m_sde": "dpmpp_2m_sde",
    "sample_dpmpp_3m_sde": "dpmpp_3m",
    "sample_ipndm": "ipndm",
}


# ---------------------------------------------------------------------------------------
# Schedules and helpers with k-diffusion's names (computed in float64, returned as tensors)
# ---------------------------------------------------------------------------------------


def _as_tensor(s: np.ndarray, device) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.get_default_dtype(), device=as_device(device))


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a 0 appended (the final level of a sigma schedule)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"append_zero takes a 1-D tensor of levels x, got {got}")
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Karras et al. (2022) eq. 5 schedule, n levels then 0."""
    return _as_tensor(_sched.karras(n, sigma_min, sigma_max, rho), device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu"):
    """Uniform in log sigma, n levels then 0."""
    return _as_tensor(_sched.exponential(n, sigma_min, sigma_max), device)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu"):
    """Polynomial in log sigma (rho = 1 is exponential), n levels then 0."""
    return _as_tensor(_sched.polyexponential(n, sigma_min, sigma_max, rho), device)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu"):
    """Continuous VP (Song et al. 2021) levels sigma(t) = sqrt(e^{beta_d t^2/2 + beta_min t}
    - 1) at t uniform from 1 to eps_s, then 0."""
    n = _sched._count(n)
    beta_d = check_real("beta_d", beta_d, lo=0.0, lo_open=True)
    beta_min = check_real("beta_min", beta_min, lo=0.0)
    eps_s = check_real("eps_s", eps_s, lo=0.0, hi=1.0, lo_open=True)
    t = np.linspace(1.0, eps_s, n)
    s = np.append(np.sqrt(np.expm1(beta_d * t ** 2 / 2 + beta_min * t)), 0.0)
    return _as_tensor(_sched.validate(s) if n > 1 or eps_s < 1.0 else s, device)


def to_d(x, sigma, denoised):
    """The Karras ODE derivative dx/dsigma = (x - D) / sigma (``sigma`` a tensor [B] or a
    number)."""
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.as_tensor(_sched._real(sigma, "sigma"), dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.dim() - sigma.dim()))


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up) of an ancestral step, sigma_down^2 + sigma_up^2 = sigma_to^2."""
    f = _sched._real(sigma_from, "sigma_from")
    t = _sched._real(sigma_to, "sigma_to")
    eta_f = _sched._real(eta, "eta")
    if not (f > 0 and 0 <= t <= f):
        raise ValueError(f"get_ancestral_step needs sigma_from > 0 and 0 <= sigma_to <= "
                         f"sigma_from (a step down), got sigma_from={sigma_from}, "
                         f"sigma_to={sigma_to}")
    if not (math.isfinite(eta_f) and eta_f >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                              / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def default_noise_sampler(x):
    """k-diffusion's default: fresh ``torch.randn_like(x)`` at every call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


class BrownianTreeNoiseSampler:
    """Noise from a Brownian tree (torchsde), as k-diffusion's SDE samplers use by default:
    ``sampler(sigma, sigma_next)`` is the increment W(sigma_next) - W(sigma) divided by
    sqrt(|sigma_next - sigma|), so it is standard normal and consistent across step sizes.

    ``seed`` is an int (one tree for the batch) or one int per sample (one tree each); None
    draws one from torch's global generator, as k-diffusion does. ``transform`` maps sigma to
    the tree's time."""

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda s: s):
        try:
            import torchsde
        except ImportError as exc:
            raise ImportError("BrownianTreeNoiseSampler needs torchsde (pip install torchsde)"
                              ) from exc
        self.transform = transform
        a = transform(torch.as_tensor(sigma_min))
        b = transform(torch.as_tensor(sigma_max))
        lo, hi, self.sign = (a, b, 1) if a < b else (b, a, -1)
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        self.batched = not isinstance(seed, (int, np.integer))
        if self.batched:
            if isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__") or \
                    not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                            for v in (seed.tolist() if hasattr(seed, "tolist") else seed)):
                raise ValueError(f"BrownianTreeNoiseSampler: seed must be an int, one int per "
                                 f"sample or None, got {seed!r}")
            seed = seed.tolist() if hasattr(seed, "tolist") else list(seed)
            if len(seed) != x.shape[0]:
                raise ValueError(f"BrownianTreeNoiseSampler: {len(seed)} seeds for a batch of "
                                 f"{x.shape[0]}")
            w0 = w0[0]
        else:
            seed = [int(seed)]
        self.trees = [torchsde.BrownianTree(lo, w0, hi, entropy=s) for s in seed]

    def __call__(self, sigma, sigma_next):
        a = self.transform(torch.as_tensor(sigma))
        b = self.transform(torch.as_tensor(sigma_next))
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (b - a).abs().sqrt()


class PhiloxNoise:
    """Pass as ``noise_sampler`` to use pyengine's in-kernel Philox noise (DESIGN.md s.6)
    keyed by ``seed`` (int for the batch, or one per sample) instead of noise tensors: the
    fastest path, and a sample's noise does not depend on its batch. The numbers differ from
    any torch generator's."""

    def __init__(self, seed=0):
        self.seed = seed

    def __call__(self, sigma, sigma_next):
        raise TypeError("PhiloxNoise draws inside pyengine's fused kernels; it is not a "
                        "callable noise sampler for other libraries")


# ---------------------------------------------------------------------------------------
# The plan, the noise hook and the runner
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _base_plan(solver: str, grid: tuple, options: tuple) -> Plan:
    return build_plan(EDM(), solver, np.array(grid), "sample", **dict(options))


class _KNoise:
    """The caller's noise sampler where k-diffusion calls it: ``fn(sigma_i, sigma_{i+1})``
    (the entries of the caller's sigmas tensor) at step i iff ``draws(i, grid)``; with
    ``at_step_start`` (churn) before the step's model call, used or not. A draws source of
    the walk (:class:`pyengine.runtime.SuppliedDraws`)."""

    def __init__(self, fn, sigmas: torch.Tensor, draws, at_step_start: bool):
        self.fn, self.sigmas, self.draws = fn, sigmas, draws
        self.shape = None                  # the state's shape, set by the caller
        self.grid = _grid(sigmas)
        self.at_step_start = at_step_start
        self.started: set[int] = set()
        self.pending = None

    def _draw(self, i: int) -> torch.Tensor:
        return _noise_out(self.fn(self.sigmas[i], self.sigmas[i + 1]), self.shape)

    def _start(self, i: int) -> None:
        if i not in self.started and self.draws(i, self.grid):
            self.started.add(i)
            self.pending = self._draw(i)

    def update_noise(self, op, like):
        i = op.step
        if not self.draws(i, self.grid):
            if op.noise != 0.0:
                raise RuntimeError(f"pyengine.sampling bug: a noisy update at step {i} where "
                                   f"k-diffusion draws no noise")
            return None
        if not self.at_step_start:
            return self._draw(i)
        self._start(i)
        z, self.pending = self.pending, None
        return z

    def at_eval(self, op) -> None:
        if self.at_step_start:
            self._start(op.step)

    def source(self) -> SuppliedDraws:
        return SuppliedDraws(self.update_noise, self.at_eval)


def _noise_out(z, shape):
    """A noise sampler's draw, checked: a floating tensor of the state's ``shape``."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or \
            (shape is not None and tuple(z.shape) != tuple(shape)):
        got = f"{z.dtype} tensor of shape {tuple(z.shape)}" if isinstance(z, torch.Tensor) \
            else type(z).__name__
        raise ValueError(f"noise_sampler(sigma, sigma_next) must return a floating tensor of "
                         f"x's shape {tuple(shape) if shape is not None else ''}, got {got}")
    return z


def _grid(sigmas) -> np.ndarray:
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    return sigmas.detach().to("cpu", torch.float64).numpy()


def _progress(total: int, disable):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, disable=disable)


def _per_step(plan: Plan, n: int, disable, report):
    """(progress bar or None, the walk's callback): the walk reports every model call;
    k-diffusion and ComfyUI report the first of each step, ``report(i, op, slots)``."""
    bar = _progress(n, disable)
    first_eval = {}
    for op in plan.ops:
        if isinstance(op, Eval) and op.step not in first_eval:
            first_eval[op.step] = op
    seen = set()

    def on_eval(i, sigma, slots):
        if i in seen:
            return
        seen.add(i)
        if report is not None:
            report(i, first_eval[i], slots)
        if bar is not None:
            bar.update(1)
    return bar, on_eval


def _check_call(name: str, model, x, sigmas, extra_args, callback, noise_sampler):
    """The arguments every sampling function takes, checked before anything runs (the one
    place for the k-diffusion and ComfyUI names); returns ``sigmas`` as a tensor."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: x must be a floating-point tensor")
    check_tensor("x", x, where=f"{name}: ")
    check_callable("model", model, where=f"{name}: ")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"{name}: noise_sampler must be callable as noise_sampler(sigma, "
                        f"sigma_next), got {type(noise_sampler).__name__}")
    if callback is not None:
        check_callable("callback", callback, "callback(info_dict)", where=f"{name}: ")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"{name}: extra_args must be a dict of model keyword arguments, got "
                        f"{type(extra_args).__name__}")
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, device=x.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name}: sigmas must be a 1-D tensor of noise levels ({exc})"
                             ) from None
    if sigmas.device.type == "meta":
        raise ValueError(f"{name}: sigmas is a tensor on the meta device (it has no values)")
    if sigmas.dim() != 1:
        raise ValueError(f"{name}: sigmas must be a 1-D tensor of noise levels, got shape "
                         f"{tuple(sigmas.shape)}")
    return sigmas


def _run(name: str, solver: str, model, x, sigmas, extra_args, callback, disable, *,
         options: dict, noise_sampler=None, draws=None, at_step_start: bool = False,
         gammas=None):
    """Compile ``solver`` over ``sigmas`` and run it on ``x``; see the module docstring."""
    sigmas = _check_call(name, model, x, sigmas, extra_args, callback, noise_sampler)
    if sigmas.numel() < 2:
        return x                                       # no step: k-diffusion returns x
    grid = _grid(sigmas)
    try:
        plan = _base_plan(solver, tuple(grid.tolist()), tuple(sorted(options.items())))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    seed, noise = 0, None
    if isinstance(noise_sampler, PhiloxNoise):
        seed = noise_sampler.seed                      # the plan's own in-kernel draws
    elif draws is not None:
        knoise = _KNoise(noise_sampler, sigmas, draws, at_step_start)
        knoise.shape = x.shape
        noise = knoise.source()

    def report(i, op, slots):
        g = 0.0 if gammas is None else gammas[i]
        sigma_hat = sigmas[i] * (g + 1) if g > 0 else sigmas[i]
        callback({"x": slots[op.src], "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                  "denoised": slots[op.dst]})

    bar, on_eval = _per_step(plan, len(grid) - 1, disable, report if callback else None)

    # k-diffusion passes sigma in x's dtype (sigma * x.new_ones([B])); the adapter makes it
    # float32 for reduced-precision states.
    denoiser = Denoiser(lambda xx, sig, **kw: model(xx, sig.to(xx.dtype), **kw))
    be = backends.get(None, device=x.device, dtype=x.dtype)
    try:
        with torch.no_grad():
            return run_plan(plan, denoiser, x, seed=seed, backend=be, callback=on_eval,
                            extra_args=extra_args, noise=noise, recycle=callback is None)
    finally:
        if bar is not None:
            bar.close()


def _churn_gammas(grid: np.ndarray, s_churn, s_tmin, s_tmax) -> list[float]:
    n = len(grid) - 1
    return [churn_gamma(float(grid[i]), n, s_churn, s_tmin, s_tmax) for i in range(n)]


def _churned(name, solver, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin,
             s_tmax, s_noise):
    opts = {k: OPTION_SPECS[k].check(k, v, f"{name}: ") for k, v in
            (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise))}
    s_churn, s_tmin, s_tmax = opts["s_churn"], opts["s_tmin"], opts["s_tmax"]
    sigmas = _check_call(name, model, x, sigmas, extra_args, callback, None)
    gammas = None
    if sigmas.numel() >= 2:
        gammas = _churn_gammas(_grid(sigmas), s_churn, s_tmin, s_tmax)
    stochastic = gammas is not None and any(g > 0 for g in gammas)
    # k-diffusion draws randn_like(x) * s_noise at the start of every step once churn is on.
    return _run(name, solver, model, x, sigmas, extra_args, callback, disable, options=opts,
                noise_sampler=default_noise_sampler(x) if stochastic else None,
                draws=_always if stochastic else None, at_step_start=True,
                gammas=gammas)


def _eta_zero_only(name: str, eta, what: str) -> None:
    if eta:
        raise NotImplementedError(
            f"pyengine.sampling.{name}: eta={eta} needs {what}, which pyengine's solver "
            f"registry does not have; eta=0 (its deterministic form) is supported")


def _always(i, grid) -> bool:
    return True


def _never(i, grid) -> bool:
    return False


def _next_positive(i, grid) -> bool:
    """k-diffusion's ancestral and SDE samplers draw on every step that does not end at 0."""
    return grid[i + 1] > 0


# ---------------------------------------------------------------------------------------
# The samplers
# ---------------------------------------------------------------------------------------


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Euler steps of Karras et al. (2022) Algorithm 2: after churn to sigma_hat =
    sigma (1 + gamma), x' = x + (sigma' - sigma_hat)(x - D)/sigma_hat (``euler``)."""
    return _churned("sample_euler", "euler", model, x, sigmas, extra_args, callback, disable,
                    s_churn, s_tmin, s_tmax, s_noise)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun steps of Karras et al. (2022) Algorithm 2, Euler on the step to 0 (``heun``)."""
    return _churned("sample_heun", "heun", model, x, sigmas, extra_args, callback, disable,
                    s_churn, s_tmin, s_tmax, s_noise)


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0,
                 s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2-like midpoint in log sigma with Algorithm 2's churn (``dpm_2``)."""
    return _churned("sample_dpm_2", "dpm_2", model, x, sigmas, extra_args, callback, disable,
                    s_churn, s_tmin, s_tmax, s_noise)


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral Euler: x' = x + (sigma_down - sigma)(x - D)/sigma + s_noise sigma_up z
    (``euler_ancestral``)."""
    stochastic = bool(eta)
    if stochastic and noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    return _run("sample_euler_ancestral", "euler_ancestral", model, x, sigmas, extra_args,
                callback, disable, options=dict(eta=float(eta), s_noise=float(s_noise)),
                noise_sampler=noise_sampler,
                draws=_next_positive if stochastic else _never)


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                           eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral DPM-2; eta = 0 only, where it is DPM-2 without churn (``dpm_2``)."""
    _eta_zero_only("sample_dpm_2_ancestral", eta, "an ancestral DPM-2 solver")
    return _run("sample_dpm_2_ancestral", "dpm_2", model, x, sigmas, extra_args, callback,
                disable, options={})


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None,
                              eta=1.0, s_noise=1.0, noise_sampler=None):
    """Ancestral DPM-Solver++(2S); eta = 0 only, where it is DPM-Solver++(2S) (``dpmpp_2s``)."""
    _eta_zero_only("sample_dpmpp_2s_ancestral", eta, "an ancestral DPM-Solver++(2S) solver")
    return _run("sample_dpmpp_2s_ancestral", "dpmpp_2s", model, x, sigmas, extra_args,
                callback, disable, options={})


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                     s_noise=1.0, noise_sampler=None, r=1 / 2):
    """DPM-Solver++ SDE; eta = 0 and r = 1/2 only, where it is DPM-Solver++(2S) (``dpmpp_2s``)."""
    _eta_zero_only("sample_dpmpp_sde", eta, "the stochastic DPM-Solver++ (SDE) solver")
    if r != 0.5:
        raise NotImplementedError(f"pyengine.sampling.sample_dpmpp_sde: r={r}; the registry's "
                                  f"dpmpp_2s has its midpoint at r = 1/2 only")
    return _run("sample_dpmpp_sde", "dpmpp_2s", model, x, sigmas, extra_args, callback,
                disable, options={})


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), first step first order, D on a step to 0 (``dpmpp_2m``)."""
    return _run("sample_dpmpp_2m", "dpmpp_2m", model, x, sigmas, extra_args, callback,
                disable, options=dict(solver_type="midpoint", lower_order_final=False))


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint"):
    """SDE-DPM-Solver++(2M): x' = (sigma'/sigma) e^{-eta h} x + (1 - e^{-(1+eta)h}) D + ...
    + s_noise sigma' sqrt(1 - e^{-2 eta h}) z (``dpmpp_2m_sde``)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    stochastic = bool(eta)
    if stochastic and noise_sampler is None:
        noise_sampler = _default_sde_noise(x, sigmas)
    return _run("sample_dpmpp_2m_sde", "dpmpp_2m_sde", model, x, sigmas, extra_args, callback,
                disable, options=dict(eta=float(eta), s_noise=float(s_noise),
                                      solver_type=solver_type, lower_order_final=False),
                noise_sampler=noise_sampler,
                draws=_next_positive if stochastic else _never)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        eta=1.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(3M) SDE; eta = 0 only, where it is DPM-Solver++(3M) with the heun-form
    second step and no lower-order final step (``dpmpp_3m``)."""
    _eta_zero_only("sample_dpmpp_3m_sde", eta, "a stochastic 3M solver (the registry's "
                   "dpmpp_3m has no eta)")
    return _run("sample_dpmpp_3m_sde", "dpmpp_3m", model, x, sigmas, extra_args, callback,
                disable, options=dict(solver_type="heun", lower_order_final=False))


def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth in sigma on d = (x - D)/sigma with warm-up
    order min(max_order, i + 1); ComfyUI's k-diffusion name (``ipndm``)."""
    return _run("sample_ipndm", "ipndm", model, x, sigmas, extra_args, callback, disable,
                options=dict(order=check_int("max_order", max_order, lo=1, hi=4,
                                             where="sample_ipndm: ")))


_warned_sde = False


def _default_sde_noise(x, sigmas):
    """k-diffusion's default for the SDE samplers: a Brownian tree over [sigma_min, sigma_max]
    seeded from the global generator; without torchsde, randn_like (same distribution)."""
    global _warned_sde
    try:
        import torchsde  # noqa: F401
    except ImportError:
        if not _warned_sde:
            warnings.warn("torchsde is not installed: the SDE samplers' default noise is "
                          "torch.randn_like (same distribution as k-diffusion's Brownian tree, "
                          "other values)", stacklevel=3)
            _warned_sde = True
        return default_noise_sampler(x)
    s = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas)
    return BrownianTreeNoiseSampler(x, s[s > 0].min(), s.max())


# ---------------------------------------------------------------------------------------
# ComfyUI's sampler names (comfy/k_diffusion/sampling.py), generated from comfy_names
# ---------------------------------------------------------------------------------------

from .integrations import comfy_names as _cn  # noqa: E402
from .plan import PlanBuilder, Update  # noqa: E402
from .processes import RectifiedFlow  # noqa: E402
from .solvers import registry as _registry  # noqa: E402

#: ComfyUI names whose default noise sampler is a Brownian tree over the caller's sigmas
#: (ComfyUI's BrownianTreeNoiseSampler seeded with extra_args["seed"]).
_TREE_DEFAULT = frozenset(n for n in _cn.SAMPLERS
                          if n.startswith(("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")))
#: ComfyUI names that draw their churn noise with torch.randn_like (not the noise sampler).
_CHURN_NAMES = frozenset({"euler", "heun", "dpm_2", "heunpp2"})
#: ComfyUI's option names that comfy_names spells as the registry does.
_COMFY_RENAME = {"lms": {"order": "max_order"}}
#: Arguments of ComfyUI's functions that the registry solver takes under the same name
#: although comfy_names does not list them (ComfyUI's KSAMPLER never passes them).
_COMFY_PASS = {"sa_solver": ("use_pece",), "dpmpp_2m_sde_heun": ("solver_type",),
               "dpmpp_2m_sde_heun_gpu": ("solver_type",)}
#: Arguments of ComfyUI's functions supported at their default only: (default, reason).
_COMFY_ONLY = {
    "lcm": {"noise_clip_std": (0.0, _cn.NOT_PROVIDED["lcm[noise_clip_std>0]"])},
    "deis": {"deis_mode": ("tab", _cn.NOT_PROVIDED["deis[deis_mode=rhoab]"])},
    "sa_solver": {"tau_func": (None, _cn.NOT_PROVIDED["sa_solver[tau_func]"])},
    "sa_solver_pece": {"tau_func": (None, _cn.NOT_PROVIDED["sa_solver[tau_func]"])},
    "er_sde": {"noise_scaler": (None, "a caller's noise_scaler (a Python function of the "
                                      "level) is not mapped; ComfyUI's default is built in")},
}
#: ComfyUI names whose s_noise is not multiplied by model_sampling.noise_scale (churn, lcm,
#: ddpm, dpm_fast), and those where only the flow (RF) form multiplies it.
_UNSCALED = _CHURN_NAMES | {"lcm", "ddpm", "dpm_fast"}
_RF_SCALED = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"})
#: ComfyUI's own defaults where the registry solver's default differs (the registry's
#: res_multistep and exp_heun_2_x0 are deterministic unless given eta).
_COMFY_DEFAULTS = {"res_multistep_ancestral": {"eta": 1.0},
                   "res_multistep_ancestral_cfg_pp": {"eta": 1.0},
                   "exp_heun_2_x0_sde": {"eta": 1.0}}


def _model_sampling(model):
    """ComfyUI's model_sampling of the model its samplers are handed (the wrapper whose
    ``inner_model.model_patcher.get_model_object("model_sampling")`` ComfyUI's functions
    read), or None for other models (k-diffusion denoisers)."""
    try:
        getter = model.inner_model.model_patcher.get_model_object
    except AttributeError:
        return None
    try:
        return getter("model_sampling")
    except Exception:      # a patcher without the object: not a ComfyUI model to us
        return None


def _is_flow(model_sampling) -> bool:
    """ComfyUI's ``isinstance(model_sampling, comfy.model_sampling.CONST)``, by class name
    (ComfyUI need not be importable here)."""
    return any(c.__name__ == "CONST" for c in type(model_sampling).__mro__)


class _Kind:
    """What comfy_names.plan_sigmas reads of a model sampling."""

    def __init__(self, model_sampling):
        self.flow = model_sampling is not None and _is_flow(model_sampling)
        self._ms = model_sampling

    def percent_to_sigma(self, p):
        return float(self._ms.percent_to_sigma(p))


def comfy_default_noise_sampler(x, seed=None):
    """ComfyUI's default_noise_sampler: ``torch.randn`` of x's shape, dtype and device from a
    generator on x's device seeded with ``seed`` (``seed + 1`` on the CPU, as ComfyUI does),
    or from the global generator when ``seed`` is None."""
    if seed is None:
        return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout,
                                                     device=x.device)
    seed = check_int("seed", seed)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed + (1 if x.device.type == "cpu" else 0))
    return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout,
                                                 device=x.device, generator=gen)


def _comfy_default_noise(name, x, sigmas, seed):
    if name in _TREE_DEFAULT:
        try:
            import torchsde  # noqa: F401
        except ImportError:
            warnings.warn(f"sample_{name}: torchsde is not installed, so the default noise is "
                          f"ComfyUI's default_noise_sampler instead of its Brownian tree (same "
                          f"distribution, other values)", stacklevel=4)
        else:
            pos = sigmas[sigmas > 0]
            return BrownianTreeNoiseSampler(x, pos.min(), sigmas.max(), seed=seed,
                                            transform=_tree_time)
    return comfy_default_noise_sampler(x, seed)


def _tree_time(sigma):
    """The Brownian tree's time: the level as float32 on the CPU (ComfyUI queries its CPU
    tree with float32 times)."""
    return torch.as_tensor(sigma).detach().to("cpu", torch.float32)


class _ComfyNoise:
    """The caller's ``noise_sampler`` called where ComfyUI calls it: once per noisy update of
    the plan (the registry's comfy solvers draw in ComfyUI's call order), with the (a, b) of
    comfy_names.NOISE_SAMPLER_ARGS in the model's units; the churn noise of euler / heun /
    dpm_2 / heunpp2 is ``torch.randn_like`` as in ComfyUI. A draws source of the walk."""

    def __init__(self, fn, levels: torch.Tensor, grid: np.ndarray, flow: bool, chained: bool,
                 every_step: torch.Tensor | None = None):
        self.fn, self.levels, self.grid = fn, levels, grid
        self.flow, self.chained = flow, chained
        self.last: dict[int, torch.Tensor] = {}
        # heunpp2 draws its churn noise at the start of every step, used or not
        self.every_step, self.churned = every_step, set()

    def _level(self, sigma: float, i: int) -> torch.Tensor:
        """The model-unit level of pyengine ``sigma`` at step i (the caller's entry where the
        plan's level is a grid level)."""
        for k in (i + 1, i):
            if k < len(self.grid) and sigma == self.grid[k]:
                return self.levels[k]
        c = 1.0 if math.isinf(sigma) else (sigma / (1.0 + sigma) if self.flow else sigma)
        return torch.tensor(c, dtype=self.levels.dtype, device=self.levels.device)

    def update_noise(self, op: Update, like):
        if op.noise_index < 0 or op.sigma == 0.0:
            return None            # ComfyUI draws no noise on a step to 0
        i = op.step
        if op.kind == "churn":
            self.churned.add(i)
            return torch.randn_like(like)
        sigma = op.sigma if math.isfinite(op.sigma) or math.isinf(op.sigma) else \
            float(self.grid[i + 1])
        b = self._level(sigma, i)
        a = self.last.get(i, self.levels[i]) if self.chained else self.levels[i]
        self.last[i] = b
        return _noise_out(self.fn(a, b), like.shape)

    def at_eval(self, op) -> None:
        if self.every_step is not None and op.step not in self.churned:
            self.churned.add(op.step)
            torch.randn_like(self.every_step)          # ComfyUI's unused draw

    def source(self) -> SuppliedDraws:
        return SuppliedDraws(self.update_noise, self.at_eval)


def _comfy_plan(name: str, solver: str, options: dict, grid: np.ndarray, flow: bool,
                times, guided: bool) -> Plan:
    """The registry solver over the plan grid (first level inf allowed on flow models: pure
    noise), the model called in process space with ComfyUI's own levels as its times."""
    key = (name, solver, tuple(grid.tolist()), flow,
           None if times is None else tuple(times.tolist()), guided,
           tuple(sorted(options.items())))
    plan = _COMFY_PLANS.get(key)
    if plan is not None:
        return plan
    info = _registry.get(solver)
    opts = _registry.check_options(info, options)
    finite = grid[1:] if math.isinf(grid[0]) else grid
    if finite.size >= 2:
        _sched.validate(finite)
    elif not (finite.size == 1 and 0.0 <= finite[0] < math.inf):
        raise ValueError(f"sigmas {grid.tolist()} is not a decreasing list of levels")
    process = RectifiedFlow() if flow else EDM()
    b = PlanBuilder(process, grid, "sample", solver=solver, timesteps=times,
                    guidance_scale=1.0 if guided else None)
    info.build(b, **opts)
    plan = b.finish()
    if len(_COMFY_PLANS) >= 64:
        _COMFY_PLANS.pop(next(iter(_COMFY_PLANS)))
    _COMFY_PLANS[key] = plan
    return plan


_COMFY_PLANS: dict = {}


def _sa_interval(model_sampling, flow: bool) -> dict:
    """sa_solver's default stochastic interval is [percent_to_sigma(0.2), (0.8)] of the
    model's own sampling; the registry solver takes it as percents of its process's model
    sampling (flow with shift 1: t = 1 - p; EDM: log-uniform over [0.002, 80])."""
    out = {}
    for key, p in (("tau_start", 0.2), ("tau_end", 0.8)):
        c = float(model_sampling.percent_to_sigma(p))
        if flow:
            q = 1.0 - c
        else:
            lo, hi = math.log(EDM().sigma_min), math.log(EDM().sigma_max)
            q = 1.0 - (math.log(c) - lo) / (hi - lo) if c > 0 else 1.0
        out[key] = min(max(q, 0.0), 1.0)
    return out


class _CfgPPModel:
    """A ComfyUI model called on the walk's doubled batch cat([x, x]) of a plan guided with
    w = 1: one call of the model on x with a post-CFG hook (ComfyUI's
    ``sampler_post_cfg_function`` in ``model_options``, cfg1 optimization off, as ComfyUI's
    CFG++ samplers install it) that keeps the unconditional denoised; returns
    cat([uncond, denoised]), which the plan reads as its D_u and D halves."""

    def __init__(self, model, extra_args):
        self.model = model
        mo = dict((extra_args or {}).get("model_options", {}) or {})
        mo["sampler_post_cfg_function"] = list(mo.get("sampler_post_cfg_function", [])) + \
            [self._hook]
        mo["disable_cfg1_optimization"] = True
        self.extra_args = dict(extra_args or {}, model_options=mo)
        self.uncond = None

    def _hook(self, args):
        self.uncond = args["uncond_denoised"]
        return args["denoised"]

    def __call__(self, xx, t, **_):
        n = xx.shape[0] // 2
        self.uncond = None
        out = self.model(xx[:n], t[:n].to(xx.dtype), **self.extra_args)
        if self.uncond is None:
            raise RuntimeError("the *_cfg_pp samplers read the unconditional denoised through "
                               "ComfyUI's sampler_post_cfg_function hook (model_options); the "
                               "model did not call it")
        return torch.cat([self.uncond, out])


def _comfy_run(name: str, model_sampling, model, x, sigmas, extra_args, callback, disable,
               options: dict, levels=None, nfe=None):
    fname = f"sample_{name}"
    noise_sampler = options.pop("noise_sampler", None)
    sigmas = _check_call(fname, model, x, sigmas, extra_args, callback, noise_sampler)
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is not None and "noise_sampler" not in _cn.SAMPLERS[name][2]:
        raise TypeError(f"{fname}: ComfyUI's {fname} takes no noise_sampler (it draws no "
                        f"noise, or its churn noise with torch.randn_like)")
    opts = dict(_COMFY_DEFAULTS.get(name, {}))
    passed = {}
    for k, v in options.items():
        if k in _COMFY_ONLY.get(name, {}):
            default, why = _COMFY_ONLY[name][k]
            if v is not default and v != default:
                raise NotImplementedError(f"pyengine.sampling.{fname}: {k}={v!r}: {why}")
            continue
        if k in _COMFY_PASS.get(name, ()):
            passed[k] = v
            continue
        opts[_COMFY_RENAME.get(name, {}).get(k, k)] = v
    try:
        solver, opts = _cn.solver_for(name, **opts)
    except ValueError as exc:
        raise TypeError(f"{fname}: {exc}") from None
    opts.update(passed)
    if sigmas.numel() < 2:
        return x
    kind = _Kind(model_sampling)
    flow = kind.flow
    scale = float(getattr(model_sampling, "noise_scale", 1.0)) if model_sampling is not None \
        else 1.0
    if "s_noise" in _cn.SAMPLERS[name][2] and name not in _UNSCALED and \
            (flow or name not in _RF_SCALED) and scale != 1.0:
        opts["s_noise"] = float(opts.get("s_noise", 1.0)) * scale   # ComfyUI's default 1
    if nfe is not None:
        opts["nfe"] = nfe
    if solver == "sa_solver" and hasattr(model_sampling, "percent_to_sigma"):
        opts.update(_sa_interval(model_sampling, flow))
    # ComfyUI's levels as its loop sees them (offset_first_sigma_for_snr for the SNR samplers)
    lv = sigmas if levels is None else levels
    if flow and name in _cn.SNR_OFFSET and float(lv[0]) >= 1:
        lv = lv.clone()
        lv[0] = kind.percent_to_sigma(1e-4)
    lv64 = _grid(lv)
    grid = _cn.plan_sigmas("euler" if levels is not None else name, lv64, kind)
    guided = name.endswith("_cfg_pp")
    try:
        plan = _comfy_plan(name, solver, opts, grid, flow, lv64, guided)
    except (ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"{fname}: {exc}") from None

    noise, seed = None, 0
    every = x if name == "heunpp2" and plan.n_noise else None
    if isinstance(noise_sampler, PhiloxNoise):
        seed = noise_sampler.seed                      # the plan's own in-kernel draws
    elif plan.n_noise:
        if noise_sampler is None and "noise_sampler" in _cn.SAMPLERS[name][2]:
            noise_sampler = _comfy_default_noise(name, x, sigmas, extra_args.get("seed"))
        noise = _ComfyNoise(noise_sampler, lv, grid, flow,
                            _cn.NOISE_SAMPLER_ARGS.get(name) == "stage", every).source()

    def report(i, op, slots):
        hat = lv[i] if op.t == lv64[i] else torch.tensor(op.t, dtype=lv.dtype,
                                                         device=lv.device)
        den = slots[op.dst] if op.guidance is None else slots[op.dst + "/c"]
        callback({"x": slots[op.src], "i": i, "sigma": lv[i], "sigma_hat": hat,
                  "denoised": den})

    bar, on_eval = _per_step(plan, len(grid) - 1, disable, report if callback else None)

    if guided:
        fn = _CfgPPModel(model, extra_args)
        call_args = None
    else:
        def fn(xx, t, **kw):
            return model(xx, t.to(xx.dtype), **kw)
        call_args = extra_args
    be = backends.get(None, device=x.device, dtype=x.dtype)
    try:
        with torch.no_grad():
            return run_plan(plan, fn, x, seed=seed, backend=be, callback=on_eval,
                            extra_args=call_args, noise=noise, recycle=callback is None)
    finally:
        if bar is not None:
            bar.close()


_POSITIONAL = ("model", "x", "sigmas", "extra_args", "callback", "disable")


def _comfy_function(name: str):
    kd = globals().get(f"sample_{name}")       # today's k-diffusion function of that name
    solver, fixed, own = _cn.SAMPLERS[name]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, *args,
               **options):
        ms = _model_sampling(model)
        if ms is None and kd is not None:
            return kd(model, x, sigmas, extra_args, callback, disable, *args, **options)
        if args:
            if kd is None:
                raise TypeError(f"sample_{name}: options after 'disable' are keyword "
                                f"arguments, got {len(args)} positional")
            bound = inspect.signature(kd).bind(model, x, sigmas, extra_args, callback,
                                               disable, *args, **options).arguments
            options = {k: v for k, v in bound.items() if k not in _POSITIONAL}
        return _comfy_run(name, ms, model, x, sigmas, extra_args, callback, disable, options)

    sample.__name__ = sample.__qualname__ = f"sample_{name}"
    if kd is not None:
        sample.__signature__ = inspect.signature(kd)   # k-diffusion's, option defaults alike
    sample.__doc__ = (
        f"ComfyUI's ``sample_{name}`` on pyengine's fused plans (registry solver "
        f"``{solver}``{' with ' + str(fixed) if fixed else ''}); options: "
        f"{', '.join(own) or 'none'}. "
        + ("A model without ComfyUI's model_sampling runs pyengine's k-diffusion function "
           "of this name. " if kd is not None else "")
        + "See the module docstring.")
    return sample


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None,
                    disable=None, eta=0.0, s_noise=1.0, noise_sampler=None):
    """ComfyUI's / k-diffusion's ``sample_dpm_fast``: DPM-Solver-fast with ``n`` model calls
    over its lambda-uniform grid from ``sigma_max`` to ``sigma_min`` (registry ``dpm_fast``).
    The callback receives {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} per step."""
    from .solvers.comfy import dpm_fast_sigmas
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and \
            n > _registry.MAX_STEPS:
        raise ValueError(f"sample_dpm_fast: n (model evaluations) must be at most "
                         f"{_registry.MAX_STEPS} (pyengine.solvers.registry.MAX_STEPS), got {n}")
    levels = torch.as_tensor(dpm_fast_sigmas(float(sigma_min), float(sigma_max), n),
                             device=x.device)
    return _comfy_run("dpm_fast", _model_sampling(model), model, x, levels, extra_args,
                      callback, disable, dict(eta=eta, s_noise=s_noise,
                                              noise_sampler=noise_sampler),
                      levels=levels, nfe=int(n))


def _refused(name: str, why: str):
    def sample(model, x, *args, **kwargs):
        raise NotImplementedError(f"pyengine.sampling.sample_{name}: {why}")
    sample.__name__ = sample.__qualname__ = f"sample_{name}"
    sample.__doc__ = f"Not provided: {why}."
    return sample


COMFY_SAMPLERS: dict[str, str] = {}
for _name in _cn.SAMPLERS:
    if _name == "dpm_fast":
        COMFY_SAMPLERS[_name] = "dpm_fast"
        continue
    globals()[f"sample_{_name}"] = _comfy_function(_name)
    COMFY_SAMPLERS[_name] = _cn.SAMPLERS[_name][0]
sample_dpm_adaptive = _refused("dpm_adaptive", _cn.NOT_PROVIDED["dpm_adaptive"])
__all__ += [f"sample_{_n}" for _n in _cn.SAMPLERS if f"sample_{_n}" not in __all__]
__all__ += ["sample_dpm_adaptive", "COMFY_SAMPLERS", "comfy_default_noise_sampler",
            "comfy_sigmas", "split_sigmas", "split_sigmas_denoise", "flip_sigmas"]


# ---------------------------------------------------------------------------------------
# ComfyUI's sigma helpers
# ---------------------------------------------------------------------------------------


def comfy_sigmas(scheduler_name: str, model_sampling, steps: int, denoise: float = 1.0,
                 device="cpu"):
    """ComfyUI's BasicScheduler: the levels of ``scheduler_name`` (simple, normal, karras,
    ...) for ``steps`` steps of a :class:`pyengine.schedules.ModelSampling`, in the model's
    units (flow time t for flow models), ending in 0; ``denoise`` < 1 keeps the last steps."""
    if not (hasattr(model_sampling, "sigma_min") and hasattr(model_sampling, "sigma_max")):
        raise ValueError(f"model_sampling must be a pyengine.schedules.ModelSampling (e.g. "
                         f"schedules.model_sampling_for(process)), got "
                         f"{type(model_sampling).__name__}")
    return _as_tensor(_cn.scheduler_sigmas(scheduler_name, model_sampling, steps, denoise),
                      device)


def _like(s: np.ndarray, ref) -> torch.Tensor:
    if isinstance(ref, torch.Tensor):
        return torch.tensor(s, dtype=ref.dtype, device=ref.device)
    return _as_tensor(s, "cpu")


def split_sigmas(sigmas, step: int):
    """ComfyUI's SplitSigmas: (sigmas[:step + 1], sigmas[step:])."""
    hi, lo = _sched.split_at(sigmas, step)
    return _like(hi, sigmas), _like(lo, sigmas)


def split_sigmas_denoise(sigmas, denoise: float):
    """ComfyUI's SplitSigmasDenoise: (high, low), low the last round(steps * denoise) steps."""
    hi, lo = _sched.split_denoise(sigmas, denoise)
    return _like(hi, sigmas), _like(lo, sigmas)


def flip_sigmas(sigmas, first: float = 1e-4):
    """ComfyUI's FlipSigmas: the list reversed, a leading 0 replaced by ``first``."""
    return _like(_sched.flip(sigmas, first), sigmas)
