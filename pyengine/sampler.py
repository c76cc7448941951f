"""The user-facing Sampler: (process, solver, schedule, prediction) -> a compiled Plan."""

from __future__ import annotations

import numpy as np
import torch

from . import schedules as sched
from .parameterization import Denoiser, check_prediction
from .plan import Plan, PlanBuilder
from .processes import Process
from .runtime import run_plan
from .solvers import registry

__all__ = ["Sampler", "build_plan"]


def build_plan(process: Process, solver: str, sigmas, prediction: str = "epsilon", *,
               timesteps=None, **options) -> Plan:
    """Compile ``solver`` over the grid ``sigmas`` into a Plan (float64 coefficients)."""
    info = registry.get(solver)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise ValueError(f"solver {solver!r} has no option {unknown[0]!r} (it accepts: {accepted})")
    opts = {**info.defaults, **options}
    sig = sched.validate(sigmas, increasing=info.family == "inversion")
    b = PlanBuilder(process, sig, prediction, solver=solver, timesteps=timesteps)
    info.build(b, **opts)
    return b.finish()


class Sampler:
    """Turns noise into samples with one solver, schedule and step count.

    >>> proc = pe.processes.VP.discrete("linear")
    >>> sampler = pe.Sampler(proc, solver="dpmpp_2m", steps=20, schedule="karras")
    >>> x0 = sampler.sample(model, torch.randn(4, 3, 32, 32), seed=0)

    ``sigmas=[...]`` gives the grid explicitly instead of ``steps``/``schedule``. ``to_zero``
    (default True) appends the final step to sigma 0; ``to_zero=False`` stops at the last
    positive level. ``init_noise_scale`` overrides the factor that turns standard-normal
    noise into the first state (default: the process's prior std at the first level).
    ``timesteps`` gives the model's time values at the grid's levels explicitly (else the
    process's ``model_time``), as ``from_diffusers`` does to reproduce a scheduler exactly.
    Solver options (``eta``, ``s_churn``, ``lower_order_final``, ...) are keyword arguments.
    For an inversion solver (``ddim_inverse``) the grid runs upward and ``sample`` takes data.
    """

    def __init__(self, process: Process, solver: str = "dpmpp_2m", steps: int | None = None, *,
                 schedule: str = "karras", prediction: str = "epsilon", sigmas=None,
                 to_zero: bool = True, schedule_options: dict | None = None,
                 init_noise_scale: float | None = None, backend: str | None = None,
                 timesteps=None, **options):
        if not isinstance(process, Process):
            raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                            f"{type(process).__name__}")
        self.process = process
        self.info = registry.get(solver)
        self.prediction = check_prediction(prediction)
        inverse = self.info.family == "inversion"
        if sigmas is not None:
            sig = sched.validate(sigmas, increasing=inverse)
            if steps is not None and steps != len(sig) - 1:
                raise ValueError(f"steps={steps} disagrees with len(sigmas) - 1 = {len(sig) - 1}")
        else:
            if steps is None:
                raise ValueError("give steps= (with schedule=) or sigmas=")
            if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
                raise ValueError(f"steps must be a positive integer, got {steps!r}")
            sig = sched.get_sigmas(schedule, process, int(steps),
                                   append_zero=to_zero and not inverse,
                                   **(schedule_options or {}))
            if inverse:
                sig = sig[::-1].copy()
        self.sigmas = sig
        self.schedule = schedule if sigmas is None else "custom"
        self.options = options
        self.backend = backend
        self.timesteps = timesteps
        self.plan = build_plan(process, solver, sig, self.prediction, timesteps=timesteps,
                               **options)
        if init_noise_scale is None:
            init_noise_scale = 1.0 if inverse else float(process.prior_std(sig[0]))
        self.init_noise_scale = float(init_noise_scale)

    @property
    def solver(self) -> str:
        return self.info.name

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def nfe(self) -> int:
        return self.plan.nfe

    def sample(self, model, noise: torch.Tensor, seed=0, *, generator=None, callback=None,
               extra_args: dict | None = None, backend: str | None = None,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Run the plan from standard-normal ``noise`` (scaled here to the first level).

        Returns the final state in the process's own space (x0 when the grid ends at 0).
        ``seed``: int for the batch (sample i uses the key (seed, i)) or per-sample seeds;
        ``generator``: draw noise with torch.randn in diffusers' order instead.
        """
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if not noise.is_floating_point() or noise.dim() < 1 or noise.shape[0] < 1:
            raise ValueError(f"noise must be a floating tensor [B, ...] with B >= 1, got "
                             f"dtype {noise.dtype} shape {tuple(noise.shape)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator")
        if isinstance(model, Denoiser) and self.prediction != "sample":
            raise ValueError(f"model is a pe.Denoiser (it returns x0), but the sampler was built "
                             f"with prediction={self.prediction!r}; use prediction='sample'")
        x = noise * self.init_noise_scale if self.init_noise_scale != 1.0 else noise
        return run_plan(self.plan, model, x, seed=seed, generator=generator,
                        backend=backend or self.backend, compute_dtype=compute_dtype,
                        callback=callback, extra_args=extra_args)

    def __repr__(self) -> str:
        return (f"Sampler({self.process!r}, solver={self.solver!r}, steps={self.steps}, "
                f"schedule={self.schedule!r}, prediction={self.prediction!r}, nfe={self.nfe})")
