"""The compiled loop: a plan device-resident and, on CUDA, captured in one CUDA graph.

:class:`CompiledLoop` (``Sampler.compile``) lays the plan out in device memory
(:class:`~pyengine.runtime.tables.DeviceTables`), keeps static input and output buffers, and
runs the one walk (:class:`~pyengine.runtime.walk.Walker`) over them; on CUDA that walk --
model calls and fused updates of every step -- is captured once into a CUDA graph and
replayed per call. Nothing in the loop reads a device value on the host, so it never
synchronizes. New noise, seeds, img2img data and masks are copied into the static buffers;
a plan with the same structure (another schedule or guidance scale) rewrites the tables in
place. Loops live in a bounded LRU cache (:data:`graph_cache`). A model that cannot be
captured runs the same loop eagerly after one warning that says why; CPU devices always run
it eagerly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict

import numpy as np
import torch

from .. import backends
from ..errors import as_device, check_callable, check_int, check_kwargs, check_tensor
from ..noise import seeds_tensor
from ..parameterization import ModelAdapter
from ..plan import Plan
from .tables import DeviceTables, plan_signature
from .transforms import KNOWN, KNOWN_NOISE, check_state_dtype
from .walk import PhiloxDraws, Program, Walker

__all__ = ["CompiledLoop", "GraphCache", "compile_plan", "graph_cache"]


class _Loop:
    """The device-resident loop of one plan structure: static buffers, tables, one body."""

    def __init__(self, plan: Plan, model, shape, dtype, device, backend, extra_args,
                 compute_dtype, start):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        B = self.shape[0]
        self.program = Program.of(plan)
        self.tables = DeviceTables(plan, B, self.device, dtype)
        self.noise_in = torch.zeros(self.shape, dtype=dtype, device=self.device)
        # start: ("noise", None) -> x = noise * scale; ("init", (sigma0, s0)) -> img2img
        self.start = start
        self.init_in = self.mask_in = None
        if start[0] == "init":
            self.init_in = torch.zeros(self.shape, dtype=dtype, device=self.device)
        if any(u.mask_coefs is not None for u in self.program.updates):
            self.mask_in = torch.ones(self.shape, dtype=dtype, device=self.device)
        self.scale = torch.ones((), dtype=dtype, device=self.device)
        self.seeds = torch.zeros(B, dtype=torch.int64, device=self.device)
        self._seed_base = torch.arange(B, dtype=torch.int64, device=self.device) << 32
        self.extra = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in (extra_args or {}).items()}
        # (tensor, version) last copied into each static extra_args buffer
        self.extra_from = {k: (v, v._version) for k, v in (extra_args or {}).items()
                           if isinstance(v, torch.Tensor)}
        self.adapter = ModelAdapter(model, self.extra)
        self.backend = backend
        self.compute_dtype = compute_dtype
        self.scale_value = None

    def load(self, plan: Plan, init_scale: float) -> None:
        self.tables.load(plan)
        if self.scale_value != init_scale:
            self.scale.fill_(init_scale)
            self.scale_value = init_scale

    def set_seeds(self, seed) -> None:
        B = self.shape[0]
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) \
                and 0 <= int(seed) < 2 ** 32:
            # sample i's key is (seed, i) (pyengine.noise.sample_seed): made on the device
            torch.add(self._seed_base, int(seed), out=self.seeds)
        else:
            host = seeds_tensor(seed, B)          # validates; raises ValueError naming seed
            if self.seeds.is_cuda:
                self.seeds.copy_(host.pin_memory(), non_blocking=True)
            else:
                self.seeds.copy_(host)

    def check_extra(self, extra_args) -> None:
        for k, v in (extra_args or {}).items():
            if k not in self.extra:
                raise ValueError(f"extra_args[{k!r}] was not given when the loop was compiled "
                                 f"(compiled with {sorted(self.extra)})")
            cur = self.extra[k]
            if isinstance(cur, torch.Tensor):
                if not isinstance(v, torch.Tensor) or v.shape != cur.shape:
                    raise ValueError(f"extra_args[{k!r}] must be a tensor of shape "
                                     f"{tuple(cur.shape)} (as compiled)")
            elif not same_value(v, cur):
                raise ValueError(f"extra_args[{k!r}] differs from the compiled value; non-tensor "
                                 f"arguments are baked into the loop")

    def set_extra(self, extra_args) -> None:
        """Copy the call's tensor ``extra_args`` into the static buffers (skipped for a
        tensor copied last time and not written since)."""
        for k, v in (extra_args or {}).items():
            if isinstance(self.extra[k], torch.Tensor):
                last = self.extra_from.get(k)
                if last is None or last[0] is not v or last[1] != v._version:
                    self.extra[k].copy_(v)
                    self.extra_from[k] = (v, v._version)

    def body(self) -> torch.Tensor:
        """The whole loop, from the static inputs to the output slot (what gets captured)."""
        if self.start[0] == "init":
            sigma0, s0 = self.start[1]
            x = (self.init_in + sigma0 * self.noise_in) * s0
        else:
            x = self.noise_in * self.scale
        inputs = {}
        if self.mask_in is not None:
            inputs = {KNOWN: self.init_in, KNOWN_NOISE: self.noise_in}
        w = Walker(self.program, self.adapter, self.backend, numbers=self.tables,
                   noise=PhiloxDraws(self.seeds), compute_dtype=self.compute_dtype,
                   mask=self.mask_in)
        return w.start(x, inputs, own=True).run()


def _graph_capable(device: torch.device) -> str | None:
    """None when a loop on ``device`` can be captured, else why not."""
    if device.type != "cuda":
        return f"{device.type} devices run the loop eagerly (CUDA graphs are a CUDA feature)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _capture(loop: _Loop, warmup: int):
    """Warm the loop up on a side stream (allocations, cuBLAS/cuDNN choices, Triton autotuning
    all happen there), then capture one run of it into a CUDA graph."""
    dev = loop.device
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        for _ in range(max(1, int(warmup))):
            loop.body()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = loop.body()
    return graph, out


class _Entry:
    """A cached compiled loop: the device-resident loop and, when captured, its graph."""

    def __init__(self, loop: _Loop, graph=None, out=None, fallback_reason=None):
        self.loop, self.graph, self.out = loop, graph, out
        self.fallback_reason = fallback_reason
        self.released = False

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.out
        return self.loop.body()

    def release(self) -> None:
        """Drop the graph (its memory pool goes back to the allocator), the static buffers and
        the reference to the model."""
        self.graph = self.out = self.loop = None
        self.released = True


class GraphCache:
    """A bounded LRU cache of compiled loops; the least recently used is released when a new
    one would exceed ``maxsize`` (``$PYENGINE_GRAPH_CACHE``, default 8)."""

    def __init__(self, maxsize: int = 8):
        self._entries: OrderedDict = OrderedDict()
        self.maxsize = 1
        self.resize(maxsize)

    def resize(self, maxsize: int) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive integer, got {maxsize!r}")
        self.maxsize = maxsize
        self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.maxsize:
            _, entry = self._entries.popitem(last=False)
            entry.release()

    def get(self, key):
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key, entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None and old is not entry:
            old.release()
        self._entries[key] = entry
        self._evict()

    def clear(self) -> None:
        while self._entries:
            self._entries.popitem(last=False)[1].release()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries


def _cache_size_from_env() -> int:
    raw = os.environ.get("PYENGINE_GRAPH_CACHE", "8")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        warnings.warn(f"PYENGINE_GRAPH_CACHE={raw!r} is not a positive integer; using 8",
                      RuntimeWarning, stacklevel=2)
        n = 8
    return n


#: The process-wide cache of compiled loops (``graph_cache.resize(n)``, ``.clear()``).
graph_cache = GraphCache(_cache_size_from_env())


def _plain(v) -> bool:
    """A value whose repr determines it (numbers, strings, None, containers of them)."""
    if v is None or type(v) in (bool, int, float, complex, str, bytes, torch.dtype,
                                torch.device) or isinstance(v, np.generic):
        return True
    if type(v) in (tuple, list, frozenset):
        return all(_plain(u) for u in v)
    if type(v) is dict:
        return all(_plain(a) and _plain(u) for a, u in v.items())
    return False


def same_value(a, b) -> bool:
    """Whether two non-row model arguments are the same value: the same type (and for
    tensors dtype, device and shape) and equal; incomparable values differ."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor) and (a.dtype != b.dtype or a.device != b.device
                                        or a.shape != b.shape):
        return False
    try:
        return bool(a == b)
    except Exception:                              # noqa: BLE001 -- incomparable: differ
        return False


