"""Counter-based, batch-invariant Gaussian noise: Philox-4x32-10 + Box-Muller.

The definition every backend reproduces bit for bit (C++, CUDA, Triton, this torch code):

* a sample's 64-bit seed gives the Philox key (k0, k1) = (seed & 0xffffffff, seed >> 32);
  an integer batch seed S gives sample i the seed ``sample_seed(S, i) = S + (i << 32)``,
* the noise draw number ``step`` of the plan and the element index j within the sample give
  the counter (c0, c1, c2, c3) = (q & 0xffffffff, q >> 32, step, 0) with q = j // 4 (a batch
  may also carry one draw number per sample: sample b then uses step[b]),
* Philox-4x32-10 (Salmon et al. 2011) turns it into four uint32 words w0..w3,
* u_k = float32(float32(w_k >> 8) + 0.5) * 2^-24 lies in (0, 1] (the sum rounds to even once
  w_k >> 8 >= 2^23),
* Box-Muller, :func:`box_muller`: (r cos 2 pi u1, r sin 2 pi u1) with r = sqrt(-2 log u0) for
  elements 4q, 4q+1; the same with (u2, u3) for 4q+2, 4q+3. log, cos and sin are one fixed
  sequence of float32 operations (below), not a math library's, so that every backend gives the
  same bits.

So a sample's noise depends only on its own seed, never on batch size, position or backend.

The normal transform (:func:`box_muller`; csrc/fused_update/normal.h, the numba and Triton
kernels do the same operations in the same order). Only IEEE-exact steps: float32 +, -, *
each rounded on its own (no fused multiply-add), a correctly rounded sqrt, exact int <-> float
conversions and bit operations:

* log u: i = bits(u) - 0x3F3504F3 (int32), e = i >> 23 (arithmetic), m = float with bits
  (i & 0x7FFFFF) + 0x3F3504F3 in [sqrt(1/2), sqrt(2)), f = m - 1 (exact);
  log u = e * LN2_HI + (e * LN2_LO + (f + (f * f) * P(f))), P of degree 8 (``LOG_COEFS``,
  Horner from the highest power); e * LN2_HI is exact.
* r = sqrt(-2 * log u)
* n = int(v * 4 + 0.5) (truncation, 0..4), y = v - n * 0.25 (exact, |y| <= 1/8 turn),
  s = y * S(y * y) ~ sin 2 pi y, c = 1 + (y * y) * C(y * y) ~ cos 2 pi y, S and C of degree 3
  (``SIN_COEFS``, ``COS_COEFS``, Horner); the quadrant n mod 4: an odd n swaps c and s, cos is
  negated for n mod 4 in {1, 2}, sin for n mod 4 in {2, 3}.
* z = (r * cos, r * sin)

Accuracy against float64 log, sqrt, cos and sin of the same float32 uniforms, over all 2^24
of them: r within 3.6e-7 (1 ulp), cos and sin within 8.8e-8, so every normal is within 1.2e-6
of the float64 Box-Muller value (the earlier libm-based transform: 9.5e-7, and its last bits
differed between backends).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "philox4x32", "sample_seed",
           "seeds_tensor", "philox_normal", "uniform24", "box_muller", "LOG_COEFS",
           "SIN_COEFS", "COS_COEFS", "LN2_HI", "LN2_LO"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK = 0xFFFFFFFF

# The float32 constants of the normal transform, exact float32 values (hex literals: the same
# numbers as csrc/fused_update/normal.h). P(f) ~ (log(1 + f) - f) / f^2 on
# [sqrt(1/2) - 1, sqrt(2) - 1], S(t) ~ sin(2 pi y) / y and C(t) ~ (cos(2 pi y) - 1) / t with
# t = y^2, |y| <= 1/8; coefficients from the constant term up (minimax fits, rounded).
LOG_COEFS = tuple(float.fromhex(h) for h in (
    "-0x1.fffff8p-2", "0x1.55555p-2", "-0x1.000426p-2", "0x1.99a3f6p-3", "-0x1.542766p-3",
    "0x1.22715ep-3", "-0x1.0f3756p-3", "0x1.0849bep-3", "-0x1.38339ap-4"))
SIN_COEFS = tuple(float.fromhex(h) for h in (
    "0x1.921fb6p+2", "-0x1.4abbbap+5", "0x1.465e92p+6", "-0x1.2d931p+6"))
COS_COEFS = tuple(float.fromhex(h) for h in (
    "-0x1.3bd3ccp+4", "0x1.03c1dep+6", "-0x1.55c5ep+6", "0x1.d9d57ep+5"))
LN2_HI = float.fromhex("0x1.62e4p-1")      # 8 significant bits: e * LN2_HI is exact
LN2_LO = float.fromhex("0x1.7f7d1cp-20")   # log 2 - LN2_HI


def sample_seed(seed: int, index: int) -> int:
    """The per-sample 64-bit seed of sample ``index`` of a batch seeded with ``seed``."""
    return (int(seed) & _MASK) | (int(index) << 32)


def seeds_tensor(seed, batch: int) -> torch.Tensor:
    """Per-sample seeds as an int64 tensor [batch] (the two's-complement bits of the uint64).

    ``seed`` is an int in [0, 2^32) (sample i uses ``sample_seed(seed, i)``) or a sequence of
    ``batch`` per-sample seeds in [0, 2^64).
    """
    if isinstance(seed, torch.Tensor) or type(seed).__module__ == "numpy" and \
            getattr(seed, "ndim", 0) > 0:
        seed = seed.tolist()                 # a tensor or numpy array of seeds
    if isinstance(seed, bool) or seed is None:
        raise ValueError(f"seed must be an int or a sequence of ints, got {seed!r}")
    if not isinstance(seed, int) and hasattr(seed, "__index__"):
        seed = operator.index(seed)          # numpy integers
    if isinstance(seed, int):
        if not 0 <= seed < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32) when it is one int for the batch "
                             f"(sample i then uses (seed, i)); got {seed}")
        vals = [sample_seed(seed, i) for i in range(batch)]
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        try:
            vals = [operator.index(v) for v in seed]
        except TypeError:
            raise ValueError(f"seed must be an int or a sequence of ints, got {seed!r}") from None
        if len(vals) != batch:
            raise ValueError(f"seed has {len(vals)} per-sample seeds but the batch has {batch}")
        if any(not 0 <= v < 2 ** 64 for v in vals):
            raise ValueError("per-sample seeds must be in [0, 2**64)")
    else:
        raise ValueError(f"seed must be an int or a sequence of ints, got {type(seed).__name__}")
    return torch.tensor([v - 2 ** 64 if v >= 2 ** 63 else v for v in vals], dtype=torch.int64)


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant a and uint32 words b,
    using int64 arithmetic only (16-bit split of a keeps every partial product < 2^49)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = a_lo * b                              # < 2^48
    hi = (a_hi * b + (p_lo >> 16)) >> 16         # floor(a*b / 2^32)
    lo = (a * b) & _MASK                         # wraps mod 2^64; low 32 bits exact
    return hi & _MASK, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox-4x32 on int64 tensors holding uint32 values (broadcasting); returns 4 words."""
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK
            k1 = (k1 + PHILOX_W1) & _MASK
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(seeds: torch.Tensor, step, numel: int, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals [B, numel] for per-sample ``seeds`` (int64 [B]) at draw ``step``: an
    int for the whole batch, or an int64 [B] tensor of per-sample draw numbers (sample b then
    gets exactly the normals it would get alone at draw step[b]; low 32 bits, as for an int;
    a [1] tensor is one draw number for the batch)."""
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.is_floating_point() \
            or seeds.is_complex() or seeds.dtype == torch.bool:
        got = f"{seeds.dtype} {tuple(seeds.shape)}" if isinstance(seeds, torch.Tensor) else \
            type(seeds).__name__
        raise ValueError(f"seeds must be an integer [B] tensor (int64: seeds_tensor), got {got}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an integer >= 0, got {numel!r}")
    device = device if device is not None else seeds.device
    seeds = seeds.to(device=device, dtype=torch.int64)
    B = seeds.shape[0]
    nq = (numel + 3) // 4
    q = torch.arange(nq, dtype=torch.int64, device=device)
    k0 = (seeds & _MASK).view(B, 1)
    k1 = ((seeds >> 32) & _MASK).view(B, 1)
    c0 = (q & _MASK).view(1, nq).expand(B, nq)
    c1 = ((q >> 32) & _MASK).view(1, nq).expand(B, nq)
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.dim() != 1 or step.shape[0] not in (B, 1):
            raise ValueError(f"step must be an int or an int64 [B]={B} tensor, got {step.dtype} "
                             f"{tuple(step.shape)}")
        c2 = (step.to(device) & _MASK).view(-1, 1).expand(B, nq)
    else:
        c2 = torch.full((B, nq), int(step) & _MASK, dtype=torch.int64, device=device)
    c3 = torch.zeros((B, nq), dtype=torch.int64, device=device)
    w = philox4x32(c0, c1, c2, c3, k0, k1)
    u = [uniform24(wk) for wk in w]
    z01 = box_muller(u[0], u[1])
    z23 = box_muller(u[2], u[3])
    z = torch.stack([z01[0], z01[1], z23[0], z23[1]], dim=-1)
    return z.reshape(B, 4 * nq)[:, :numel].to(dtype)


def uniform24(w: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1] from uint32 words (any integer dtype holding them):
    float32(float32(w >> 8) + 0.5) * 2^-24."""
    return ((w >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def _horner(x: torch.Tensor, coefs) -> torch.Tensor:
    p = torch.full_like(x, coefs[-1])
    for c in coefs[-2::-1]:
        p = p * x + c                   # two float32 roundings, never fused
    return p


def log_unit(u: torch.Tensor) -> torch.Tensor:
    """log u for float32 u in (0, 1]: the transform's sequence (module docstring)."""
    i = u.view(torch.int32) - 0x3F3504F3
    e = (i >> 23).to(torch.float32)
    m = ((i & 0x7FFFFF) + 0x3F3504F3).view(torch.float32)
    f = m - 1.0
    return e * LN2_HI + (e * LN2_LO + (f + (f * f) * _horner(f, LOG_COEFS)))


def sincos_turn(v: torch.Tensor):
    """(cos 2 pi v, sin 2 pi v) for float32 v in (0, 1]: the transform's sequence."""
    n = (v * 4.0 + 0.5).to(torch.int32)
    y = v - n.to(torch.float32) * 0.25
    t = y * y
    s = y * _horner(t, SIN_COEFS)
    c = 1.0 + t * _horner(t, COS_COEFS)
    swap = (n & 1) != 0
    cq, sq = torch.where(swap, s, c), torch.where(swap, c, s)
    cq = torch.where(((n + 1) & 2) != 0, -cq, cq)
    sq = torch.where((n & 2) != 0, -sq, sq)
    return cq, sq


def box_muller(u: torch.Tensor, v: torch.Tensor):
    """The two float32 normals (r cos 2 pi v, r sin 2 pi v), r = sqrt(-2 log u), of float32
    uniforms u, v in (0, 1]: the definition every backend reproduces bit for bit."""
    if u.dtype != torch.float32 or v.dtype != torch.float32:
        raise ValueError(f"box_muller takes float32 uniforms, got {u.dtype} and {v.dtype}")
    # torch's float32 sqrt is not correctly rounded on every CPU (1 ulp off for 0.7% of these
    # arguments with torch 2.13): the float64 square root rounded to float32 is (53 >= 2*24+2
    # bits, so the double rounding is innocuous)
    r = torch.sqrt((-2.0 * log_unit(u)).to(torch.float64)).to(torch.float32)
    c, s = sincos_turn(v)
    return r * c, r * s
