"""Adapters to the libraries users come from. Each imports its library lazily (or not at all),
so ``import pyengine.integrations`` works without them installed."""

from . import diffusers

__all__ = ["diffusers"]
