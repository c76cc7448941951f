"""Backend registry: name -> implementation of the fused-update contract (DESIGN.md s.5, s.7).

Every backend is a module with ``name``, ``fused_update(...)`` and
``unavailable_reason(device_type)`` (None when it can run there). Defaults by device, best
first: CUDA -> cuda, torch; CPU -> cpp, torch. The torch reference backend is always there.
``PYENGINE_BACKEND=<name>`` or ``backend=`` forces one; a forced backend that cannot run
raises ValueError saying why.
"""

from __future__ import annotations

import os

import torch

from . import cpp, cuda, torch_ref

_REGISTRY = {"torch": torch_ref, "cpp": cpp, "cuda": cuda}
_PRIORITY = {"cpu": ("cpp", "torch"), "cuda": ("cuda", "torch")}


def _reason(name: str, device_type: str | None) -> str | None:
    be = _REGISTRY[name]
    if not hasattr(be, "unavailable_reason"):
        return None                       # the torch reference runs anywhere
    if device_type is None:
        device_type = getattr(be, "device_types", ("cpu",))[0]
    return be.unavailable_reason(device_type)


def available() -> list[str]:
    """The backends that can run here, on some device."""
    return [n for n in _REGISTRY if _reason(n, None) is None]


def explain(device=None) -> dict[str, str | None]:
    """name -> None (runs on ``device``, default cpu) or the reason it cannot."""
    dt = torch.device(device).type if device is not None else "cpu"
    return {n: _reason(n, dt) for n in _REGISTRY}


def get(name: str | None = None, device=None):
    """The backend module to use: ``name``, else $PYENGINE_BACKEND, else the best available
    for ``device`` (a torch.device or string; default cpu)."""
    dt = torch.device(device).type if device is not None else "cpu"
    name = name or os.environ.get("PYENGINE_BACKEND")
    if name:
        if name not in _REGISTRY:
            raise ValueError(f"backend must be one of {sorted(_REGISTRY)}, got {name!r}")
        why = _reason(name, None)
        if why is not None:
            raise ValueError(f"backend {name!r} cannot run: {why}")
        return _REGISTRY[name]
    tried = []
    for cand in _PRIORITY.get(dt, ("torch",)):
        why = _reason(cand, dt)
        if why is None:
            return _REGISTRY[cand]
        tried.append(f"{cand}: {why}")
    raise ValueError(f"no backend can run on {dt}; tried " + "; ".join(tried))
