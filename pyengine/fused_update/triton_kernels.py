"""The fused update as one Triton kernel (the contract of DESIGN.md s.5, noise of s.6).

Imported only when the triton backend is first used (triton's import takes about 1 s).

    out = sum_k c_k * x_k + c_z * z          aux = sum_k a_k * x_k      (k < K <= K_MAX)
    with a mask m:  out = m * out + (1 - m) * sum_k b_k * x_k            (aux unmasked)

One program handles BLOCK_Q quads (4 * BLOCK_Q elements) of one sample (grid: quads x batch),
so per-sample coefficients and seeds are one scalar load per program. The K buffers are
separate pointer arguments X0..X7 with K a constexpr (unused ones get X0 and are never
touched): Triton specializes each pointer's dtype and alignment for free, the compiler sees
plain loads it can vectorize (a device pointer table would cost a dependent load per buffer
and hide the dtypes), and the interpreter runs the same code on CPU tensors.

Coefficients: float32 scalar arguments for a per-step float32 update (baked into a captured
graph, no host->device copy per step), or a float64 table in device memory (row stride 0 for
per-step, K for per-sample [B, K]) -- always the table for float64 math, since Triton passes
Python floats as fp32. Noise: Philox-4x32-10 keyed by seeds[b] (int64 holding the uint64
bits) with counter (q lo, q hi, step, 0); seeds and step are read from device memory so a
captured graph replays with new values -- step from an int64 [1] tensor (row stride 0) or
one per sample from an int64 [B] tensor (stride 1: a batch mixing requests at different
steps of their plans). Each Philox call gives the four normals of elements 4q..4q+3, laid out
on a [BLOCK_Q, 4] tile. Loads convert bf16/fp16/fp32 to fp32 (fp64 for float64 math); stores
convert to the output's dtype.

The inpainting blend (MASK_MODE != 0, a constexpr: unmasked launches compile the same code as
before) folds base = sum_k b_k x_k from the same loads (coefficients as for aux: float32
scalars M0..M7 or a float64 table) and stores m * res + (1 - m) * base, the mask loaded in
its own dtype and converted in registers.

Under TRITON_INTERPRET=1 (read when this module is imported) the kernel is the interpreter's
and runs on CPU tensors with a fixed block; otherwise it is autotuned over BLOCK_Q x num_warps
keyed by a power-of-two size bucket, K, the modes and the dtypes. Call :func:`warmup` for the
shapes you will capture before any CUDA graph capture: tuning launches the kernel several
times and must not happen inside a capture.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .contract import K_MAX, compute_dtype_for, has_noise

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRET_BLOCK_Q = 64

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox-4x32 rounds on uint32 tensors (the key bumped between rounds)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _uniform(w):
    # (w >> 8) < 2^24 is exact in float32; + 0.5 and * 2^-24 round as the reference does
    return ((w >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def quad_words(seed, step, q):
    """The four Philox words of quads q (int64 tensor) of the sample keyed by int64 ``seed``."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((q >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = (tl.zeros_like(c0) + (step & 0xFFFFFFFF).to(tl.uint32))
    c3 = tl.zeros_like(c0)
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


# pyengine.noise.box_muller's float32 sequence, operation for operation (the same bits as every
# backend). Compiled, each product and sum goes through libdevice's mul_rn / add_rn so that the
# fp-fusion pass cannot turn a pair into an FMA; the interpreter computes each op in numpy,
# unfused, and has no libdevice.
_ROUND_EACH = tl.constexpr(not INTERPRET)


@triton.jit
def _mul(a, b):
    if _ROUND_EACH:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@triton.jit
def _add(a, b):
    if _ROUND_EACH:
        return libdevice.add_rn(a, b)
    else:
        return a + b


