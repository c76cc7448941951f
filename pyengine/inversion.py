"""PF-ODE inversion: data to noise with any deterministic solver (DDIM inversion, Song et al.
2021 sec. 4.3, generalized).

The probability-flow ODE d x_hat / d sigma = (x_hat - D(x_hat; sigma)) / sigma is reversible,
so the solvers' updates, written in sigma or lambda = -log sigma, integrate it upward as well
as downward: a plan is built over an increasing grid sigma_min = sigma_0 < ... < sigma_N =
sigma_max and run from the data. Euler upward is DDIM inversion, x_hat' = D + sigma' eps;
the exponential integrators (DPM-Solver, DPM-Solver++, UniPC) take steps of negative h, and
their Taylor expansions in h keep their order. Measured against the exact reverse ODE of the
Gaussian mixture (tests/test_inversion.py): every deterministic configuration in the
registry, 36 of them, inverts at its declared order (fitted slopes within 0.15).

Solvers that cannot invert are refused with the reason: those whose plan draws noise
(ancestral, SDE, DDIM with eta > 0, EDM churn) and those with a data-dependent custom op.
A grid with a 0 cannot be inverted by these solvers: the step from sigma 0 has h = -inf.

Conventions (the same as :class:`pyengine.Sampler`, so the two are inverse to each other):

* ``data`` is the state at the grid's first level sigma_min in the process's own space,
  x = s(sigma_min) * x_hat, which is what ``Sampler(..., to_zero=False).sample`` returns. For
  clean data x0 pass ``x0 * process.s_of_sigma(sigma_min)`` (1 for VE, EDM; 1 - O(sigma^2)
  for VP);
* the returned latent is the state at sigma_max divided by the init noise scale
  (``process.prior_std(sigma_max)``, overridable), i.e. the standard-normal ``noise`` that
  ``Sampler(process, solver, steps=N, schedule=..., to_zero=False).sample(model, noise)``
  turns back into the data, up to the two solvers' discretization errors.
  :meth:`Inverter.sampler` builds that Sampler.
"""

from __future__ import annotations

import numpy as np
import torch

from . import backends
from . import schedules as sched
from .errors import check_tensor
from .parameterization import Denoiser, check_prediction
from .plan import Custom, Plan, PlanBuilder
from .processes import EDM, Process
from .runtime import run_plan
from .sampler import Sampler, run_builder
from .solvers import registry

__all__ = ["Inverter", "inversion_plan", "invert", "invertible_solvers"]

# Schedules whose builders take a sigma range (the VP spacings and time_uniform do not).
_RANGED = ("karras", "exponential", "logsnr", "polyexponential")


def _noise_reason(info, process, sig_down, prediction, options) -> str | None:
    """Why ``info`` with ``options`` is no ODE solver (None when its plan is deterministic).

    Judged on the downward grid, where every solver's plan is well defined: an ancestral or
    churn step built upward takes the square root of a negative variance."""
    b = PlanBuilder(process, sig_down, prediction, solver=info.name)
    run_builder(info, b, {**info.defaults, **options}, options)
    custom = [op for op in b.plan.ops if isinstance(op, Custom)]
    if b.plan.n_noise:
        return "its plan draws noise"
    if custom:
        return f"its plan has a data-dependent op ({custom[0]!r})"
    return None


