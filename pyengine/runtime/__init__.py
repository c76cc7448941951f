"""The executor: the one walk of a Plan, eager or device-resident and captured.

* :mod:`.walk` -- :class:`Program` (a plan numbered for walking) and :class:`Walker` (the
  loop: model calls with guidance doubling, the fused updates, custom ops, callbacks);
  numbers sources (host floats, device tables) and noise sources (Philox, generator, the
  caller's tensors) are what the modes plug in.
* :mod:`.tables` -- the plan's numbers in device memory (:class:`DeviceTables`).
* :mod:`.transforms` -- plan rewrites every mode gets (the inpainting blend).
* :mod:`.custom` -- tensor code of the plan's custom ops.
* :mod:`.graph` -- :class:`CompiledLoop` (``Sampler.compile``), CUDA-graph capture and the
  LRU :data:`graph_cache`.

:func:`run_plan` is the eager walk behind ``Sampler.sample``, inversion and the k-diffusion
functions.
"""

from __future__ import annotations

from .. import backends
from ..errors import check_callable
from ..fused_update.contract import check_compute_dtype
from ..noise import seeds_tensor
from ..plan import Plan
from .graph import CompiledLoop, GraphCache, compile_plan, graph_cache
from .tables import DeviceTables, plan_signature
from .transforms import KNOWN, KNOWN_NOISE, check_state_dtype, inpaint, inpaint_inputs
from .walk import (BufferPool, GeneratorDraws, HostNumbers, PhiloxDraws, Program,
                   SuppliedDraws, Walker, buffer_pool)

__all__ = ["BufferPool", "CompiledLoop", "DeviceTables", "GeneratorDraws", "GraphCache",
           "HostNumbers", "PhiloxDraws", "Program", "SuppliedDraws", "Walker", "buffer_pool",
           "compile_plan", "graph_cache", "inpaint", "plan_signature", "run_plan",
           "resolve_backend"]


def resolve_backend(backend, x):
    """A backend module: ``backend`` itself, or the registry's choice for ``x``."""
    if hasattr(backend, "fused_update"):
        return backend
    return backends.get(backend, device=x.device, dtype=x.dtype)


def run_plan(plan: Plan, model, x, *, seed=0, generator=None, backend=None,
             compute_dtype=None, callback=None, extra_args=None, mask=None, known=None,
             known_noise=None, noise=None, recycle: bool | None = None):
    """Execute ``plan`` from the initial state ``x`` (already at the first noise level).

    Noise: Philox keyed by per-sample ``seed`` (int or sequence); with ``generator``,
    ``torch.randn(x.shape, generator=generator)`` at each draw in plan order (what diffusers
    does inside ``scheduler.step``); or ``noise``, a draws source (:class:`SuppliedDraws`).
    ``x`` is never modified. ``callback(i, sigma, slots)`` runs after each model evaluation.
    ``mask``, ``known`` and ``known_noise``: inpainting (the plan is rewritten by
    :func:`inpaint`). ``recycle``: reuse the walk's buffers (default: unless a callback is
    given, which may keep the slot tensors it is shown).
    """
    check_callable("model", model)
    if callback is not None:
        check_callable("callback", callback, "callback(step, sigma, slots)")
    check_compute_dtype(compute_dtype)
    check_state_dtype(plan, x.dtype)
    inputs = {}
    if mask is not None:
        plan = inpaint(plan)
        mask, known, known_noise = inpaint_inputs(x, mask, known, known_noise)
        inputs = {KNOWN: known, KNOWN_NOISE: known_noise}
    program = Program.of(plan)
    be = resolve_backend(backend, x)
    if noise is None:
        if generator is not None:
            noise = GeneratorDraws(generator)
        else:
            if plan.n_noise or type(seed) is not int or not 0 <= seed < 2 ** 32:
                # validated even when nothing is drawn
                seeds = seeds_tensor(seed, x.shape[0])
                noise = PhiloxDraws(seeds.to(x.device) if plan.n_noise else None)
            else:
                noise = PhiloxDraws(None)               # a valid int seed, nothing drawn
    w = Walker(program, model, be, noise=noise, compute_dtype=compute_dtype, mask=mask,
               callback=callback, extra_args=extra_args,
               recycle=callback is None if recycle is None else recycle)
    if w.recycle:
        w.pool = buffer_pool
    out = w.start(x, inputs).run()
    w.finish(out)
    # a plan with no update returns its input: the caller gets a copy, never its own tensor
    return out.clone() if out is x or any(out is v for v in inputs.values()) else out
