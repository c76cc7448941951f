"""The fused update as numba kernels over zero-copy numpy views of CPU tensors.

    out = sum_k c_k * x_k + c_z * z          aux = sum_k a_k * x_k      (k < K <= K_MAX)
    with a mask m:  out = m * out + (1 - m) * sum_k b_k * x_k            (aux unmasked)

float32 and float64 data (numpy has no bfloat16; float16 would be computed through
conversions numba cannot vectorize); the mask may be any float dtype (one in another dtype
than the compute dtype is converted first: an extra pass, exact). ``step`` may be an int64
[B] tensor of per-sample draw numbers (read once per tile). The masked kernels are separate
functions (compiled on first use), so the unmasked ones are what they were.

Kernels are generated per K = 1..K_MAX (and compute dtype, parallel or not) with the K terms
written out, so each inner loop is one fused, vectorizable expression; the source is written
to a file under ~/.cache/pyengine/numba so numba caches the compiled kernels on disk (about
2 s per kernel on first use, then a load). Each parallel task takes a tile of 4096 elements
of one sample (per-sample coefficients and seeds are loaded once per tile); every buffer is
read once, and ``out`` and ``aux_out`` may alias inputs exactly (both results of an element
are computed before either is stored). A first, simpler design kept K a runtime value (one
kernel, a tile accumulator updated once per buffer): 3.3 ms vs 1.1 ms for this one at K=3,
16x4x128x128 float32 on one thread, so the unrolled form it is.
The Philox-4x32-10 + Box-Muller noise is pyengine.noise's, bit for bit (uint64 arithmetic
masked to 32 bits; the float32 Box-Muller sequence of pyengine.noise.box_muller in
:func:`_box_muller`).

Imported only when the numba backend is first used (numba's import takes 0.3 s).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import OrderedDict

import numpy as np
import torch

from .contract import K_MAX, compute_dtype_for, has_noise

TILE = 4096                 # elements per parallel task (multiple of 4: whole Philox quads)
SERIAL_BELOW = 1 << 15      # smaller updates run on the calling thread, no pool wake-up
DTYPES = (torch.float32, torch.float64)

try:
    import numba
    from numba import njit
except ImportError as exc:          # numba is an optional dependency of the CPU path
    numba = None
    IMPORT_ERROR = f"numba is not installed ({exc})"
else:
    IMPORT_ERROR = None

_NP = {torch.float32: np.float32, torch.float64: np.float64}


# ---------------------------------------------------------------------------------------
# the kernels
# ---------------------------------------------------------------------------------------

if numba is not None:
    _M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    _W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    _MASK = np.uint64(0xFFFFFFFF)
    _S32, _S8 = np.uint64(32), np.uint64(8)

    @njit(cache=True, inline="always")
    def _philox(c0, c1, c2, c3, k0, k1):
        # uint64 holding uint32 values: a*b < 2^64, so hi = (a*b) >> 32 and lo = (a*b) & mask
        for r in range(10):
            if r:
                k0 = (k0 + _W0) & _MASK
                k1 = (k1 + _W1) & _MASK
            p0 = _M0 * c0
            p1 = _M1 * c2
            c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ k0, p1 & _MASK, (p0 >> _S32) ^ c3 ^ k1,
                              p0 & _MASK)
        return c0, c1, c2, c3

    @njit(cache=True)
    def philox_words_numba(seed_bits, step, q0, nq):
        """Words [nq, 4] (uint32 values in uint64) of quads q0.. of one sample."""
        w = np.empty((nq, 4), np.uint64)
        k0 = np.uint64(seed_bits) & _MASK
        k1 = np.uint64(seed_bits) >> _S32
        for i in range(nq):
            q = np.uint64(q0 + i)
            r = _philox(q & _MASK, q >> _S32, np.uint64(step) & _MASK, np.uint64(0), k0, k1)
            for j in range(4):
                w[i, j] = r[j]
        return w

    @njit(cache=True, inline="always")
    def _uniform(w):
        return (np.float32(w >> _S8) + np.float32(0.5)) * np.float32(5.9604644775390625e-08)

    # pyengine.noise.box_muller's float32 sequence, operation for operation (same bits; numba
    # contracts no multiply-add without fastmath). Bit casts as LLVM bitcasts.
    from numba import types as _nbt
    from numba.extending import intrinsic as _intrinsic

    from ..noise import COS_COEFS, LN2_HI, LN2_LO, LOG_COEFS, SIN_COEFS

    _LOG = tuple(np.float32(c) for c in LOG_COEFS)
    _SIN = tuple(np.float32(c) for c in SIN_COEFS)
    _COS = tuple(np.float32(c) for c in COS_COEFS)
    _LN2_HI, _LN2_LO = np.float32(LN2_HI), np.float32(LN2_LO)
    _F0, _F1, _F2, _F4 = np.float32(0.0), np.float32(1.0), np.float32(-2.0), np.float32(4.0)
    _HALF, _QUARTER = np.float32(0.5), np.float32(0.25)

    @_intrinsic
    def _f32_bits(typingctx, x):
        if x != _nbt.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(_nbt.int32))
        return _nbt.int32(_nbt.float32), codegen

    @_intrinsic
    def _bits_f32(typingctx, x):
        if x != _nbt.int32:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(_nbt.float32))
        return _nbt.float32(_nbt.int32), codegen

    @njit(cache=True, inline="always")
    def _box_muller(u, v):
        """(r cos 2 pi v, r sin 2 pi v), r = sqrt(-2 log u): pyengine.noise.box_muller."""
        i = np.int64(_f32_bits(u)) - 0x3F3504F3
        e = np.float32(i >> 23)
        m = _bits_f32(np.int32((i & 0x7FFFFF) + 0x3F3504F3))
        f = m - _F1
        p = _LOG[8] * f + _LOG[7]
        p = p * f + _LOG[6]
        p = p * f + _LOG[5]
        p = p * f + _LOG[4]
        p = p * f + _LOG[3]
        p = p * f + _LOG[2]
        p = p * f + _LOG[1]
        p = p * f + _LOG[0]
        lg = e * _LN2_HI + (e * _LN2_LO + (f + (f * f) * p))
        r = np.sqrt(_F2 * lg)
        n = np.int32(v * _F4 + _HALF)
        y = v - np.float32(n) * _QUARTER
        t = y * y
        s = y * (((_SIN[3] * t + _SIN[2]) * t + _SIN[1]) * t + _SIN[0])
        c = _F1 + t * (((_COS[3] * t + _COS[2]) * t + _COS[1]) * t + _COS[0])
        if n & 1:
            c, s = s, c
        if (n + 1) & 2:
            c = -c
        if n & 2:
            s = -s
        return r * c, r * s

    @njit(cache=True, inline="always")
    def _normals(seed, step, q):
        """The four float32 normals of quad q of the sample keyed by int64 ``seed``."""
        s = np.uint64(seed)                      # two's-complement bits of the uint64 seed
        qq = np.uint64(q)
        w0, w1, w2, w3 = _philox(qq & _MASK, qq >> _S32, np.uint64(step), np.uint64(0),
                                 s & _MASK, s >> _S32)
        z0, z1 = _box_muller(_uniform(w0), _uniform(w1))
        z2, z3 = _box_muller(_uniform(w2), _uniform(w3))
        return z0, z1, z2, z3

    @njit(cache=True)
    def normals_numba(seeds, step, numel):
        z = np.empty((seeds.shape[0], numel), np.float32)
        for b in range(seeds.shape[0]):
            for q in range((numel + 3) // 4):
                zs = _normals(seeds[b], step, q)
                for e in range(min(4, numel - 4 * q)):
                    z[b, 4 * q + e] = zs[e]
        return z


# ---------------------------------------------------------------------------------------
# the fused kernels: generated per K, written to a file so numba can cache them on disk
# ---------------------------------------------------------------------------------------

_TEMPLATE = """
@njit(parallel={parallel}, fastmath=False, cache=True)
def {fname}(out, aux, has_aux, {xs}, ct, cs, act, acs, nct, ncs, mode, seeds, steps, sts, noise,
            B, N):
    tiles = (N + TILE - 1) // TILE
    for i in {rng}(B * tiles):
        b = i // tiles
        t0 = (i - b * tiles) * TILE
        n = min(TILE, N - t0)
        base = b * N + t0
        o = out[base:base + n]
{views}
{coefs}
        av = aux[base:base + n]          # empty when there is no aux (a 1-element dummy)
{acoefs}
        if mode == 1:
            nc = {cast}(nct[b * ncs])
            stp = steps[b * sts]
            for q in range((n + 3) // 4):
                zs = _normals(seeds[b], stp, (t0 >> 2) + q)
                for e in range(min(4, n - 4 * q)):
                    j = 4 * q + e
                    s = {sum_c}
                    if has_aux:
                        av[j] = {sum_a}
                    o[j] = s + nc * {cast}(zs[e])
        elif mode == 2:
            nc = {cast}(nct[b * ncs])
            z = noise[base:base + n]
            if has_aux:
                for j in range(n):
                    s = {sum_c}
                    av[j] = {sum_a}
                    o[j] = s + nc * z[j]
            else:
                for j in range(n):
                    o[j] = {sum_c} + nc * z[j]
        elif has_aux:
            for j in range(n):
                s = {sum_c}
                av[j] = {sum_a}
                o[j] = s
        else:
            for j in range(n):
                o[j] = {sum_c}
"""

# The inpainting blend: res and base (r) from the same loads, then m res + (1 - m) base.
_TEMPLATE_MASK = """
@njit(parallel={parallel}, fastmath=False, cache=True)
def {fname}(out, aux, has_aux, {xs}, ct, cs, act, acs, mct, mcs, msk, nct, ncs, mode, seeds,
            steps, sts, noise, B, N):
    one = {cast}(1.0)
    tiles = (N + TILE - 1) // TILE
    for i in {rng}(B * tiles):
        b = i // tiles
        t0 = (i - b * tiles) * TILE
        n = min(TILE, N - t0)
        base = b * N + t0
        o = out[base:base + n]
{views}
{coefs}
        av = aux[base:base + n]          # empty when there is no aux (a 1-element dummy)
{acoefs}
{mcoefs}
        mv = msk[base:base + n]
        if mode == 1:
            nc = {cast}(nct[b * ncs])
            stp = steps[b * sts]
            for q in range((n + 3) // 4):
                zs = _normals(seeds[b], stp, (t0 >> 2) + q)
                for e in range(min(4, n - 4 * q)):
                    j = 4 * q + e
                    s = {sum_c}
                    r = {sum_m}
                    if has_aux:
                        av[j] = {sum_a}
                    s = s + nc * {cast}(zs[e])
                    m = mv[j]
                    o[j] = m * s + (one - m) * r
        elif mode == 2:
            nc = {cast}(nct[b * ncs])
            z = noise[base:base + n]
            for j in range(n):
                s = {sum_c}
                r = {sum_m}
                if has_aux:
                    av[j] = {sum_a}
                s = s + nc * z[j]
                m = mv[j]
                o[j] = m * s + (one - m) * r
        else:
            for j in range(n):
                s = {sum_c}
                r = {sum_m}
                if has_aux:
                    av[j] = {sum_a}
                m = mv[j]
                o[j] = m * s + (one - m) * r
"""


def _source() -> str:
    """One kernel per (K, compute dtype, parallel): the K terms written out, so each inner
    loop is one fused, vectorizable expression ((c0 x0 + c1 x1) + c2 x2, torch's order).
    Both sums are computed before either store: out and aux may alias inputs."""
    parts = ["import numpy as np", "from numba import njit, prange",
             "from pyengine.fused_update.numba_kernels import _normals, TILE"]
    for K in range(1, K_MAX + 1):
        for tag, cast in (("f32", "np.float32"), ("f64", "np.float64")):
            for par in (True, False):
                for masked, template in ((False, _TEMPLATE), (True, _TEMPLATE_MASK)):
                    parts.append(template.format(
                        parallel=par, rng="prange" if par else "range",
                        fname=f"k{K}_{tag}_{'par' if par else 'ser'}{'_mask' if masked else ''}",
                        cast=cast, xs=", ".join(f"x{k}" for k in range(K)),
                        views="\n".join(f"        v{k} = x{k}[base:base + n]" for k in range(K)),
                        coefs="\n".join(f"        c{k} = {cast}(ct[b * cs, {k}])"
                                         for k in range(K)),
                        acoefs="\n".join(f"        a{k} = {cast}(act[b * acs, {k}])"
                                          for k in range(K)),
                        mcoefs="\n".join(f"        m{k} = {cast}(mct[b * mcs, {k}])"
                                          for k in range(K)),
                        sum_c=" + ".join(f"c{k} * v{k}[j]" for k in range(K)),
                        sum_a=" + ".join(f"a{k} * v{k}[j]" for k in range(K)),
                        sum_m=" + ".join(f"m{k} * v{k}[j]" for k in range(K))))
    return "\n".join(parts) + "\n"


_GENERATED = None


def _generated():
    """The generated kernels' module, written once under ~/.cache/pyengine/numba (or
    $PYENGINE_CACHE_DIR) with a name hashing its source and this file, so numba's on-disk
    cache (beside it) never serves a stale kernel."""
    global _GENERATED
    if _GENERATED is None:
        import hashlib
        import importlib.util
        import tempfile
        src = _source()
        with open(__file__) as f:
            h = hashlib.sha256((src + f.read() + numba.__version__).encode())
        modname = f"pyengine_numba_kernels_{h.hexdigest()[:16]}"
        base = os.environ.get("PYENGINE_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "pyengine")
        path = None
        for d in (os.path.join(base, "numba"), os.path.join(tempfile.gettempdir(),
                                                            "pyengine-numba")):
            try:
                os.makedirs(d, exist_ok=True)
                path = os.path.join(d, modname + ".py")
                if not os.path.exists(path):
                    tmp = f"{path}.{os.getpid()}.tmp"
                    with open(tmp, "w") as f:
                        f.write(src)
                    os.replace(tmp, path)                # atomic: parallel test workers
                break
            except OSError:
                path = None
        if path is None:
            raise RuntimeError("no writable directory for the generated numba kernels")
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod          # numba's cache re-imports it by name on load
        spec.loader.exec_module(mod)
        _GENERATED = mod
    return _GENERATED


# ---------------------------------------------------------------------------------------
# zero-copy views and the call
# ---------------------------------------------------------------------------------------

_VIEWS: OrderedDict = OrderedDict()
_VIEWS_MAX = 256
_DUMMY = {}


def _view(t: torch.Tensor) -> np.ndarray:
    """A flat numpy array over ``t``'s memory (contiguous float32/float64 CPU tensor).

    The views hold raw addresses, not the tensors (no memory is kept alive); a view is only
    used while the caller holds its tensor, and a view of the same (address, size, dtype) is
    the same array whichever tensor now lives there, so they are cached by that triple.
    """
    key = (t.data_ptr(), t.numel(), t.dtype)
    v = _VIEWS.get(key)
    if v is None:
        npdt = _NP[t.dtype]
        n = t.numel()
        buf = (ctypes.c_char * (n * np.dtype(npdt).itemsize)).from_address(t.data_ptr())
        v = np.frombuffer(buf, dtype=npdt, count=n)
        _VIEWS[key] = v
        if len(_VIEWS) > _VIEWS_MAX:
            _VIEWS.popitem(last=False)
    return v


def _dummy(npdt):
    d = _DUMMY.get(npdt)
    if d is None:
        d = _DUMMY[npdt] = np.zeros(1, npdt)
    return d


def _table(coef):
    """(float64 [B or 1, K] table, row stride) of validated coefficients."""
    if isinstance(coef, torch.Tensor):
        c = coef.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        c = np.asarray(coef, dtype=np.float64)
    if c.ndim == 1:
        return np.ascontiguousarray(c.reshape(1, -1)), 0
    return np.ascontiguousarray(c), 1


def _threads(nt):
    """Run numba's pool on ``nt`` threads, leaving the caller's settings as they were: with
    the OpenMP threading layer, launching numba's pool or resizing it sets the process's
    OpenMP thread count, which is torch's (1 -> 2 on the first call). Returns what to put
    back: (torch's thread count, this thread's numba thread count)."""
    before = torch.get_num_threads(), numba.get_num_threads()
    if before[1] != nt:
        numba.set_num_threads(nt)
    return before


def _restore(before):
    if numba.get_num_threads() != before[1]:
        numba.set_num_threads(before[1])
    if torch.get_num_threads() != before[0]:
        torch.set_num_threads(before[0])


def fused_update(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise,
                 compute_dtype, mask, mask_coef):
    """Run the generated kernel for K = len(bufs) on validated arguments."""
    ref = bufs[0]
    shape = ref.shape
    B = shape[0]
    N = ref.numel() // B if B else 0
    if B * N == 0:
        return out
    K = len(bufs)
    cdt = compute_dtype_for(out.dtype, compute_dtype)
    ct, cs = _table(coef)
    act, acs = _table(aux_coef) if aux_out is not None else (ct, 0)
    mct, mcs = _table(mask_coef) if mask is not None else (ct, 0)

    # noise: Philox keyed by (seeds[b], step) or the given tensor, times a scalar or [B] c_z
    npc = _NP[cdt]
    mode, sd, nz, st, sts = 0, np.zeros(1, np.int64), _dummy(npc), np.zeros(1, np.int64), 0
    nct, ncs = np.zeros(1), 0
    keep = []
    if has_noise(noise_coef):
        if isinstance(noise_coef, torch.Tensor):
            nct, ncs = noise_coef.detach().to("cpu", torch.float64).reshape(B).numpy(), 1
        else:
            nct = np.full(1, float(noise_coef))
        if noise is not None:
            nzt = noise.to(cdt).contiguous()
            keep.append(nzt)
            mode, nz = 2, _view(nzt)
        else:
            mode, sd = 1, seeds.detach().cpu().numpy()
            if isinstance(step, torch.Tensor):  # the low 32 bits, per sample or for the batch
                st = (step.detach().cpu() & 0xFFFFFFFF).numpy()
                sts = int(step.shape[0] != 1)
            else:
                st = np.full(1, int(step) & 0xFFFFFFFF, np.int64)

    # inputs: contiguous and in one dtype (mixed float32/float64 go through the compute dtype)
    ins = [b if b.is_contiguous() and b.dtype == cdt else b.to(cdt).contiguous() for b in bufs]
    keep += ins
    views = [_view(b) for b in ins]
    o, a = out, aux_out
    copy_back = []
    if not out.is_contiguous():
        o = torch.empty(shape, dtype=out.dtype)
        copy_back.append((out, o))
    if aux_out is not None and not aux_out.is_contiguous():
        a = torch.empty(shape, dtype=aux_out.dtype)
        copy_back.append((aux_out, a))
    aview = _view(a) if a is not None else _dummy(_NP[out.dtype])
    # as many threads as torch uses (the cpp backend's rule), within numba's pool
    before = _threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    tag = "f64" if cdt == torch.float64 else "f32"
    fname = f"k{K}_{tag}_{'par' if B * N >= SERIAL_BELOW else 'ser'}"
    try:
        if mask is not None:
            mk = mask if mask.dtype == cdt and mask.is_contiguous() else \
                mask.to(cdt).contiguous()
            keep.append(mk)
            kern = getattr(_generated(), fname + "_mask")
            kern(_view(o), aview, a is not None, *views, ct, cs, act, acs, mct, mcs, _view(mk),
                 nct, ncs, mode, sd, st, sts, nz, B, N)
        else:
            kern = getattr(_generated(), fname)
            kern(_view(o), aview, a is not None, *views, ct, cs, act, acs, nct, ncs, mode, sd,
                 st, sts, nz, B, N)
    finally:
        _restore(before)
    for dst, src in copy_back:
        dst.copy_(src)
    return out


def philox_words(seed: int, step: int, nq: int, q0: int = 0) -> torch.Tensor:
    """The raw Philox-4x32-10 words of quads q0..q0+nq-1 of a sample: int64 [nq, 4]."""
    s = int(seed) & (2 ** 64 - 1)
    w = philox_words_numba(np.uint64(s), int(step) & 0xFFFFFFFF, int(q0), int(nq))
    return torch.from_numpy(w.astype(np.int64))


def philox_normal(seeds: torch.Tensor, step: int, numel: int) -> torch.Tensor:
    """float32 normals [B, numel] from the numba kernel's noise."""
    sd = seeds.to(device="cpu", dtype=torch.int64).numpy()
    return torch.from_numpy(normals_numba(sd, int(step) & 0xFFFFFFFF, int(numel)))
