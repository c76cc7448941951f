"""The numba CPU fused update (backend "numba"): what only this backend has.

The cases every backend shares run in tests/test_fused_update.py. Here: the Philox words of
the numba kernels bit for bit, their normals, the dtypes it refuses with a reason, and that
it leaves torch's thread count alone.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pyengine.backends import numba_backend as nb
from pyengine.fused_update import native
from pyengine.noise import philox4x32, philox_normal, sample_seed, seeds_tensor

if nb.unavailable_reason("cpu") is not None:
    pytest.skip(nb.unavailable_reason("cpu"), allow_module_level=True)


@pytest.mark.parametrize("seed,step,q0", [(0, 0, 0), (2 ** 64 - 1, 2 ** 32 - 1, 7),
                                          (sample_seed(5, 2), 9, 2 ** 32 - 70),
                                          (0xDEADBEEFCAFEF00D, 123456, 2 ** 40 + 3)])
def test_philox_words_bit_exact(seed, step, q0):
    nq = 301
    got = nb.philox_words(seed, step, nq, q0=q0)
    q = torch.arange(q0, q0 + nq, dtype=torch.int64)
    want = philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, step), torch.zeros_like(q),
                      torch.tensor(seed & 0xFFFFFFFF), torch.tensor(seed >> 32))
    assert torch.equal(got, torch.stack(want, dim=1))
    if native._C is not None:
        from pyengine.backends import cpp
        assert torch.equal(got, cpp.philox_words(seed, step, nq, q0=q0))


def test_normals_and_kernel_noise():
    seeds = seeds_tensor([0, 1, 2 ** 64 - 1, sample_seed(77, 3)], 4)
    for step, numel in ((0, 1), (5, 3), (2 ** 32 - 1, 4099), (17, 9001)):
        torch.testing.assert_close(nb.philox_normal(seeds, step, numel),
                                   philox_normal(seeds, step, numel), rtol=0, atol=1e-6)
    # the kernel adds exactly those normals: out = 0 * x + 1 * z (over several tiles)
    x = torch.ones(4, 9001)
    out = torch.empty_like(x)
    nb.fused_update(out, [x], np.array([0.0]), 1.0, seeds, 17)
    assert torch.equal(out, nb.philox_normal(seeds, 17, 9001))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_are_refused_with_a_reason(dtype):
    from pyengine.backends.dispatch import Call
    x = torch.randn(2, 8).to(dtype)
    why = nb.reasons_unsupported(Call.of(torch.empty_like(x), [x]))
    assert why and "float32/float64 only" in why[0] and str(dtype).split(".")[1] in why[0]
    with pytest.raises(ValueError, match="float32 and float64"):
        nb.fused_update(torch.empty_like(x), [x], np.array([1.0]))


def test_first_call_keeps_torchs_thread_count():
    """Issue 13 #8: launching numba's pool (OpenMP threading layer) set the process's OpenMP
    thread count, which is torch's: 1 -> 2 on the first call. A fresh process, so the pool
    is launched here."""
    code = ("import torch, numpy as np\n"
            "torch.set_num_threads(1)\n"
            "from pyengine.backends import numba_backend as nb\n"
            "x = torch.randn(4, 20000)\n"                    # parallel path (>= 2^15)
            "nb.fused_update(torch.empty_like(x), [x], np.array([1.0]))\n"
            "a = torch.get_num_threads()\n"
            "torch.set_num_threads(2)\n"
            "nb.fused_update(torch.empty_like(x), [x], np.array([1.0]))\n"
            "print(a, torch.get_num_threads())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["1", "2"], r.stdout
