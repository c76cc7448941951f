"""Triton kernels shipped with pyengine (imported by the triton backend)."""
