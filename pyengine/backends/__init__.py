"""Backend registry: name -> implementation of the fused-update contract (DESIGN.md s.5, s.7).

Only the torch reference backend exists so far; native and Triton backends register here.
``PYENGINE_BACKEND=<name>`` or ``backend=`` forces one.
"""

from __future__ import annotations

import os

from . import torch_ref

_REGISTRY = {"torch": torch_ref}


def available() -> list[str]:
    return list(_REGISTRY)


def get(name: str | None = None, device=None):
    """The backend module to use: ``name``, else $PYENGINE_BACKEND, else the best available."""
    name = name or os.environ.get("PYENGINE_BACKEND") or "torch"
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)}, got {name!r}") from None
