"""Compatibility shim: the native launchers moved to :mod:`pyengine.fused_update.native`
(read ``_C`` and ``IMPORT_ERROR`` there; patching them here has no effect)."""

from ..fused_update.native import _C, IMPORT_ERROR  # noqa: F401
