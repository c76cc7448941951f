"""The torch reference backend's fused update against a float64 statement of the contract."""

import numpy as np
import pytest
import torch

from pyengine.backends import torch_ref
from pyengine.noise import seeds_tensor
from reference import fused_update_reference

# (dtype, tolerance): the result is stored in dtype, so one rounding of the output dominates:
# relative 2^-24 (fp32), 2^-8 (bf16), 2^-11 (fp16) times the size of the largest term, with K
# terms accumulated in fp32 adding a few fp32 ulps.
CASES = [(torch.float64, 1e-13), (torch.float32, 4e-6), (torch.float16, 2e-3),
         (torch.bfloat16, 1.6e-2)]


def _bufs(K, shape, dtype, g):
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(K)]


@pytest.mark.parametrize("dtype,tol", CASES)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(1, 7), (3, 4, 5, 5), (2, 131)])
def test_matches_float64(dtype, tol, K, shape):
    g = torch.Generator().manual_seed(K * 100 + len(shape))
    bufs = _bufs(K, shape, dtype, g)
    coef = np.random.default_rng(K).normal(size=K)
    out = torch.empty(shape, dtype=dtype)
    torch_ref.fused_update(out, bufs, coef)
    ref, _ = fused_update_reference(bufs, coef)
    scale = sum(abs(c) for c in coef) * max(b.abs().max().item() for b in bufs)
    assert (out.double() - ref).abs().max().item() <= tol * scale
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype,tol", CASES[:2])
def test_per_sample_coefficients_noise_and_aux(dtype, tol):
    g = torch.Generator().manual_seed(3)
    shape, K = (5, 3, 7), 4
    bufs = _bufs(K, shape, dtype, g)
    coef = torch.randn(shape[0], K, dtype=torch.float64, generator=g)
    aux_coef = np.random.default_rng(1).normal(size=K)
    nc = torch.rand(shape[0], dtype=torch.float64, generator=g)
    seeds = seeds_tensor(11, shape[0])
    out, aux = torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
    torch_ref.fused_update(out, bufs, coef, nc, seeds, 4, aux, aux_coef)
    ref, ref_aux = fused_update_reference(bufs, coef, nc, seeds, 4, aux_coef)
    assert (out.double() - ref).abs().max().item() <= tol * 20
    assert (aux.double() - ref_aux).abs().max().item() <= tol * 20


def test_output_may_alias_an_input():
    g = torch.Generator().manual_seed(5)
    bufs = _bufs(3, (4, 9), torch.float32, g)
    keep = [b.clone() for b in bufs]
    coef = [0.5, -1.25, 2.0]
    ref, _ = fused_update_reference(keep, coef)
    torch_ref.fused_update(bufs[0], bufs, coef)      # in place into buffer 0
    assert torch.allclose(bufs[0].double(), ref, atol=1e-6)
    assert torch.equal(bufs[1], keep[1]) and torch.equal(bufs[2], keep[2])


@pytest.mark.parametrize("bad,msg", [
    (lambda b, o: ([b[0], b[1][:, :3]], o), "bufs\\[1\\] has shape"),
    (lambda b, o: (b, o[:, :2]), "out must be a tensor of shape"),
    (lambda b, o: ([b[0], b[1].to(torch.int32)], o), "unsupported dtype"),
])
def test_validation_names_the_argument(bad, msg):
    bufs = [torch.randn(2, 5), torch.randn(2, 5)]
    out = torch.empty(2, 5)
    b, o = bad(bufs, out)
    with pytest.raises(ValueError, match=msg):
        torch_ref.fused_update(o, b, [1.0, 1.0])


def test_noisy_update_requires_a_key():
    with pytest.raises(ValueError, match="seeds"):
        torch_ref.fused_update(torch.empty(2, 3), [torch.randn(2, 3)], [1.0], 0.5)
