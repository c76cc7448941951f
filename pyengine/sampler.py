"""The user-facing Sampler: (process, solver, schedule, prediction) -> a compiled Plan."""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings

import numpy as np
import torch

from . import schedules as sched
from .errors import check_callable, check_tensor
from .parameterization import Denoiser, check_prediction
from .plan import Custom, Eval, GuidanceRescale, Plan, PlanBuilder, Update
from .processes import Process
from .runtime import CompiledLoop, compile_plan, run_plan
from .runtime.transforms import img2img_state
from .solvers import registry

__all__ = ["Sampler", "build_plan", "plan_suffix"]


def build_plan(process: Process, solver: str, sigmas, prediction: str = "epsilon", *,
               timesteps=None, guidance_scale: float | None = None,
               guidance_rescale: float = 0.0, **options) -> Plan:
    """Compile ``solver`` over the grid ``sigmas`` into a Plan (float64 coefficients).

    ``guidance_scale=w`` folds classifier-free guidance into the plan (see :class:`Sampler`)."""
    if not isinstance(process, Process):
        raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                        f"{type(process).__name__}")
    info = registry.get(solver)
    opts = registry.check_options(info, options)      # every option's type and range
    if guidance_scale is not None:
        guidance_scale = registry.check_scalar("guidance_scale", guidance_scale)
    guidance_rescale = registry.check_scalar("guidance_rescale", guidance_rescale or 0.0)
    if timesteps is not None:
        timesteps = registry.check_timesteps(timesteps)
    sig = sched.validate(sigmas, increasing=info.family == "inversion")
    if len(sig) - 1 > registry.MAX_STEPS:
        raise ValueError(f"sigmas has {len(sig) - 1} steps; at most {registry.MAX_STEPS} "
                         f"(pyengine.solvers.registry.MAX_STEPS)")
    b = PlanBuilder(process, sig, prediction, solver=solver, timesteps=timesteps,
                    guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    run_builder(info, b, opts, options)
    return b.finish()


def run_builder(info, builder, opts: dict, given: dict) -> None:
    """``info.build(builder, **opts)``; arithmetic failures of the solver's host code (an
    option value far outside its range: a math domain error, an overflow, a coefficient
    that is not finite or beyond float32) raise ValueError naming the ``given`` options."""
    try:
        info.build(builder, **opts)
    except (ArithmeticError, ValueError) as exc:
        if not isinstance(exc, ArithmeticError) and str(exc) != "math domain error":
            raise
        named = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(f"solver {info.name!r}: "
                         f"{'its options ' + named if named else 'this grid'} give "
                         f"coefficients that are not finite or overflow float32 "
                         f"({type(exc).__name__}: {exc}); use values in the usual range"
                         ) from None


def _check_backend(backend) -> None:
    """A backend argument: None, a registry name or a backend module; ValueError else."""
    if backend is None or hasattr(backend, "fused_update"):
        return
    from .backends import dispatch
    if not isinstance(backend, str) or backend not in dispatch.REGISTRY:
        raise ValueError(f"backend must be one of {sorted(dispatch.REGISTRY)} (or None: the "
                         f"best available), got {backend!r}")


def _no_rebuild(builder, **options):
    raise ValueError("a tuned plan is a fixed table: it cannot be rebuilt over another grid")


def _reads_writes(op) -> tuple[list, list]:
    if isinstance(op, Eval):
        return [op.src], ([op.dst] if op.guidance is None else [op.dst + "/u", op.dst + "/c"])
    if isinstance(op, Update):
        return list(op.bufs), [op.dst] + ([op.aux_dst] if op.aux_dst is not None else [])
    return list(op.reads), list(op.writes)


def plan_suffix(plan: Plan, start: int) -> Plan:
    """The ops of ``plan``'s steps ``start``.. as a plan run from the state at
    ``plan.sigmas[start]`` (img2img on a plan that cannot be rebuilt, a tuned one).

    Defined where that state is all the suffix reads: the last update of the state ``x``
    before the cut writes it at level ``sigmas[start]`` and no op from the cut on reads a
    buffer written before it. Raises ValueError saying why otherwise (a multistep plan reads
    earlier steps' model outputs). Steps are renumbered from the new first level; draw
    numbers are kept (a step draws the noise it draws in the whole plan)."""
    n = len(plan.sigmas) - 1
    if not 0 <= start < n:
        raise ValueError(f"start level {start} is not a step of the plan's {n} steps")
    if start == 0:
        return plan
    cut = next((j for j, op in enumerate(plan.ops) if op.step >= start), len(plan.ops))
    ops = plan.ops[cut:]
    sig0 = float(plan.sigmas[start])
    why = None
    if not ops or any(op.step < start for op in ops):
        why = f"its ops are not ordered by step around step {start}"
    else:
        last = next((op for op in reversed(plan.ops[:cut])
                     if isinstance(op, Update) and op.dst == "x"), None)
        if last is None or not last.sigma == sig0:
            why = (f"its state before step {start} is not written at that level "
                   f"(sigma {sig0:.6g})")
        written = {"x"}
        for op in ops:
            if why is not None:
                break
            reads, writes = _reads_writes(op)
            missing = [b for b in reads if b not in written]
            if missing:
                why = (f"step {op.step} reads {missing[0]!r}, written by an earlier step (a "
                       f"multistep history that a run started at level {start} does not "
                       f"have)")
            written.update(writes)
    if why is not None:
        raise ValueError(f"img2img (strength / start_sigma) cannot start plan "
                         f"{plan.solver!r} at level {start}: {why}; start at level 0, or use "
                         f"a plan that can be rebuilt over the truncated grid")
    moved = []
    for op in ops:                                   # steps counted from the new first level
        if dataclasses.is_dataclass(op):
            op = dataclasses.replace(op, step=op.step - start)
        else:
            op = copy.copy(op)
            op.step -= start
        moved.append(op)
    return Plan(solver=plan.solver, sigmas=np.asarray(plan.sigmas[start:], dtype=np.float64),
                ops=moved, n_noise=plan.n_noise, output=plan.output,
                guidance_scale=plan.guidance_scale)


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

    **Classifier-free guidance.** ``guidance_scale=w`` (here, or per call in ``sample``) calls
    the model once per evaluation on the doubled batch ``cat([x, x])``, unconditional half
    first and conditional half second (diffusers' order), and combines
    D = D_u + w (D_c - D_u) inside the fused update's coefficients (no extra kernel, no extra
    pass). The conditioning is the caller's: every ``extra_args`` entry is passed unchanged to
    that doubled call, so batched conditioning has batch 2B in the same order, e.g.
    ``extra_args={"context": torch.cat([uncond, cond])}``. The result has batch B. w = 1 is
    the conditional model alone (the doubled call is still made). ``guidance_rescale=phi``
    adds the rescale of Lin et al. 2024 (eq. 16, diffusers' ``rescale_noise_cfg`` on the raw
    model output); it depends on the data (per-sample stds), so it cannot fold into the
    coefficients and runs as a custom op, one extra pass per evaluation (only when phi > 0).

    **img2img / partial denoising.** ``sample(model, noise, init=x0, strength=s)`` starts
    from the data ``x0`` noised to a level of the grid: as in diffusers' img2img pipelines the
    first ``steps - int(steps * s)`` steps are skipped (strength 1 runs the whole grid,
    strength 0.5 of 50 steps the last 25). ``start_sigma=sigma`` instead starts at the first
    grid level at or below ``sigma``. The initial state is s(sigma_0) (x0 + sigma_0 * noise)
    with the caller's standard-normal ``noise``; the plan is compiled over the truncated grid,
    so multistep solvers warm up again from there.

    **Inpainting.** ``sample(model, noise, init=x0, mask=m)`` (optionally with ``strength``)
    keeps the known region of ``x0`` where ``m`` is 0 and generates where it is 1 (diffusers'
    convention; ``m`` broadcasts to the state, e.g. [B, 1, H, W], and may be soft). Every
    state the plan writes, at its noise level sigma with scale s, becomes
    m * state + (1 - m) * s (x0 + sigma * noise) -- the known region re-noised to that level
    with the caller's ``noise`` (the noise of the initial state, as diffusers' inpainting
    pipelines do), and x0 itself at sigma 0. The mask is one more buffer of the fused update:
    no extra pass. Intermediate states (Heun's predictor, DPM-Solver's midpoints) are blended
    too, at their own levels. Not for solvers with custom ops that write the state
    (pc_langevin).
    """

    def __init__(self, process: Process, solver: str = "dpmpp_2m", steps: int | None = None, *,
                 schedule: str = "karras", prediction: str = "epsilon", sigmas=None,
                 to_zero: bool = True, schedule_options: dict | None = None,
                 init_noise_scale: float | None = None, backend: str | None = None,
                 timesteps=None, guidance_scale: float | None = None,
                 guidance_rescale: float = 0.0, **options):
        if not isinstance(process, Process):
            raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                            f"{type(process).__name__}")
        self.process = process
        self.info = registry.get(solver)
        if init_noise_scale is not None:
            init_noise_scale = registry.check_scalar("init_noise_scale", init_noise_scale)
        if guidance_scale is not None:
            guidance_scale = registry.check_scalar("guidance_scale", guidance_scale)
        guidance_rescale = registry.check_scalar("guidance_rescale", guidance_rescale or 0.0)
        to_zero = registry.Option("bool").check("to_zero", to_zero)
        _check_backend(backend)
        if schedule_options is not None and not isinstance(schedule_options, dict):
            raise ValueError(f"schedule_options must be a dict of the schedule's keyword "
                             f"arguments, got {type(schedule_options).__name__}")
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
            registry.check_scalar("steps", steps)           # at most MAX_STEPS, before numpy
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
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale or 0.0)
        self.plan = build_plan(process, solver, sig, self.prediction, timesteps=timesteps,
                               guidance_scale=self.guidance_scale,
                               guidance_rescale=self.guidance_rescale, **options)
        self._plans = {}
        self.tuned = None                 # the TunedPlanFile of Sampler.from_tuned
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

    def start_index(self, strength: float | None = None, start_sigma: float | None = None) -> int:
        """The grid index img2img starts at (see the class docstring)."""
        if strength is not None and start_sigma is not None:
            raise ValueError("give strength= or start_sigma=, not both")
        n = self.steps
        if strength is not None:
            strength = registry.check_scalar("strength", strength)
            # diffusers: init_timestep = min(int(steps * strength), steps); t_start = steps - it
            k = n - min(int(n * strength), n)
        elif start_sigma is not None:
            start_sigma = registry.check_scalar("start_sigma", start_sigma)
            below = np.nonzero(self.sigmas <= start_sigma)[0]
            k = int(below[0]) if below.size else n
        else:
            return 0
        if k >= n:
            raise ValueError(f"strength/start_sigma leaves no step to run out of {n} "
                             f"(start level {k})")
        return k

    def plan_for(self, start: int = 0, guidance_scale: float | None = None,
                 guidance_rescale: float = 0.0) -> Plan:
        """The plan over the grid from level ``start`` (cached), optionally with guidance."""
        start = registry.Option("int", lo=0, hi=self.steps - 1).check("start", start)
        key = (int(start), None if guidance_scale is None else float(guidance_scale),
               float(guidance_rescale or 0.0))
        if key == (0, self.guidance_scale, self.guidance_rescale):
            return self.plan
        if getattr(self, "tuned", None) is not None:
            return self._tuned_plan_for(*key)
        if key not in self._plans:
            ts = self.timesteps
            if ts is not None:
                ts = np.asarray(ts, dtype=np.float64).reshape(-1)[start:]
            self._plans[key] = build_plan(self.process, self.solver, self.sigmas[start:],
                                          self.prediction, timesteps=ts,
                                          guidance_scale=key[1], guidance_rescale=key[2],
                                          **self.options)
        return self._plans[key]

    def _guidance(self, guidance_scale, guidance_rescale) -> tuple:
        """(w, phi) of a call: the sampler's unless overridden (``...``: not given)."""
        w = self.guidance_scale if guidance_scale is ... else guidance_scale
        if w is not None and guidance_scale is not ...:
            w = registry.check_scalar("guidance_scale", w)
        phi = self.guidance_rescale if guidance_rescale is ... else \
            registry.check_scalar("guidance_rescale", guidance_rescale or 0.0)
        if w is None and guidance_rescale is ...:
            phi = 0.0
        return w, phi

    def start(self, noise: torch.Tensor, *, guidance_scale=..., guidance_rescale=...,
              init=None, strength: float | None = None, start_sigma: float | None = None):
        """(plan, initial state) for a run from standard-normal ``noise``: the whole grid, or
        img2img from ``init`` at ``strength``/``start_sigma`` (what ``sample`` runs)."""
        w, phi = self._guidance(guidance_scale, guidance_rescale)
        if init is None:
            if strength is not None or start_sigma is not None:
                raise ValueError("strength/start_sigma need init= (the data to start from)")
            plan = self.plan_for(0, w, phi)
            x = noise * self.init_noise_scale if self.init_noise_scale != 1.0 else noise
        else:
            if self.info.family == "inversion":
                raise ValueError("init= (img2img) does not apply to an inversion solver")
            if not isinstance(init, torch.Tensor) or init.shape != noise.shape:
                raise ValueError(f"init must be a tensor of the noise's shape "
                                 f"{tuple(noise.shape)}")
            check_tensor("init", init, device=noise.device)
            k = self.start_index(1.0 if strength is None and start_sigma is None else strength,
                                 start_sigma)
            plan = self.plan_for(k, w, phi)
            sig0 = float(self.sigmas[k])
            x = img2img_state(init, noise, sig0, float(self.process.s_of_sigma(sig0)))
        return plan, x

    def sample(self, model, noise: torch.Tensor, seed=0, *, generator=None, callback=None,
               extra_args: dict | None = None, backend: str | None = None,
               compute_dtype: torch.dtype | None = None, guidance_scale=...,
               guidance_rescale=..., init=None,
               strength: float | None = None, start_sigma: float | None = None,
               mask=None) -> torch.Tensor:
        """Run the plan from standard-normal ``noise`` (scaled here to the first level).

        Returns the final state in the process's own space (x0 when the grid ends at 0).
        ``seed``: int for the batch (sample i uses the key (seed, i)) or per-sample seeds;
        ``generator``: draw noise with torch.randn in diffusers' order instead.
        ``guidance_scale`` / ``guidance_rescale`` override the sampler's (guidance_scale=None:
        unguided); ``init`` with
        ``strength`` or ``start_sigma``: img2img (see the class docstring); ``init`` with
        ``mask``: inpainting (see the class docstring).
        """
        check_tensor("noise", noise)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator")
        if callback is not None:
            check_callable("callback", callback, "callback(step, sigma, slots)")
        _check_backend(backend)
        if isinstance(model, Denoiser) and self.prediction != "sample":
            raise ValueError(f"model is a pe.Denoiser (it returns x0), but the sampler was built "
                             f"with prediction={self.prediction!r}; use prediction='sample'")
        if mask is not None and init is None:
            raise ValueError("mask= (inpainting) needs init= (the image whose known region is "
                             "kept)")
        plan, x = self.start(noise, guidance_scale=guidance_scale,
                             guidance_rescale=guidance_rescale, init=init, strength=strength,
                             start_sigma=start_sigma)
        inpaint = {} if mask is None else {"mask": mask, "known": init, "known_noise": noise}
        return run_plan(plan, model, x, seed=seed, generator=generator,
                        backend=backend or self.backend, compute_dtype=compute_dtype,
                        callback=callback, extra_args=extra_args, **inpaint)

    def compile(self, model, shape, dtype: torch.dtype = torch.float32, device=None, *,
                backend: str | None = None, capture: bool | None = None, guidance_scale=...,
                guidance_rescale=..., extra_args: dict | None = None,
                compute_dtype: torch.dtype | None = None, warmup: int = 2,
                cache=None, init=None, strength: float | None = None,
                start_sigma: float | None = None, mask=None) -> CompiledLoop:
        """The whole sampling loop for batches of ``shape``, device-resident and (on CUDA)
        captured in one CUDA graph: returns a callable ``fn(noise, seed=0, extra_args=None,
        init=None, mask=None)``.

        >>> fn = sampler.compile(unet, (1, 4, 64, 64), torch.float16, "cuda")
        >>> x0 = fn(torch.randn(1, 4, 64, 64, dtype=torch.float16, device="cuda"), seed=3)

        The plan's coefficients, the model's times and the per-sample seeds live in device
        memory and nothing in the loop reads a device value back, so the loop never waits on
        the host. ``capture`` (default: True on CUDA, False elsewhere) captures model calls
        and fused updates of every step into one graph on the first call (after ``warmup``
        eager runs on a side stream, where autotuning happens); later calls copy the new
        noise, seeds and tensor ``extra_args`` into the static buffers and replay it. A model
        that cannot be captured (host synchronization, data-dependent control flow) runs the
        same loop eagerly after one warning that says why (``fn.fallback_reason``). Compiled
        loops are cached (``pe.runtime.graph_cache``, LRU, ``$PYENGINE_GRAPH_CACHE`` entries)
        by model, shape, dtype, device, backend and plan structure: a sampler with another
        schedule of the same length, or another guidance scale, reuses the captured graph and
        only rewrites its coefficient table. Non-tensor ``extra_args`` are baked in; tensor
        ``extra_args`` given to a call replace the compiled ones for that call only.

        img2img and inpainting as in :meth:`sample`: ``init=`` with ``strength=`` /
        ``start_sigma=`` fixes where the loop starts (the plan's structure); ``mask=`` makes
        it an inpainting loop. ``init`` and ``mask`` given here are the defaults of every
        call; ``fn(noise, seed, init=..., mask=...)`` replaces them per call.
        The result equals ``sample(...)`` with the same arguments up to the rounding of the
        per-sample coefficient tables (bitwise on the CPU backends).
        """
        from .runtime.transforms import inpaint
        _check_backend(backend)
        if isinstance(model, Denoiser) and self.prediction != "sample":
            raise ValueError(f"model is a pe.Denoiser (it returns x0), but the sampler was built "
                             f"with prediction={self.prediction!r}; use prediction='sample'")
        w, phi = self._guidance(guidance_scale, guidance_rescale)
        if mask is not None and init is None:
            raise ValueError("mask= (inpainting) needs init= (the image whose known region is "
                             "kept)")
        if init is None and (strength is not None or start_sigma is not None):
            raise ValueError("strength/start_sigma need init= (the data to start from)")
        start = ("noise", None)
        k = 0
        if init is not None:
            if self.info.family == "inversion":
                raise ValueError("init= (img2img) does not apply to an inversion solver")
            k = self.start_index(1.0 if strength is None and start_sigma is None else strength,
                                 start_sigma)
            sig0 = float(self.sigmas[k])
            start = ("init", (sig0, float(self.process.s_of_sigma(sig0))))
        plan = self.plan_for(k, w, phi)
        if mask is not None:
            plan = inpaint(plan)
        return compile_plan(plan, model, shape, dtype, device,
                            init_noise_scale=self.init_noise_scale,
                            backend=backend or self.backend, capture=capture,
                            extra_args=extra_args, compute_dtype=compute_dtype, warmup=warmup,
                            cache=cache, start=start, init=init, mask=mask)

    # -- tuned plans --------------------------------------------------------------------
    @classmethod
    def from_tuned(cls, plan, process: Process, *, prediction: str | None = None,
                   backend: str | None = None, model=None,
                   init_noise_scale: float | None = None) -> Sampler:
        """A sampler whose plan is a tuned plan: a file path, a loaded file
        (:func:`pyengine.load_plan`) or a tuner's result (anything with ``.plan`` and
        ``.provenance``).

        >>> sampler = pe.Sampler.from_tuned("digits-nfe5.json", process)
        >>> x0 = sampler.sample(model, torch.randn(16, 1, 8, 8), seed=0)

        Refuses (ValueError naming both) a ``process`` other than the one the plan was tuned
        for (same class and parameters, :func:`pyengine.tuning.artifact.process_mismatch`)
        and a ``prediction`` other than the plan's (default: the plan's). With ``model``,
        warns when its fingerprint differs from the one the plan records. The noise scale is
        the one recorded (``provenance["init_noise_scale"]``), else the process's prior std
        at the first level, as for any sampler.

        Every mode runs the tuned plan as any plan: ``sample``, ``compile``, the request
        scheduler, inpainting (``mask=``). Guidance is folded into a tuned plan at the scale
        it was tuned with: another ``guidance_scale`` is refused. img2img
        (``strength`` / ``start_sigma``): a plan that is its base solver over the tuned grid
        (a schedule-only fit) is rebuilt over the truncated grid, as any sampler's; otherwise
        the tuned plan's own ops run from the start level on (the plan's suffix) where that
        suffix reads only the state; a multistep plan's later steps read model outputs of
        earlier steps that img2img does not have, so it is refused with that reason.
        """
        from .solvers.registry import SolverInfo
        from .tuning.artifact import TunedPlanFile, load_plan, model_fingerprint, \
            plans_equal, process_mismatch

        if isinstance(plan, (str, os.PathLike)):
            loaded = load_plan(plan)
        elif isinstance(plan, TunedPlanFile):
            loaded = plan
        elif isinstance(getattr(plan, "plan", None), Plan) and \
                isinstance(getattr(plan, "provenance", None), dict):
            loaded = TunedPlanFile(plan=plan.plan, provenance=dict(plan.provenance))
        else:
            raise TypeError(f"from_tuned takes a tuned plan file's path, a loaded file "
                            f"(pe.load_plan) or a tuned plan (.plan, .provenance), got "
                            f"{type(plan).__name__}")
        if not isinstance(process, Process):
            raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                            f"{type(process).__name__}")
        where = loaded.path or f"tuned plan {loaded.plan.solver!r}"
        prov = loaded.provenance
        if "process" not in prov or "prediction" not in prov:
            raise ValueError(f"{where}: the provenance has no process or prediction to check "
                             f"the plan against")
        why = process_mismatch(prov["process"], process)
        if why is not None:
            raise ValueError(f"{where}: refused: {why}")
        plan_pred = check_prediction(prov["prediction"])
        if prediction is not None and check_prediction(prediction) != plan_pred:
            raise ValueError(f"{where}: refused: the plan was tuned for a "
                             f"prediction={plan_pred!r} model, the given prediction is "
                             f"{prediction!r}")
        if model is not None:
            want, got = prov.get("model_fingerprint"), model_fingerprint(model)
            if want is not None and got is not None and want != got:
                warnings.warn(f"{where}: the plan was tuned for the model with fingerprint "
                              f"{want}; the given model's is {got} (another model, or other "
                              f"weights): the plan may not suit it", stacklevel=2)
        p = loaded.plan
        for op in p.ops:
            if isinstance(op, Custom) and not isinstance(op, GuidanceRescale):
                raise ValueError(f"{where}: a tuned plan holds Eval and Update ops, not "
                                 f"{type(op).__name__}")
        self = cls.__new__(cls)
        self.process = process
        base = prov.get("base_solver")
        base_info = registry.REGISTRY.get(base) if isinstance(base, str) else None
        steps = len(p.sigmas) - 1
        self.info = SolverInfo(
            name=p.solver, build=_no_rebuild, order=base_info.order if base_info else 0,
            nfe_per_step=max(1, round(p.nfe / steps)), stochastic=p.n_noise > 0,
            family="inversion" if p.sigmas[-1] > p.sigmas[0] else "tuned",
            summary=f"tuned plan ({base or 'base solver not recorded'})")
        self.prediction = plan_pred
        self.sigmas = np.asarray(p.sigmas, dtype=np.float64)
        self.schedule = "tuned"
        self.options = {}
        self.backend = backend
        self.timesteps = None
        self.guidance_scale = p.guidance_scale
        self.guidance_rescale = next((op.phi for op in p.ops if isinstance(op, GuidanceRescale)),
                                     0.0)
        self.plan = p
        self._plans = {}
        self.tuned = loaded
        self._rebuild = None
        if base_info is not None and base_info.family != "inversion":
            # a schedule-only tuned plan is the base solver over the tuned grid: img2img can
            # then rebuild it over the truncated grid, as for any grid
            opts = prov.get("base_options") or {}
            try:
                again = build_plan(process, base, p.sigmas, plan_pred,
                                   guidance_scale=self.guidance_scale,
                                   guidance_rescale=self.guidance_rescale, **opts)
            except (ValueError, TypeError):
                again = None
            if again is not None and plans_equal(dataclasses.replace(again, solver=p.solver), p):
                self._rebuild = (base, dict(opts))
        if init_noise_scale is None:
            init_noise_scale = prov.get("init_noise_scale")
        if init_noise_scale is None:
            init_noise_scale = 1.0 if self.info.family == "inversion" else \
                float(process.prior_std(self.sigmas[0]))
        self.init_noise_scale = registry.check_scalar("init_noise_scale", init_noise_scale)
        return self

    def _tuned_plan_for(self, start: int, w, phi) -> Plan:
        """The tuned plan's plan from level ``start`` (see :meth:`from_tuned`)."""
        if (w, phi) != (self.guidance_scale, self.guidance_rescale):
            have = "no guidance" if self.guidance_scale is None else \
                f"guidance_scale={self.guidance_scale:g}" + \
                (f", guidance_rescale={self.guidance_rescale:g}" if self.guidance_rescale else "")
            want = "no guidance" if w is None else f"guidance_scale={w:g}" + \
                (f", guidance_rescale={phi:g}" if phi else "")
            raise ValueError(f"tuned plan {self.plan.solver!r} was tuned with {have}; its "
                             f"coefficients hold that guidance and cannot be refolded for "
                             f"{want} (tune a plan at that guidance)")
        if start not in self._plans:
            if self._rebuild is not None:
                base, opts = self._rebuild
                self._plans[start] = build_plan(self.process, base, self.sigmas[start:],
                                                self.prediction, guidance_scale=w,
                                                guidance_rescale=phi, **opts)
            else:
                self._plans[start] = plan_suffix(self.plan, start)
        return self._plans[start]

    def __repr__(self) -> str:
        return (f"Sampler({self.process!r}, solver={self.solver!r}, steps={self.steps}, "
                f"schedule={self.schedule!r}, prediction={self.prediction!r}, nfe={self.nfe})")