@triton.jit
def _box_muller(u, v):
    """(r cos 2 pi v, r sin 2 pi v), r = sqrt(-2 log u), for float32 uniform tensors."""
    i = u.to(tl.int32, bitcast=True) - 0x3F3504F3
    e = (i >> 23).to(tl.float32)
    m = ((i & 0x7FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True)
    f = m - 1.0                                  # exact (Sterbenz): no rounding to pin
    p = _add(_mul(f, -0.07622108608484268), 0.12904690206050873)
    p = _add(_mul(p, f), -0.13242976367473602)
    p = _add(_mul(p, f), 0.14181779325008392)
    p = _add(_mul(p, f), -0.16609077155590057)
    p = _add(_mul(p, f), 0.20001976191997528)
    p = _add(_mul(p, f), -0.25001582503318787)
    p = _add(_mul(p, f), 0.33333325386047363)
    p = _add(_mul(p, f), -0.49999988079071045)
    lg = _add(_mul(e, 0.693145751953125),
              _add(_mul(e, 1.428606765330187e-06), _add(f, _mul(_mul(f, f), p))))
    r = tl.sqrt_rn(-2.0 * lg)                    # * -2 is exact
    n = _add(_mul(v, 4.0), 0.5).to(tl.int32)
    y = v - n.to(tl.float32) * 0.25              # both exact
    t = _mul(y, y)
    sn = _add(_mul(t, -75.39361572265625), 81.59235382080078)
    sn = _add(_mul(sn, t), -41.3416633605957)
    sn = _mul(y, _add(_mul(sn, t), 6.2831854820251465))
    cs = _add(_mul(t, 59.229244232177734), -85.4432373046875)
    cs = _add(_mul(cs, t), 64.93932342529297)
    cs = _add(1.0, _mul(t, _add(_mul(cs, t), -19.739208221435547)))
    odd = (n & 1) != 0
    c = tl.where(odd, sn, cs)
    s = tl.where(odd, cs, sn)
    c = tl.where(((n + 1) & 2) != 0, -c, c)
    s = tl.where((n & 2) != 0, -s, s)
    return _mul(r, c), _mul(r, s)


@triton.jit
def _normals(seed, step, q, e):
    """The normals of elements 4q + e on a [BLOCK_Q, 4] tile (e = arange(4)[None, :])."""
    w0, w1, w2, w3 = quad_words(seed, step, q)
    z0, z1 = _box_muller(_uniform(w0), _uniform(w1))
    z2, z3 = _box_muller(_uniform(w2), _uniform(w3))
    z0 = z0[:, None]
    z1 = z1[:, None]
    z2 = z2[:, None]
    z3 = z3[:, None]
    return tl.where(e == 0, z0, tl.where(e == 1, z1, tl.where(e == 2, z2, z3)))


@triton.jit
def _coef(C, T, row, k: tl.constexpr, TABLE: tl.constexpr, CDT: tl.constexpr):
    if TABLE:
        return tl.load(T + row + k).to(CDT)
    else:
        return tl.cast(C, CDT)


@triton.jit
def _term(acc, aacc, bacc, X, off, mask, C, A, M, CT, ACT, MCT, crow, arow, mrow,
          k: tl.constexpr, COEF_TABLE: tl.constexpr, AUX_MODE: tl.constexpr,
          MASK_MODE: tl.constexpr, CDT: tl.constexpr):
    """acc += c_k x_k (and aacc += a_k x_k, bacc += b_k x_k) with x_k loaded once."""
    x = tl.load(X + off, mask=mask, other=0.0).to(CDT)
    c = _coef(C, CT, crow, k, COEF_TABLE, CDT)
    if k == 0:
        acc = x * c
    else:
        acc = acc + x * c
    if AUX_MODE != 0:
        a = _coef(A, ACT, arow, k, AUX_MODE == 2, CDT)
        if k == 0:
            aacc = x * a
        else:
            aacc = aacc + x * a
    if MASK_MODE != 0:
        bm = _coef(M, MCT, mrow, k, MASK_MODE == 2, CDT)
        if k == 0:
            bacc = x * bm
        else:
            bacc = bacc + x * bm
    return acc, aacc, bacc


@triton.jit
def fused_update_kernel(
        OUT, AUX, X0, X1, X2, X3, X4, X5, X6, X7,
        C0, C1, C2, C3, C4, C5, C6, C7,             # per-step float32 coefficients
        A0, A1, A2, A3, A4, A5, A6, A7,             # per-step float32 aux coefficients
        M0, M1, M2, M3, M4, M5, M6, M7,             # per-step float32 mask (base) coefficients
        CT, ACT, MCT, cs, acs, mcs,                  # float64 tables and their row strides
        NC, NCT, ncs,                                # noise coefficient: scalar, table, stride
        SEEDS, STEP, sts, NOISE, MASK, N, SIZE_BUCKET,
        K: tl.constexpr, COEF_TABLE: tl.constexpr, AUX_MODE: tl.constexpr,
        NOISE_MODE: tl.constexpr, NC_TABLE: tl.constexpr, MASK_MODE: tl.constexpr,
        CDT: tl.constexpr, BLOCK_Q: tl.constexpr):
    """AUX_MODE and MASK_MODE 0 none, 1 scalars, 2 table; NOISE_MODE 0 none, 1 Philox, 2 the
    NOISE tensor. STEP holds one draw number (sts 0) or one per sample (sts 1). MASK is the
    blend's mask tensor (``mask`` below is the bounds mask of the tile). SIZE_BUCKET (unused in
    the body) is the autotuning key."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q = pid.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    e = tl.arange(0, 4)[None, :]
    idx = q[:, None] * 4 + e
    mask = idx < N
    off = b * N + idx
    crow = b * cs
    arow = b * acs
    mrow = b * mcs
    # sum_k c_k x_k, one load per buffer element, in buffer order
    acc = tl.zeros([BLOCK_Q, 4], CDT)
    aacc = tl.zeros([BLOCK_Q, 4], CDT)
    bacc = tl.zeros([BLOCK_Q, 4], CDT)
    acc, aacc, bacc = _term(acc, aacc, bacc, X0, off, mask, C0, A0, M0, CT, ACT, MCT,
                            crow, arow, mrow, 0, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 1:
        acc, aacc, bacc = _term(acc, aacc, bacc, X1, off, mask, C1, A1, M1, CT, ACT, MCT,
                                crow, arow, mrow, 1, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 2:
        acc, aacc, bacc = _term(acc, aacc, bacc, X2, off, mask, C2, A2, M2, CT, ACT, MCT,
                                crow, arow, mrow, 2, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 3:
        acc, aacc, bacc = _term(acc, aacc, bacc, X3, off, mask, C3, A3, M3, CT, ACT, MCT,
                                crow, arow, mrow, 3, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 4:
        acc, aacc, bacc = _term(acc, aacc, bacc, X4, off, mask, C4, A4, M4, CT, ACT, MCT,
                                crow, arow, mrow, 4, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 5:
        acc, aacc, bacc = _term(acc, aacc, bacc, X5, off, mask, C5, A5, M5, CT, ACT, MCT,
                                crow, arow, mrow, 5, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 6:
        acc, aacc, bacc = _term(acc, aacc, bacc, X6, off, mask, C6, A6, M6, CT, ACT, MCT,
                                crow, arow, mrow, 6, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    if K > 7:
        acc, aacc, bacc = _term(acc, aacc, bacc, X7, off, mask, C7, A7, M7, CT, ACT, MCT,
                                crow, arow, mrow, 7, COEF_TABLE, AUX_MODE, MASK_MODE, CDT)
    # + c_z z: in-register Philox normals, or the given noise tensor
    if NOISE_MODE != 0:
        if NC_TABLE:
            nc = tl.load(NCT + b * ncs).to(CDT)
        else:
            nc = tl.cast(NC, CDT)
        if NOISE_MODE == 1:
            z = _normals(tl.load(SEEDS + b), tl.load(STEP + b * sts), q, e).to(CDT)
        else:
            z = tl.load(NOISE + off, mask=mask, other=0.0).to(CDT)
        acc = acc + nc * z
    # the inpainting blend with the known region: m res + (1 - m) base
    if MASK_MODE != 0:
        m = tl.load(MASK + off, mask=mask, other=0.0).to(CDT)
        acc = m * acc + (1.0 - m) * bacc
    # the stores come after every load of this tile: out may alias an input
    tl.store(OUT + off, acc.to(OUT.dtype.element_ty), mask=mask)
    if AUX_MODE != 0:
        tl.store(AUX + off, aacc.to(AUX.dtype.element_ty), mask=mask)


@triton.jit
def philox_words_kernel(W, seed_ptr, step_ptr, q0, nq, BLOCK: tl.constexpr):
    """W[i, 0..3] = the words of quad q0 + i (int64 holding uint32) -- for the bit tests."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < nq
    q = q0 + i.to(tl.int64)
    w0, w1, w2, w3 = quad_words(tl.load(seed_ptr), tl.load(step_ptr), q)
    tl.store(W + i * 4 + 0, w0.to(tl.int64), mask=m)
    tl.store(W + i * 4 + 1, w1.to(tl.int64), mask=m)
    tl.store(W + i * 4 + 2, w2.to(tl.int64), mask=m)
    tl.store(W + i * 4 + 3, w3.to(tl.int64), mask=m)


# the launched kernel: autotuned when compiled, fixed block in the interpreter (its autotuner
# would time configs with CUDA events)
if INTERPRET:
    _launchable = fused_update_kernel
else:
    _launchable = triton.autotune(
        configs=[triton.Config({"BLOCK_Q": bq}, num_warps=w)
                 for bq in (128, 256, 512, 1024) for w in (4, 8)],
        key=["SIZE_BUCKET", "K", "COEF_TABLE", "AUX_MODE", "NOISE_MODE", "NC_TABLE", "MASK_MODE",
             "CDT"],
        restore_value=["OUT", "AUX"],        # tuning reruns the kernel; out may alias x_k
    )(fused_update_kernel)


def size_bucket(numel: int) -> int:
    """The autotuning key for ``numel`` elements: a power of two in [2^12, 2^26]."""
    return 1 << max(12, min(26, (max(int(numel), 1) - 1).bit_length()))


def _grid(N, B):
    def grid(meta):
        return (triton.cdiv(triton.cdiv(N, 4), meta["BLOCK_Q"]), B)
    return grid


def launch(out, bufs, coef_vals, coef_table, aux_out, aux_vals, aux_table, noise_mode,
           nc_scalar, nc_table, seeds, step, noise, f64: bool, mask=None, mask_vals=(),
           mask_table=None, kernel=None):
    """Launch on prepared arguments (see :func:`prepare`):
    contiguous tensors; coef_table float64 [B or 1, K] or None (then coef_vals); the same for
    aux and for the mask's base coefficients (mask_table / mask_vals, with a mask tensor);
    nc_table float64 [B] or None (then nc_scalar); seeds int64 [B] and step int64 [1] or [B]
    tensors (noise_mode 1) or noise (noise_mode 2)."""
    B = out.shape[0]
    N = out.numel() // B
    K = len(bufs)
    xs = list(bufs) + [bufs[0]] * (K_MAX - K)
    cv = [float(v) for v in coef_vals] + [0.0] * (K_MAX - len(coef_vals))
    av = [float(v) for v in aux_vals] + [0.0] * (K_MAX - len(aux_vals))
    mv = [float(v) for v in mask_vals] + [0.0] * (K_MAX - len(mask_vals))
    dummy = out
    cs = 0 if coef_table is None or coef_table.shape[0] == 1 else K
    acs = 0 if aux_table is None or aux_table.shape[0] == 1 else K
    mcs = 0 if mask_table is None or mask_table.shape[0] == 1 else K
    ncs = 0 if nc_table is None or nc_table.numel() == 1 else 1
    sts = 0 if step is None or step.numel() == 1 else 1
    aux_mode = 0 if aux_out is None else (2 if aux_table is not None else 1)
    mask_mode = 0 if mask is None else (2 if mask_table is not None else 1)
    meta = {"K": K, "COEF_TABLE": coef_table is not None, "AUX_MODE": aux_mode,
            "NOISE_MODE": noise_mode, "NC_TABLE": nc_table is not None, "MASK_MODE": mask_mode,
            "CDT": tl.float64 if f64 else tl.float32}
    if INTERPRET:
        meta["BLOCK_Q"] = INTERPRET_BLOCK_Q
    kernel = kernel if kernel is not None else _launchable
    kernel[_grid(N, B)](
        out, aux_out if aux_out is not None else dummy, *xs, *cv, *av, *mv,
        coef_table if coef_table is not None else dummy,
        aux_table if aux_table is not None else dummy,
        mask_table if mask_table is not None else dummy, cs, acs, mcs,
        float(nc_scalar), nc_table if nc_table is not None else dummy, ncs,
        seeds if seeds is not None else dummy, step if step is not None else dummy, sts,
        noise if noise is not None else dummy, mask if mask is not None else dummy,
        N, size_bucket(B * N), **meta)


def philox_words(seed: int, step: int, nq: int, q0: int = 0, device="cuda") -> torch.Tensor:
    """The words of quads q0..q0+nq-1 as int64 [nq, 4], computed by the Triton Philox."""
    s = int(seed) & (2 ** 64 - 1)
    seed_t = torch.tensor([s - 2 ** 64 if s >= 2 ** 63 else s], dtype=torch.int64, device=device)
    step_t = torch.tensor([int(step) & 0xFFFFFFFF], dtype=torch.int64, device=device)
    w = torch.empty((nq, 4), dtype=torch.int64, device=device)
    philox_words_kernel[(triton.cdiv(nq, 128),)](w, seed_t, step_t, int(q0), nq, BLOCK=128)
    return w


# ---------------------------------------------------------------------------------------
# torch.compile: the kernel as a Triton op (traced through, fused into the compiled graph)
# ---------------------------------------------------------------------------------------

_op_kernel = _launchable if INTERPRET else torch.library.wrap_triton(_launchable)


@torch.library.triton_op("pyengine::triton_fused_update", mutates_args={"out", "aux_out"})
def triton_fused_update(out: torch.Tensor, bufs: list[torch.Tensor], coef_vals: list[float],
                        coef_table: torch.Tensor | None, aux_out: torch.Tensor | None,
                        aux_vals: list[float], aux_table: torch.Tensor | None,
                        noise_mode: int, nc_scalar: float, nc_table: torch.Tensor | None,
                        seeds: torch.Tensor | None, step: torch.Tensor | None,
                        noise: torch.Tensor | None, f64: bool, mask: torch.Tensor | None,
                        mask_vals: list[float], mask_table: torch.Tensor | None) -> None:
    launch(out, bufs, coef_vals, coef_table, aux_out, aux_vals, aux_table, noise_mode,
           nc_scalar, nc_table, seeds, step, noise, f64, mask, mask_vals, mask_table,
           kernel=_op_kernel)


# ---------------------------------------------------------------------------------------
# marshalling validated contract arguments (pyengine.fused_update.validate) into launch()'s
# ---------------------------------------------------------------------------------------

_STEPS: dict = {}


def _step_tensor(step, device):
    """An int64 [1] device tensor holding ``step``, cached per (device, step): made once, in
    the eager warm-up run, never during a capture."""
    key = (str(device), int(step))
    t = _STEPS.get(key)
    if t is None:
        t = _STEPS[key] = torch.tensor([int(step) & 0xFFFFFFFF], dtype=torch.int64,
                                       device=device)
    return t


def _coefficients(coef, device, f64):
    """(per-step floats, None) or (None, float64 [B, K] table); float64 math always reads a
    table (Triton passes Python floats as fp32)."""
    if isinstance(coef, torch.Tensor):
        if coef.dim() == 2:
            return None, coef.to(device=device, dtype=torch.float64).contiguous()
        vals = coef.tolist()
    else:
        c = np.asarray(coef, dtype=np.float64)
        if c.ndim == 2:
            return None, torch.from_numpy(np.ascontiguousarray(c)).to(device)
        vals = c.tolist()
    if f64:
        return None, torch.tensor([vals], dtype=torch.float64, device=device)
    return vals, None


def prepare(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise, compute_dtype,
            mask, mask_coef):
    """(launch arguments, copy-backs) for a validated call, or None when it is empty."""
    ref = bufs[0]
    if ref.numel() == 0:
        return None
    shape, device = ref.shape, ref.device
    B = shape[0]
    f64 = compute_dtype_for(out.dtype, compute_dtype) == torch.float64
    cv, ct = _coefficients(coef, device, f64)
    av, at = _coefficients(aux_coef, device, f64) if aux_out is not None else ([], None)
    mv, mt = _coefficients(mask_coef, device, f64) if mask is not None else ([], None)
    nc_table, nc_scalar, mode, st, sd, nz = None, 0.0, 0, None, None, None
    if has_noise(noise_coef):
        if isinstance(noise_coef, torch.Tensor):
            nc_table = noise_coef.to(device=device, dtype=torch.float64).reshape(B).contiguous()
        else:
            nc_scalar = float(noise_coef)
            if f64:
                nc_table = torch.tensor([nc_scalar], dtype=torch.float64, device=device)
        if noise is not None:
            mode, nz = 2, noise.contiguous()
        else:
            mode, sd = 1, seeds.to(device).contiguous()
            st = step.to(device).contiguous() if isinstance(step, torch.Tensor) \
                else _step_tensor(step, device)
    mk = None
    if mask is not None:
        mk = mask.contiguous()
        if device.type == "cpu" and mk.dtype not in (torch.float32, torch.float64):
            mk = mk.float()            # the interpreter has no half types; exact
    ins = [b.contiguous() for b in bufs]
    copy_back = []
    o, a = out, aux_out
    if not out.is_contiguous():
        o = torch.empty(shape, dtype=out.dtype, device=device)
        copy_back.append((out, o))
    if aux_out is not None and not aux_out.is_contiguous():
        a = torch.empty(shape, dtype=aux_out.dtype, device=device)
        copy_back.append((aux_out, a))
    args = (o, ins, cv or [], ct, a, av or [], at, mode, nc_scalar, nc_table, sd, st, nz, f64,
            mk, mv or [], mt)
    return args, copy_back


def fused_update(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                 compute_dtype, mask, mask_coef, *, op: bool = False):
    """Launch on validated arguments; ``op``: through ``torch.ops.pyengine.triton_fused_update``
    (traceable by torch.compile, which sees the Triton kernel itself)."""
    prep = prepare(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                   compute_dtype, mask, mask_coef)
    if prep is None:
        return out
    args, copy_back = prep
    if op:
        torch.ops.pyengine.triton_fused_update(*args)
    else:
        launch(*args)
    for dst, src in copy_back:
        dst.copy_(src)
    return out


def warmup(device="cuda", dtypes=(torch.float32,), Ks=(2, 3, 4), numels=(4 * 4 * 64 * 64,),
           noise_modes=(0, 1), aux=(False, True), masks=(False,)):
    """Run (and so autotune) the kernel for these configurations on scratch tensors: call it
    before capturing a CUDA graph. Per-step float32 coefficients; float64 uses tables;
    ``masks=(False, True)`` tunes the inpainting blend too (a mask in the data's dtype)."""
    for dt in dtypes:
        f64 = dt == torch.float64
        for n in numels:
            for K in Ks:
                xs = [torch.zeros((1, n), dtype=dt, device=device) for _ in range(K)]
                out = torch.empty_like(xs[0])
                seeds = torch.zeros(1, dtype=torch.int64, device=device)
                step = torch.zeros(1, dtype=torch.int64, device=device)
                table = torch.zeros((1, K), dtype=torch.float64, device=device) if f64 else None
                nct = torch.zeros(1, dtype=torch.float64, device=device) if f64 else None
                for nm in noise_modes:
                    for a in aux:
                        for mk in masks:
                            launch(out, xs, [0.0] * K, table,
                                   torch.empty_like(out) if a else None,
                                   [0.0] * K if a else [], table if a else None, nm, 0.0, nct,
                                   seeds, step, None, f64, torch.zeros_like(out) if mk else None,
                                   [0.0] * K if mk else [], table if mk else None)
