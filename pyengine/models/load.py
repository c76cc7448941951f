"""A model named on the command line: ``digits``, ``gmm`` or an import path ``module:attr``,
resolved to what sampling it needs (process, callable, prediction, sample shape)."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["ModelSpec", "load_model", "parse_shape"]


@dataclass
class ModelSpec:
    """A resolved model, with what sampling it needs."""
    label: str
    process: object
    model: object
    prediction: str
    shape: tuple
    images: object = None          # samples -> images [N, (C,) H, W] in [0, 1], or None


def parse_shape(text: str, option: str = "--shape") -> tuple:
    """'3,32,32' or '3x32x32' -> (3, 32, 32); UsageError naming ``option`` otherwise."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"{option} must be positive integers like 3,32,32; got {text!r}")
    return shape


def _process(name: str):
    from ..processes import named
    try:
        return named(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _prediction(p: str) -> str:
    from ..parameterization import check_prediction
    try:
        return check_prediction(p)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _is_factory(obj) -> bool:
    """A class, or a callable that can be called with no arguments (and takes no *args): a
    factory. A torch module, or a callable needing positional arguments: the model itself."""
    import torch
    if isinstance(obj, torch.nn.Module):
        return False
    if isinstance(obj, type):
        return True
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return False
    return not any(p.kind in positional and p.default is p.empty for p in params)


def _import_attr(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"model must be 'digits', 'gmm' or an import path 'module:attr', "
                         f"got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())          # a module in the current folder, as python -m
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise UsageError(f"cannot import module {mod_name!r} (model {spec!r}): {e}") from None
        raise RuntimeError(f"importing {mod_name!r} failed: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_model(name: str, *, process: str | None = None, prediction: str | None = None,
               shape: str | None = None, dim: int = 2, model_seed: int = 0) -> ModelSpec:
    """``digits``, ``gmm`` or ``module:attr`` -> ModelSpec.

    ``module:attr`` names a model ``model(x, t)`` (a torch module or any callable taking the
    state and the [B] model time in the process's convention), or a factory called with no
    arguments that returns the model, ``(process, model)`` or ``(process, model,
    prediction)``. ``process`` (a name of ``pyengine.processes.NAMED``) and ``prediction``
    override what a factory returns (defaults: vp, epsilon). The sample shape is ``shape``
    ('3,32,32'), else the model's ``sample_shape`` attribute. Bad names raise UsageError.
    """
    from ..processes import Process

    size = parse_shape(shape) if shape else None
    if name == "digits":
        from .digits import load_digits_model, to_pixels
        if process not in (None, "edm"):
            raise UsageError(f"the digits model is trained on the EDM process; drop --process "
                             f"{process}")
        if prediction is not None and _prediction(prediction) != "sample":
            raise UsageError(f"the digits model is a denoiser (prediction 'sample'); drop "
                             f"--prediction {prediction}")
        proc, model, pred = load_digits_model()
        if size is not None and math.prod(size) != 64:
            raise UsageError(f"the digits model makes 8x8 images; --shape {shape} has "
                             f"{math.prod(size)} elements")
        return ModelSpec("digits (8x8, EDM denoiser)", proc, model, pred,
                         size or tuple(model.sample_shape), to_pixels)
    if name == "gmm":
        from .gmm import GaussianMixture
        proc_name = process or "vp"
        proc = _process(proc_name)
        pred = _prediction(prediction or "epsilon")
        gmm = GaussianMixture.random(d=dim, M=4, seed=model_seed)
        if size is not None and size != (dim,):
            raise UsageError(f"the gmm model makes vectors of --dim {dim}; --shape {shape} "
                             f"disagrees")
        return ModelSpec(f"gmm (d={dim}, 4 components, {proc_name}, {pred})", proc,
                         gmm.as_model(proc, pred), pred, (dim,))

    obj = _import_attr(name)
    proc = pred = None
    if _is_factory(obj):
        made = obj()
        if isinstance(made, (tuple, list)):
            if len(made) not in (2, 3):
                raise UsageError(f"factory {name!r} returned {len(made)} items; expected the "
                                 f"model, (process, model) or (process, model, prediction)")
            proc, model = made[0], made[1]
            pred = made[2] if len(made) == 3 else None
            if not isinstance(proc, Process):
                raise UsageError(f"factory {name!r} returned {type(proc).__name__} where a "
                                 f"pyengine process (pe.processes.*) belongs")
        else:
            model = made
    else:
        model = obj
    if not callable(model):
        raise UsageError(f"{name!r} is not callable (a {type(model).__name__}); it must be a "
                         f"model(x, t) or a factory returning one")
    if process is not None or proc is None:
        proc = _process(process or "vp")
    pred = _prediction(prediction or pred or "epsilon")
    if size is None:
        size = getattr(model, "sample_shape", None)
        if size is None:
            raise UsageError(f"give --shape for model {name!r} (e.g. --shape 3,32,32), or give "
                             f"the model a sample_shape attribute")
        size = tuple(int(s) for s in size)
    images = None
    if len(size) == 2 or (len(size) == 3 and size[0] in (1, 3)):
        def images(x):
            return ((x.detach().float() + 1.0) * 0.5).clamp(0.0, 1.0)
    return ModelSpec(name, proc, model, pred, size, images)
