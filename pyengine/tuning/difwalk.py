"""A differentiable walk of a plan: torch autograd through coefficients, times and the model.

The executor (:mod:`pyengine.runtime.walk`) issues fused updates with float64 host numbers;
fitting a plan needs the same walk with the numbers as torch tensors that carry gradients.
:func:`walk` runs a plan's ops with plain torch arithmetic, in the order the fused update's
reference defines (``((c_0 x_0 + c_1 x_1) + c_2 x_2) + ...``), the model called as the
executor calls it (``model(x, t)`` with a [B] time row of the state's dtype -- float32 below
float64 --; a :class:`pyengine.Denoiser` as ``D(x / s, sigma)``; classifier-free guidance as
one call on ``cat([x, x])`` whose halves bind ``dst + "/u"`` and ``dst + "/c"``).

Plans that draw noise or hold custom ops are refused. At the plan's own numbers the walk
agrees with ``run_plan`` on the torch backend to float64 rounding (tested).
"""

from __future__ import annotations

import torch

from ..parameterization import ModelAdapter
from ..plan import Custom, Eval, Plan, Update

__all__ = ["check_walkable", "walk"]


def check_walkable(plan: Plan) -> None:
    """Raise ValueError unless every op is a model evaluation or a noise-free update."""
    for op in plan.ops:
        if isinstance(op, Custom):
            raise ValueError(f"plan {plan.solver!r} holds a custom op ({type(op).__name__}); "
                             f"the differentiable walk runs evaluations and fused updates only")
        if isinstance(op, Update) and (op.noise_index >= 0 or op.noise != 0.0):
            raise ValueError(f"plan {plan.solver!r} draws noise (update {op.kind!r} at step "
                             f"{op.step}); the differentiable walk is for deterministic plans")
        if isinstance(op, Update) and op.mask_coefs is not None:
            raise ValueError("the differentiable walk does not run inpainting plans")
        if not isinstance(op, (Eval, Update)):
            raise ValueError(f"plan {plan.solver!r} holds {type(op).__name__}")


def walk(plan: Plan, model, x: torch.Tensor, *, coefs=None, times=None,
         extra_args: dict | None = None) -> torch.Tensor:
    """Run ``plan`` from the state ``x`` (already at the first level) with autograd.

    ``coefs``: one tensor (or array) [K] per update in plan order (default: the plan's);
    ``times``: a [nfe] tensor of model times (default: the plans' ``Eval.t``); ``extra_args``:
    keyword arguments of every model call (batched entries have the batch of the call: 2B
    under guidance). Returns the output slot (the final state)."""
    check_walkable(plan)
    adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model, extra_args)
    tdtype = x.dtype if x.dtype == torch.float64 else torch.float32
    slots = {"x": x}
    i_eval = i_upd = 0
    for op in plan.ops:
        if isinstance(op, Eval):
            src = slots[op.src]
            B = src.shape[0]
            inp = torch.cat([src, src]) if op.guidance is not None else src
            n = inp.shape[0]
            if adapter.is_denoiser:
                row = torch.full((n,), op.sigma, dtype=tdtype, device=x.device)
                xin = inp / op.s if op.s != 1.0 else inp
                out = adapter.model(xin, row, **adapter.extra_args)
            else:
                if times is None:
                    row = torch.full((n,), op.t, dtype=tdtype, device=x.device)
                else:
                    row = times[i_eval].to(dtype=tdtype, device=x.device).expand(n)
                out = adapter.model(inp, row, **adapter.extra_args)
            out = ModelAdapter._check(out, inp)
            if op.guidance is not None:
                slots[op.dst + "/u"], slots[op.dst + "/c"] = out[:B], out[B:]
            else:
                slots[op.dst] = out
            i_eval += 1
        else:
            c = op.coefs if coefs is None else coefs[i_upd]
            c = torch.as_tensor(c, dtype=torch.float64)
            cdt = x.dtype if x.dtype == torch.float64 else torch.float32
            c = c.to(device=x.device, dtype=cdt)
            ins = [slots[b].to(cdt) for b in op.bufs]
            acc = ins[0] * c[0]
            for k in range(1, len(ins)):
                acc = acc + ins[k] * c[k]
            if op.aux_dst is not None:
                a = torch.as_tensor(op.aux_coefs, dtype=torch.float64).to(device=x.device,
                                                                         dtype=cdt)
                aux = ins[0] * a[0]
                for k in range(1, len(ins)):
                    aux = aux + ins[k] * a[k]
                slots[op.aux_dst] = aux.to(x.dtype)
            slots[op.dst] = acc.to(x.dtype)
            i_upd += 1
    return slots[plan.output]
