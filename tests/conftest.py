"""Shared pytest setup."""

import os

import torch

# Tests see the default backend priority, never a ranking measured on this machine by
# `PYENGINE_RANK=1 pyengine info` (which could change which backend a test gets).
os.environ.setdefault("PYENGINE_RANKING_FILE", os.devnull)

# The tests run small tensors (a Gaussian-mixture denoiser on [4, 16] states): one thread is
# ten times faster there than two on the shared 2-core machine (0.33 ms vs 3.5 ms per call).
torch.set_num_threads(1)
