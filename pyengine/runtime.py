"""The runtime: walks a Plan eagerly (CUDA-graph capture comes with the runtime issue)."""

from __future__ import annotations

import torch

from . import backends
from .noise import seeds_tensor
from .parameterization import wrap
from .plan import Eval, Plan, Update

__all__ = ["run_plan"]


def run_plan(plan: Plan, model, x: torch.Tensor, *, seed=0, generator=None, backend=None,
             compute_dtype=None, callback=None, extra_args=None) -> torch.Tensor:
    """Execute ``plan`` from the initial state ``x`` (already at the first noise level).

    Noise: Philox keyed by per-sample ``seed`` (int or sequence), or with ``generator`` given,
    ``torch.randn(x.shape, generator=generator, dtype=x.dtype)`` at each noise draw, in plan
    order (what diffusers does inside ``scheduler.step``). ``x`` is never modified.
    ``callback(i, sigma, slots)`` runs after each model evaluation.
    """
    adapter = wrap(model, extra_args)
    be = backend if hasattr(backend, "fused_update") else backends.get(backend, device=x.device,
                                                                       dtype=x.dtype)
    state_dtype = x.dtype
    slots: dict[str, torch.Tensor] = {"x": x.clone()}
    seeds = None
    if generator is None:
        seeds = seeds_tensor(seed, x.shape[0])     # validated even when the plan draws nothing
        seeds = seeds.to(x.device) if plan.n_noise else None
    for op in plan.ops:
        if hasattr(op, "execute"):
            # A custom op (e.g. the Langevin corrector, whose step size depends on the data):
            # it reads and writes slots itself, through the same backend.
            op.execute(slots=slots, backend=be, model=adapter, seeds=seeds, generator=generator,
                       state_dtype=state_dtype, compute_dtype=compute_dtype)
            continue
        if isinstance(op, Eval):
            if op.guidance is not None:
                # Classifier-free guidance: one model call on the doubled batch (unconditional
                # half first, as diffusers pipelines do); the updates read the two halves as
                # two buffers with the guidance folded into their coefficients.
                src = slots[op.src]
                B = src.shape[0]
                out = adapter(torch.cat([src, src]), op.sigma, op.t, op.s)
                slots[op.dst + "/u"] = out[:B]
                slots[op.dst + "/c"] = out[B:]
            else:
                slots[op.dst] = adapter(slots[op.src], op.sigma, op.t, op.s)
            if callback is not None:
                callback(op.step, op.sigma, slots)
            continue
        assert isinstance(op, Update)
        bufs = [slots[b] for b in op.bufs]
        dst = torch.empty_like(slots["x"], dtype=state_dtype)
        aux = None
        if op.aux_dst is not None:
            aux = torch.empty_like(dst)
        noise = None
        if op.noise_index >= 0 and generator is not None:
            noise = torch.randn(x.shape, generator=generator, dtype=state_dtype,
                                device=generator.device).to(x.device)
        be.fused_update(dst, bufs, op.coefs, op.noise if op.noise_index >= 0 else 0.0, seeds,
                        op.noise_index, aux, op.aux_coefs, noise=noise,
                        **({"compute_dtype": compute_dtype} if compute_dtype else {}))
        slots[op.dst] = dst
        if aux is not None:
            slots[op.aux_dst] = aux
    return slots[plan.output]
