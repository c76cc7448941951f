"""Errors shared by the command line and the helpers it calls, and the one set of checks of
the public API's arguments.

Scalars (numbers, integers, flags, choices) are checked by :class:`Option` -- the solver
registry's option specs, the plan-wide scalars and every other public function's numeric
arguments use it. Tensors, callables, keyword dictionaries and devices are checked by
:func:`check_tensor`, :func:`check_callable`, :func:`check_kwargs` and :func:`as_device`.
Every error names the argument as the caller passed it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

__all__ = ["UsageError", "Option", "check_real", "check_int", "check_tensor", "check_callable",
           "check_kwargs", "as_device"]


class UsageError(ValueError):
    """A bad argument of the user's (unknown name, unusable output path, ...): the command
    line reports it and exits with code 2."""


@dataclass(frozen=True)
class Option:
    """Type and range of one scalar: ``kind`` "real" (finite unless ``allow_inf``), "int",
    "bool", "choice" or "solver" (a registry solver's name); bounds ``lo``/``hi`` inclusive
    (``lo_open``: lo excluded); ``allow_none``: None is a value too (meaning the caller's
    fallback)."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    allow_inf: bool = False
    choices: tuple = ()
    allow_none: bool = False

    def describe(self) -> str:
        if self.allow_none:
            return Option(self.kind, self.lo, self.hi, self.lo_open, self.allow_inf,
                          self.choices).describe() + " or None"
        if self.kind == "bool":
            return "True or False"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind == "solver":
            return "the name of a registry solver"
        what = "an integer" if self.kind == "int" else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo:g}" + \
                (" (inf allowed)" if self.allow_inf else "")
        if self.hi is not None:
            return f"{what} <= {self.hi:g}"
        return what + ("" if self.allow_inf or self.kind == "int" else " (finite)")

    def check(self, name: str, value, where: str = ""):
        """``value`` as a Python scalar of this kind; ValueError naming ``name`` if not."""
        bad = ValueError(f"{where}{name} must be {self.describe()}, got {value!r}")
        if value is None and self.allow_none:
            return None
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise bad
        if self.kind == "solver":
            from .solvers.registry import REGISTRY
            if isinstance(value, str) and value in REGISTRY:
                return value
            raise bad
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise bad
        if isinstance(value, (bool, np.bool_)):
            raise bad
        if not isinstance(value, numbers.Real) and getattr(value, "ndim", None) == 0:
            if getattr(getattr(value, "device", None), "type", None) == "meta":
                raise bad                         # a meta tensor has no number
            value = value.item()                  # a 0-d tensor or array: its number
        if self.kind == "int":
            if isinstance(value, numbers.Integral):
                v = int(value)
            elif isinstance(value, numbers.Real) and float(value).is_integer():
                v = int(value)
            else:
                raise bad
        else:
            if not isinstance(value, numbers.Real):
                raise bad
            v = float(value)
            if math.isnan(v) or (math.isinf(v) and not (self.allow_inf and v > 0)):
                raise bad
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            raise bad
        if self.hi is not None and v > self.hi:
            raise bad
        return v


def check_real(name: str, value, *, lo=None, hi=None, lo_open: bool = False,
               allow_inf: bool = False, allow_none: bool = False, where: str = ""):
    """``value`` as a float (a finite number unless ``allow_inf``, within the bounds);
    ValueError naming ``name`` otherwise. See :class:`Option`."""
    return Option("real", lo=lo, hi=hi, lo_open=lo_open, allow_inf=allow_inf,
                  allow_none=allow_none).check(name, value, where)


def check_int(name: str, value, *, lo=None, hi=None, allow_none: bool = False,
              where: str = ""):
    """``value`` as an int (an integral number, not a bool, within the bounds); ValueError
    naming ``name`` otherwise. See :class:`Option`."""
    return Option("int", lo=lo, hi=hi, allow_none=allow_none).check(name, value, where)


def check_tensor(name: str, t, *, batch: bool = True, floating: bool = True, device=None,
                 where: str = ""):
    """A tensor argument: TypeError unless ``t`` is a torch.Tensor; ValueError unless it holds
    data (not on the meta device), is floating (``floating``), is [B, ...] with B >= 1
    (``batch``) and lies on ``device`` (when given). Returns ``t``."""
    import torch
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{where}{name} is a tensor on the meta device (it has no data); pass "
                         f"a tensor on a real device")
    if floating and not t.is_floating_point():
        raise ValueError(f"{where}{name} must be a floating tensor, got dtype "
                         f"{str(t.dtype).replace('torch.', '')}")
    if batch and (t.dim() < 1 or t.shape[0] < 1):
        raise ValueError(f"{where}{name} must be a tensor [B, ...] with B >= 1, got shape "
                         f"{tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{where}{name} is on {t.device}, expected {device}")
    return t


def check_callable(name: str, fn, what: str = "", where: str = ""):
    """TypeError naming ``name`` unless ``fn`` is callable (``what``: how it is called)."""
    if not callable(fn):
        raise TypeError(f"{where}{name} must be callable{' as ' + what if what else ''}, got "
                        f"{type(fn).__name__}")
    return fn


def check_kwargs(name: str, d, where: str = "") -> dict:
    """A dict of keyword arguments (string keys), or None; TypeError naming ``name``."""
    if d is None:
        return {}
    from collections.abc import Mapping
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}{name} must be a dict of keyword arguments for the model, got "
                        f"{type(d).__name__}")
    bad = [k for k in d if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{where}{name} must have string keys (model keyword arguments), got "
                        f"the key {bad[0]!r}")
    return dict(d)


def as_device(device, name: str = "device"):
    """``device`` (a torch.device, a string such as "cuda:0", an index, or None for the CPU)
    as a torch.device; ValueError naming ``name`` for anything else."""
    import torch
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise ValueError(f"{name} must be a torch.device, a device string such as 'cpu' or "
                         f"'cuda:0', or None, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} must be a device such as 'cpu', 'cuda' or 'cuda:0', got "
                         f"{device!r}") from None