def inversion_plan(process: Process, solver: str, sigmas, prediction: str = "epsilon", *,
                   timesteps=None, **options) -> Plan:
    """Compile a deterministic ``solver`` over the increasing, positive grid ``sigmas``.

    Raises ValueError when the solver cannot invert: its plan draws noise or holds a custom
    op (stochastic solvers, and deterministic ones configured with noise: eta > 0, s_churn > 0).
    """
    info = registry.get(solver)
    full = registry.check_options(info, options)     # names and values, in one place
    options = {k: full[k] for k in options}
    if timesteps is not None:
        timesteps = registry.check_timesteps(timesteps)
    sig = sched.validate(sigmas, increasing=True)
    if len(sig) - 1 > registry.MAX_STEPS:
        raise ValueError(f"sigmas has {len(sig) - 1} steps; at most {registry.MAX_STEPS} "
                         f"(pyengine.solvers.registry.MAX_STEPS)")
    if sig[0] <= 0:
        raise ValueError("sigmas for inversion must be positive: the step out of sigma 0 has "
                         "h = log(sigma_0 / sigma_1) = -inf (start at a small sigma_min > 0)")
    prediction = check_prediction(prediction)
    why = _noise_reason(info, process, sig[::-1].copy(), prediction, options)
    if why is not None:
        quiet = {k: 0.0 for k in ("eta", "s_churn") if k in info.options}
        hint = "; it is a stochastic solver" if info.stochastic else " with these options"
        if quiet and _noise_reason(info, process, sig[::-1].copy(), prediction,
                                   {**options, **quiet}) is None:
            hint += " (with " + ", ".join(f"{k}=0" for k in quiet) + " it inverts)"
        raise ValueError(f"solver {solver!r} cannot invert: {why}{hint}. PF-ODE inversion "
                         f"needs a deterministic plan; solvers that invert: "
                         f"{', '.join(invertible_solvers())}")
    b = PlanBuilder(process, sig, prediction, solver=solver, timesteps=timesteps)
    run_builder(info, b, {**info.defaults, **options}, options)
    return b.finish()


def invertible_solvers() -> list[str]:
    """The registered solvers whose default configuration inverts (a deterministic plan).

    Measured: each one's inversion converges to the exact reverse PF-ODE at its declared
    order (tests/test_inversion.py)."""
    grid = np.array([3.0, 1.0, 0.3, 0.1])
    return [info.name for info in registry.list_solvers()
            if _noise_reason(info, _PROBE_PROCESS, grid, "sample", {}) is None]


# Any process serves to inspect a plan's ops (s = 1 and time = sigma keep it simple).
_PROBE_PROCESS = EDM()


def _grid(process, steps, schedule, sigmas, sigma_min, sigma_max, schedule_options):
    """The increasing inversion grid."""
    if schedule_options is not None and not isinstance(schedule_options, dict):
        raise ValueError(f"schedule_options must be a dict of the schedule's keyword "
                         f"arguments, got {type(schedule_options).__name__}")
    opts = dict(schedule_options or {})
    if sigmas is not None:
        if steps is not None and steps != len(sigmas) - 1:
            raise ValueError(f"steps={steps} disagrees with len(sigmas) - 1 = {len(sigmas) - 1}")
        if sigma_min is not None or sigma_max is not None:
            raise ValueError("give sigmas= or sigma_min=/sigma_max=, not both")
        s = np.asarray(sigmas, dtype=np.float64)
        if s.ndim == 1 and s.size >= 2 and s[0] > s[-1]:
            s = s[::-1].copy()            # a sampler's (decreasing) grid, walked upward
        return sched.validate(s, increasing=True)
    if steps is None:
        raise ValueError("give steps= (with schedule=) or sigmas=")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    registry.check_scalar("steps", steps)           # at most MAX_STEPS, before numpy
    for key, val in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if val is None:
            continue
        if schedule not in _RANGED:
            raise ValueError(f"{key}= needs a schedule that takes a sigma range "
                             f"({', '.join(_RANGED)}); schedule {schedule!r} does not")
        opts[key] = registry.Option("real").check(key, val)
    down = sched.get_sigmas(schedule, process, int(steps), append_zero=False, **opts)
    return down[::-1].copy()


