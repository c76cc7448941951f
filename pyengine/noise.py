"""Counter-based, batch-invariant Gaussian noise: Philox-4x32-10 + Box-Muller.

The definition every backend reproduces bit for bit (C++, CUDA, Triton, this torch code):

* a sample's 64-bit seed gives the Philox key (k0, k1) = (seed & 0xffffffff, seed >> 32);
  an integer batch seed S gives sample i the seed ``sample_seed(S, i) = S + (i << 32)``,
* the noise draw number ``step`` of the plan and the element index j within the sample give
  the counter (c0, c1, c2, c3) = (q & 0xffffffff, q >> 32, step, 0) with q = j // 4 (a batch
  may also carry one draw number per sample: sample b then uses step[b]),
* Philox-4x32-10 (Salmon et al. 2011) turns it into four uint32 words w0..w3,
* u_k = ((w_k >> 8) + 0.5) * 2^-24 lies in (0, 1) and is exact in float32,
* Box-Muller in float32: r = sqrt(-2 log u0), theta = 2 pi u1 -> (r cos theta, r sin theta)
  for elements 4q, 4q+1; the same with (u2, u3) for 4q+2, 4q+3.

So a sample's noise depends only on its own seed, never on batch size, position or backend.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "philox4x32", "sample_seed",
           "seeds_tensor", "philox_normal"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK = 0xFFFFFFFF
_TWO_PI = 6.283185307179586


def sample_seed(seed: int, index: int) -> int:
    """The per-sample 64-bit seed of sample ``index`` of a batch seeded with ``seed``."""
    return (int(seed) & _MASK) | (int(index) << 32)


def seeds_tensor(seed, batch: int) -> torch.Tensor:
    """Per-sample seeds as an int64 tensor [batch] (the two's-complement bits of the uint64).

    ``seed`` is an int in [0, 2^32) (sample i uses ``sample_seed(seed, i)``) or a sequence of
    ``batch`` per-sample seeds in [0, 2^64).
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
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
    u = [(((wk >> 8).to(torch.float32)) + 0.5) * (2.0 ** -24) for wk in w]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    th01 = _TWO_PI * u[1]
    th23 = _TWO_PI * u[3]
    z = torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01),
                     r23 * torch.cos(th23), r23 * torch.sin(th23)], dim=-1)
    return z.reshape(B, 4 * nq)[:, :numel].to(dtype)
