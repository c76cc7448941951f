"""Errors shared by the command line and the helpers it calls."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A bad argument of the user's (unknown name, unusable output path, ...): the command
    line reports it and exits with code 2."""