class Inverter:
    """Data to noise along the PF-ODE with one deterministic solver, schedule and step count.

    >>> inv = pe.Inverter(proc, solver="dpmpp_2m", steps=20, schedule="karras")
    >>> noise = inv.invert(model, x)                 # x: the state at sigma_min
    >>> x_back = inv.sampler().sample(model, noise)  # == x up to discretization error

    The grid is the one ``Sampler(process, solver, steps, schedule=..., to_zero=False)``
    walks, reversed (``sigma_min``/``sigma_max`` narrow it); ``sigmas=`` gives it
    explicitly (increasing, or a decreasing sampler grid, which is reversed; no 0).
    See the module docstring for the data and latent conventions.
    """

    def __init__(self, process: Process, solver: str = "euler", steps: int | None = None, *,
                 schedule: str = "karras", prediction: str = "epsilon", sigmas=None,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 schedule_options: dict | None = None, init_noise_scale: float | None = None,
                 backend: str | None = None, timesteps=None, **options):
        if not isinstance(process, Process):
            raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                            f"{type(process).__name__}")
        self.process = process
        self.info = registry.get(solver)
        self.prediction = check_prediction(prediction)
        self.sigmas = _grid(process, steps, schedule, sigmas, sigma_min, sigma_max,
                            schedule_options)
        self.schedule = schedule if sigmas is None else "custom"
        self.options = options
        self.backend = backend
        self.timesteps = timesteps
        self.plan = inversion_plan(process, solver, self.sigmas, self.prediction,
                                   timesteps=timesteps, **options)
        if init_noise_scale is None:
            init_noise_scale = float(process.prior_std(self.sigmas[-1]))
        self.init_noise_scale = registry.check_scalar("init_noise_scale", init_noise_scale)

    @property
    def solver(self) -> str:
        return self.info.name

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def nfe(self) -> int:
        return self.plan.nfe

    def invert(self, model, data: torch.Tensor, *, callback=None, extra_args: dict | None = None,
               backend: str | None = None, compute_dtype: torch.dtype | None = None
               ) -> torch.Tensor:
        """The latent (standard-normal convention) of ``data`` (the state at sigma_min)."""
        check_tensor("data", data)
        if isinstance(model, Denoiser) and self.prediction != "sample":
            raise ValueError(f"model is a pe.Denoiser (it returns x0), but the inverter was "
                             f"built with prediction={self.prediction!r}; use "
                             f"prediction='sample'")
        # The default backend for the data's device (run_plan's default is the CPU one).
        be = backend or self.backend or backends.get(None, device=data.device,
                                                     dtype=data.dtype)
        x = run_plan(self.plan, model, data, seed=0, backend=be, compute_dtype=compute_dtype,
                     callback=callback, extra_args=extra_args)
        return x / self.init_noise_scale if self.init_noise_scale != 1.0 else x

    def sampler(self, solver: str | None = None, **options) -> Sampler:
        """The Sampler that maps this inverter's latents back: the reversed grid, the same
        init noise scale and prediction; by default the same solver and options."""
        if solver is None:
            solver, options = self.solver, {**self.options, **options}
        if self.info.family == "inversion" and solver == self.solver:
            raise ValueError(f"{self.solver!r} only runs upward; name the sampling solver "
                             f"(sampler(solver='ddim'))")
        return Sampler(self.process, solver, sigmas=self.sigmas[::-1].copy(),
                       prediction=self.prediction, init_noise_scale=self.init_noise_scale,
                       backend=self.backend,
                       timesteps=None if self.timesteps is None else self.timesteps[::-1],
                       **options)

    def __repr__(self) -> str:
        return (f"Inverter({self.process!r}, solver={self.solver!r}, steps={self.steps}, "
                f"schedule={self.schedule!r}, prediction={self.prediction!r}, nfe={self.nfe})")


def invert(process: Process, model, data: torch.Tensor, solver: str = "euler",
           steps: int | None = None, *, schedule: str = "karras", prediction: str = "epsilon",
           sigmas=None, sigma_min: float | None = None, sigma_max: float | None = None,
           schedule_options: dict | None = None, init_noise_scale: float | None = None,
           backend: str | None = None, timesteps=None, extra_args: dict | None = None,
           callback=None, compute_dtype: torch.dtype | None = None, **options) -> torch.Tensor:
    """PF-ODE inversion of ``data`` (the state at sigma_min, process space) to the
    standard-normal latent that ``Sampler(process, solver, steps, schedule=schedule,
    to_zero=False)`` maps back to it. One call of :class:`Inverter` (which see)."""
    inv = Inverter(process, solver, steps, schedule=schedule, prediction=prediction,
                   sigmas=sigmas, sigma_min=sigma_min, sigma_max=sigma_max,
                   schedule_options=schedule_options, init_noise_scale=init_noise_scale,
                   backend=backend, timesteps=timesteps, **options)
    return inv.invert(model, data, callback=callback, extra_args=extra_args,
                      compute_dtype=compute_dtype)