def _extra_signature(extra_args) -> tuple:
    # A non-tensor value is baked into the loop: keyed by its repr where that determines it,
    # else by identity (a summarized repr -- a large array or a list of tensors -- would let
    # another value share the loop; the loop holds the value, so its id stays its own).
    out = []
    for k, v in sorted((extra_args or {}).items()):
        if isinstance(v, torch.Tensor):
            out.append((k, "tensor", tuple(v.shape), v.dtype, str(v.device)))
        elif _plain(v):
            out.append((k, "value", repr(v)))
        else:
            out.append((k, "object", id(v)))
    return tuple(out)


def _static_tensor(name: str, t, shape, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    check_tensor(name, t, batch=False, floating=False)
    try:
        return torch.broadcast_to(t.to(device), shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the "
                         f"compiled shape {shape}") from None


class CompiledLoop:
    """What :meth:`pyengine.Sampler.compile` returns: call it with standard-normal noise of the
    compiled shape (and a seed) to get samples.

    >>> fn = sampler.compile(unet, (8, 4, 64, 64), torch.float16, "cuda")
    >>> x0 = fn(torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.float16), seed=7)

    A loop compiled for img2img (``init=``/``strength=``) or inpainting (``mask=``) takes
    ``init=`` and ``mask=`` per call too (else the compiled ones are used). ``captured`` says
    whether the whole loop replays as one CUDA graph; ``fallback_reason`` why not (None when
    captured). The returned tensor is a fresh copy of the static output.
    """

    def __init__(self, plan: Plan, model, shape, dtype, device, *, init_noise_scale: float,
                 backend=None, capture: bool | None = None, extra_args=None,
                 compute_dtype=None, warmup: int = 2, cache: GraphCache | None = None,
                 start=("noise", None), init=None, mask=None):
        check_callable("model", model)
        if isinstance(shape, torch.Size):
            shape = tuple(shape)
        if not isinstance(shape, (tuple, list)) or not all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"shape must be a sequence of ints [B, ...], got {shape!r}")
        shape = tuple(int(d) for d in shape)
        if len(shape) < 1 or any(d < 1 for d in shape):
            raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        warmup = check_int("warmup", warmup, lo=0)
        if cache is not None and not (hasattr(cache, "get") and hasattr(cache, "put")):
            raise ValueError(f"cache must be a pe.runtime.GraphCache or None, got "
                             f"{type(cache).__name__}")
        device = as_device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        why = _graph_capable(device)
        if capture is None:
            capture = why is None
        elif capture and why is not None:
            raise ValueError(f"capture=True is impossible here: {why}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got "
                             f"{compute_dtype}")
        check_kwargs("extra_args", extra_args)
        if not math.isfinite(float(init_noise_scale)):
            raise ValueError(f"init_noise_scale must be finite, got {init_noise_scale!r}")
        check_state_dtype(plan, dtype)
        self.plan, self.model = plan, model
        self.shape, self.dtype, self.device = shape, dtype, device
        self.init_noise_scale = float(init_noise_scale)
        self.capture = bool(capture)
        self.warmup = warmup
        self.compute_dtype = compute_dtype
        self.start = start
        self.inpaint = any(getattr(op, "mask_coefs", None) is not None for op in plan.ops)
        self.init = None if init is None else _static_tensor("init", init, shape, device)
        self.mask = None if mask is None else _static_tensor("mask", mask, shape, device)
        self.backend = (backend if hasattr(backend, "fused_update") else
                        backends.get(backend, device=device, dtype=dtype))
        self.extra_args = dict(extra_args or {})
        self.cache = graph_cache if cache is None else cache
        self.key = (id(model), shape, dtype, str(device), self.backend.name, compute_dtype,
                    self.capture, plan_signature(plan), start,
                    _extra_signature(self.extra_args))

    # -- the cache entry -------------------------------------------------------------------
    def _entry(self) -> _Entry:
        entry = self.cache.get(self.key)
        if entry is not None and not entry.released:
            return entry
        loop = _Loop(self.plan, self.model, self.shape, self.dtype, self.device, self.backend,
                     self.extra_args, self.compute_dtype, self.start)
        loop.load(self.plan, self.init_noise_scale)
        entry = _Entry(loop)
        if self.capture:
            try:
                entry.graph, entry.out = _capture(loop, self.warmup)
            except Exception as exc:                   # noqa: BLE001 -- any capture failure
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                reason = f"{type(exc).__name__}: {first}"
                try:
                    torch.cuda.synchronize(self.device)
                except Exception:                      # noqa: BLE001
                    pass
                entry.graph = entry.out = None
                entry.fallback_reason = reason
                warnings.warn(f"pyengine: the sampling loop could not be captured in a CUDA graph "
                              f"({reason}); running it eagerly", RuntimeWarning, stacklevel=3)
        else:
            entry.fallback_reason = _graph_capable(self.device) or "capture=False"
        self.cache.put(self.key, entry)
        return entry

    @property
    def captured(self) -> bool:
        entry = self.cache.get(self.key)
        return bool(entry is not None and entry.graph is not None)

    @property
    def fallback_reason(self) -> str | None:
        entry = self.cache.get(self.key)
        if entry is None:
            return None if self.capture else (_graph_capable(self.device) or "capture=False")
        return entry.fallback_reason

    def prepare(self) -> CompiledLoop:
        """Build (and capture) now instead of on the first call; returns self."""
        self._entry()
        return self

    def __call__(self, noise: torch.Tensor, seed=0, *, extra_args=None, init=None,
                 mask=None) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if tuple(noise.shape) != self.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; this loop was compiled for "
                             f"{self.shape}")
        if noise.device != self.device:
            raise ValueError(f"noise is on {noise.device}; this loop was compiled for "
                             f"{self.device}")
        if not noise.is_floating_point():
            raise ValueError(f"noise must be a floating tensor, got {noise.dtype}")
        # Validate everything before any static buffer is written.
        if init is not None:
            if self.start[0] != "init":
                raise ValueError("init= was given to a loop compiled without init= (compile "
                                 "with init= and strength= for img2img)")
            init = _static_tensor("init", init, self.shape, self.device)
        if mask is not None:
            if not self.inpaint:
                raise ValueError("mask= was given to a loop compiled without mask= (compile "
                                 "with mask= for inpainting)")
            mask = _static_tensor("mask", mask, self.shape, self.device)
        init = self.init if init is None else init
        mask = self.mask if mask is None else mask
        if self.start[0] == "init" and init is None:
            raise ValueError("this loop was compiled for img2img: give init=")
        if self.inpaint and mask is None:
            raise ValueError("this loop was compiled for inpainting: give mask=")
        check_kwargs("extra_args", extra_args)
        entry = self._entry()
        loop = entry.loop
        loop.check_extra(extra_args)
        loop.set_seeds(seed)                 # validates before it writes
        # this loop's own tensor defaults where the call gives none: the static buffers are
        # shared by every CompiledLoop of the cache entry and keep the last call's values
        loop.set_extra({**self.extra_args, **(extra_args or {})})
        loop.load(self.plan, self.init_noise_scale)
        loop.noise_in.copy_(noise)
        if loop.init_in is not None:
            loop.init_in.copy_(init)
        if loop.mask_in is not None:
            loop.mask_in.copy_(mask)
        return entry.run().clone()

    def __repr__(self) -> str:
        mode = "graph" if self.captured else "eager"
        return (f"CompiledLoop({self.plan.solver!r}, steps={len(self.plan.sigmas) - 1}, "
                f"shape={self.shape}, dtype={self.dtype}, device={self.device}, "
                f"backend={self.backend.name!r}, {mode})")


def compile_plan(plan: Plan, model, shape, dtype=torch.float32, device=None, *,
                 init_noise_scale: float = 1.0, **kw) -> CompiledLoop:
    """A :class:`CompiledLoop` for ``plan`` (see :meth:`pyengine.Sampler.compile`)."""
    return CompiledLoop(plan, model, shape, dtype, device, init_noise_scale=init_noise_scale,
                        **kw)
