"""The compiled Triton kernel on a real GPU: every dtype (bf16/fp16 included), the noise
words, autotuning before graph capture, replay with new seeds/step, and torch.compile
through the Triton op. Every test skips cleanly without a CUDA device (bench/gpu_check.sh
runs them on a machine that has one); under TRITON_INTERPRET=1 they skip too (the
interpreter tests are tests/test_triton_fused_update.py).

Tolerance as everywhere (STYLE habit 5): error vs the float64 reference at most twice the
torch backend's at the same dtype, or one rounding of the result where torch is exact.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from reference import fused_update_reference

from pyengine.backends import torch_ref
from pyengine.noise import philox4x32, philox_normal, seeds_tensor

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA device and the Triton compiler (not the interpreter)")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def tb():
    pytest.importorskip("triton")
    from pyengine.backends import triton_backend
    why = triton_backend.unavailable_reason("cuda")
    if why is not None:
        pytest.skip(why)
    return triton_backend


def _err_ok(got, want, mine, eps, scale):
    err = (got.double() - want).abs().max().item()
    torch_err = (mine.double() - want).abs().max().item()
    assert err <= max(2 * torch_err, eps * scale), (err, torch_err, eps * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("kind", ["per_step", "per_sample"])
@pytest.mark.parametrize("shape", [(3, 131), (2, 4, 64, 65), (1, 65537)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_the_reference(tb, dtype, K, kind, shape):
    g = torch.Generator().manual_seed(K)
    B = shape[0]
    bufs = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).cuda()
            for _ in range(K)]
    coef = torch.randn(K, generator=g, dtype=torch.float64).numpy() if kind == "per_step" \
        else torch.randn(B, K, generator=g, dtype=torch.float64)
    aux_coef = torch.randn(K, generator=g, dtype=torch.float64).numpy()
    seeds = seeds_tensor(4, B).cuda()
    z = torch.empty(shape, device="cuda")
    tb.fused_update(z, [torch.zeros(shape, device="cuda")], np.array([0.0]), 1.0, seeds, 3)
    ref, ref_aux = fused_update_reference([b.cpu() for b in bufs], coef, 0.6, aux_coef=aux_coef,
                                          noise=z.cpu())
    out, aux = torch.empty_like(bufs[0]), torch.empty_like(bufs[0])
    tb.fused_update(out, bufs, coef, 0.6, seeds, 3, aux, aux_coef)
    t_out, t_aux = torch.empty_like(out), torch.empty_like(out)
    torch_ref.fused_update(t_out, bufs, coef, 0.6, seeds, 3, t_aux, aux_coef, noise=z)
    eps = torch.finfo(dtype).eps
    scale = sum(b.double().abs().max().item() for b in bufs) * 3 + 6
    _err_ok(out.cpu(), ref, t_out.cpu(), eps, scale)
    _err_ok(aux.cpu(), ref_aux, t_aux.cpu(), eps, scale)


def test_noise_words_and_normals(tb):
    q0, nq = 2 ** 32 - 5, 1000
    got = tb.philox_words(2 ** 64 - 1, 77, nq, q0, device="cuda")
    q = torch.arange(q0, q0 + nq, dtype=torch.int64)
    want = philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, 77), torch.zeros_like(q),
                      torch.tensor(0xFFFFFFFF), torch.tensor(0xFFFFFFFF))
    assert torch.equal(got, torch.stack(want, 1))
    seeds = seeds_tensor([1, 2 ** 64 - 1], 2).cuda()
    z = torch.empty(2, 4099, device="cuda")
    tb.fused_update(z, [torch.zeros_like(z)], np.array([0.0]), 1.0, seeds, 9)
    torch.testing.assert_close(z.cpu(), philox_normal(seeds.cpu(), 9, 4099), rtol=0, atol=1e-5)


def test_cuda_graph_replays_with_new_seeds_and_step(tb):
    shape = (4, 4, 64, 64)
    tb.warmup(dtypes=(torch.float32,), Ks=(2,), numels=(shape[0] * 4 * 64 * 64,),
              noise_modes=(1,), aux=(False,))
    x = torch.randn(shape, device="cuda")
    e = torch.randn(shape, device="cuda")
    out = torch.empty_like(x)
    seeds = seeds_tensor(1, 4).cuda()
    step = torch.tensor([0], dtype=torch.int64, device="cuda")
    coef = np.array([0.9, -0.2])
    tb.fused_update(out, [x, e], coef, 0.5, seeds, step)          # eager warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tb.fused_update(out, [x, e], coef, 0.5, seeds, step)
    seeds.copy_(seeds_tensor(2, 4).cuda())
    step.fill_(5)
    graph.replay()
    want = torch.empty_like(out)
    tb.fused_update(want, [x, e], coef, 0.5, seeds_tensor(2, 4).cuda(), 5)
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_torch_compile_traces_the_triton_op(tb):
    def f(out, x, e):
        tb.fused_update_op(out, [x, e], [1.0, 2.0], 0.0)
        return out + 1

    x, e = torch.randn(3, 1000, device="cuda"), torch.randn(3, 1000, device="cuda")
    out = torch.empty_like(x)
    got = torch.compile(f, fullgraph=True)(out, x, e)
    torch.testing.assert_close(got, x + 2.0 * e + 1)


def test_triton_matches_the_cuda_kernel(tb):
    from pyengine.backends import cuda
    if cuda.unavailable_reason("cuda") is not None:
        pytest.skip(cuda.unavailable_reason("cuda"))
    g = torch.Generator().manual_seed(0)
    bufs = [torch.randn(2, 5000, generator=g).cuda() for _ in range(3)]
    seeds = seeds_tensor(3, 2).cuda()
    a, b = torch.empty_like(bufs[0]), torch.empty_like(bufs[0])
    tb.fused_update(a, bufs, np.array([0.5, -1.0, 0.25]), 0.3, seeds, 4)
    cuda.fused_update(b, bufs, np.array([0.5, -1.0, 0.25]), 0.3, seeds, 4)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
