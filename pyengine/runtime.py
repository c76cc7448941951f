"""The runtime: walks a Plan eagerly, or device-resident and captured in one CUDA graph.

Two ways to run a :class:`~pyengine.plan.Plan`:

* :func:`run_plan` -- the eager walk behind ``Sampler.sample``: per-step coefficients travel
  by value into each fused update, noise from per-sample Philox seeds or a torch generator.
* :func:`compile_plan` (``Sampler.compile``) -- the plan laid out in device memory
  (:class:`DeviceTables`: one float64 coefficient table, the model's times, the per-sample
  seeds), static input and output buffers, and on CUDA the whole loop -- model calls and fused
  updates of every step -- captured once into a CUDA graph and replayed per call. Nothing in
  the loop reads a device value on the host, so it never synchronizes. New noise and seeds
  are copied into the static buffers; a plan with the same structure (same solver and step
  count, another schedule or guidance scale) rewrites the coefficient table in place. Loops
  live in a bounded LRU cache (:data:`graph_cache`) keyed by (model, shape, dtype, device,
  backend, plan structure) and are released on eviction. A model that cannot be captured
  runs the same device-resident loop eagerly, after one warning that says why; CPU devices
  always run it eagerly.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict

import numpy as np
import torch

from . import backends
from .noise import seeds_tensor
from .parameterization import ModelAdapter, wrap
from .plan import Eval, Plan, Update

__all__ = ["CompiledLoop", "DeviceTables", "GraphCache", "compile_plan", "graph_cache",
           "plan_signature", "run_plan"]


def inpaint_buffers(plan: Plan, x: torch.Tensor, mask, known, known_noise):
    """Check inpainting's inputs against ``plan`` and the state ``x``; returns the mask, the
    known data and its noise as contiguous tensors of x's shape and dtype.

    ``mask`` (broadcastable to x: [B, 1, H, W] for a latent, say) is 1 where the model
    generates and 0 where ``known`` is kept; every state the plan writes, at its noise level
    sigma with scale s, becomes mask * state + (1 - mask) * s (known + sigma * known_noise)
    inside the same fused update (the mask is one more buffer of the kernel)."""
    from .plan import K_MAX
    for op in plan.ops:
        if not isinstance(op, (Eval, Update)) and hasattr(op, "slot"):
            raise ValueError(f"inpainting (mask=) is not supported for {plan.solver!r}: its "
                             f"{type(op).__name__} writes the state outside the fused updates")
        if isinstance(op, Update):
            if len(op.bufs) + 2 > K_MAX:
                raise ValueError(f"inpainting needs two more buffers than {plan.solver!r}'s "
                                 f"update reads ({len(op.bufs)}); the kernels read at most "
                                 f"{K_MAX}")
            if not (math.isfinite(op.sigma) and math.isfinite(op.scale)):
                raise ValueError(f"plan {plan.solver!r} has an update without its noise level")
    out = []
    for name, t in (("mask", mask), ("init", known), ("noise", known_noise)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor for inpainting, got {type(t).__name__}")
        try:
            t = torch.broadcast_to(t, x.shape)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to the "
                             f"state's {tuple(x.shape)}") from None
        out.append(t.to(device=x.device, dtype=x.dtype).contiguous())
    return tuple(out)


def run_plan(plan: Plan, model, x: torch.Tensor, *, seed=0, generator=None, backend=None,
             compute_dtype=None, callback=None, extra_args=None, mask=None, known=None,
             known_noise=None) -> torch.Tensor:
    """Execute ``plan`` from the initial state ``x`` (already at the first noise level).

    Noise: Philox keyed by per-sample ``seed`` (int or sequence), or with ``generator`` given,
    ``torch.randn(x.shape, generator=generator, dtype=x.dtype)`` at each noise draw, in plan
    order (what diffusers does inside ``scheduler.step``). ``x`` is never modified.
    ``callback(i, sigma, slots)`` runs after each model evaluation. ``mask``, ``known`` and
    ``known_noise``: inpainting (see :func:`inpaint_buffers`).
    """
    if mask is not None:
        mask, known, known_noise = inpaint_buffers(plan, x, mask, known, known_noise)
    adapter = wrap(model, extra_args)
    be = backend if hasattr(backend, "fused_update") else backends.get(backend, device=x.device,
                                                                       dtype=x.dtype)
    state_dtype = x.dtype
    slots: dict[str, torch.Tensor] = {"x": x.clone()}
    seeds = None
    if generator is None:
        seeds = seeds_tensor(seed, x.shape[0])     # validated even when the plan draws nothing
        seeds = seeds.to(x.device) if plan.n_noise else None
    for op in plan.ops:
        if hasattr(op, "execute"):
            # A custom op (e.g. the Langevin corrector, whose step size depends on the data):
            # it reads and writes slots itself, through the same backend.
            op.execute(slots=slots, backend=be, model=adapter, seeds=seeds, generator=generator,
                       state_dtype=state_dtype, compute_dtype=compute_dtype)
            continue
        if isinstance(op, Eval):
            if op.guidance is not None:
                # Classifier-free guidance: one model call on the doubled batch (unconditional
                # half first, as diffusers pipelines do); the updates read the two halves as
                # two buffers with the guidance folded into their coefficients.
                src = slots[op.src]
                B = src.shape[0]
                out = adapter(torch.cat([src, src]), op.sigma, op.t, op.s)
                slots[op.dst + "/u"] = out[:B]
                slots[op.dst + "/c"] = out[B:]
            else:
                slots[op.dst] = adapter(slots[op.src], op.sigma, op.t, op.s)
            if callback is not None:
                callback(op.step, op.sigma, slots)
            continue
        assert isinstance(op, Update)
        bufs = [slots[b] for b in op.bufs]
        dst = torch.empty_like(slots["x"], dtype=state_dtype)
        aux = None
        if op.aux_dst is not None:
            aux = torch.empty_like(dst)
        noise = None
        if op.noise_index >= 0 and generator is not None:
            noise = torch.randn(x.shape, generator=generator, dtype=state_dtype,
                                device=generator.device).to(x.device)
        kw = {"compute_dtype": compute_dtype} if compute_dtype else {}
        coefs, aux_coefs = op.coefs, op.aux_coefs
        if mask is not None:
            # the known region re-noised to this state's level: s (known + sigma * noise)
            bufs = bufs + [known, known_noise]
            coefs = np.concatenate([coefs, [0.0, 0.0]])
            if aux_coefs is not None:
                aux_coefs = np.concatenate([aux_coefs, [0.0, 0.0]])
            kw["mask"] = mask
            kw["mask_coef"] = np.concatenate([np.zeros(len(op.coefs)),
                                              [op.scale, op.scale * op.sigma]])
        be.fused_update(dst, bufs, coefs, op.noise if op.noise_index >= 0 else 0.0, seeds,
                        op.noise_index, aux, aux_coefs, noise=noise, **kw)
        slots[op.dst] = dst
        if aux is not None:
            slots[op.aux_dst] = aux
    return slots[plan.output]


# -- device-resident plans -------------------------------------------------------------------

def _draws(op: Update) -> bool:
    """Whether an update adds noise (a draw with a zero coefficient adds nothing)."""
    return op.noise_index >= 0 and op.noise != 0.0


def plan_signature(plan: Plan) -> tuple:
    """What a compiled loop depends on besides the coefficient values: the kinds of the ops,
    the buffers they read and write, which updates draw noise (and their draw numbers), the
    output slot, and custom ops in full (their parameters are baked into the loop). Two plans
    with equal signatures share a compiled loop; switching between them rewrites the tables."""
    sig: list = [plan.output]
    for op in plan.ops:
        if isinstance(op, Eval):
            sig.append(("eval", op.src, op.dst, op.guidance is not None))
        elif isinstance(op, Update):
            sig.append(("update", op.dst, tuple(op.bufs), op.noise_index if _draws(op) else -1,
                        op.aux_dst))
        else:
            sig.append(("custom", type(op).__qualname__, repr(op)))
    return tuple(sig)


def _time_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_device(dst: torch.Tensor, host: np.ndarray) -> None:
    """Copy a host array into a device tensor without a host synchronization (pinned memory
    and an asynchronous copy on CUDA; the caching host allocator keeps the pinned block alive
    until the copy has run)."""
    src = torch.from_numpy(np.ascontiguousarray(host)).to(dst.dtype)
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


class DeviceTables:
    """A plan's numbers in device memory for a batch of ``batch`` samples.

    * one float64 table holding, per update, its coefficients as a [B, K] block (every row
      equal for a plain plan, per-sample rows where samples differ), its aux coefficients
      and its [B] noise coefficients -- the fused kernels read them from device memory, so a
      captured graph replays whatever the table holds;
    * per evaluation the model's time, sigma and scale as [B] rows (2B with guidance: the
      doubled batch), in the model's time dtype (float32, float64 for float64 states).

    :meth:`load` rewrites all of it in place for any plan with the same
    :func:`plan_signature`."""

    def __init__(self, plan: Plan, batch: int, device, dtype: torch.dtype):
        self.signature = plan_signature(plan)
        self.batch = B = int(batch)
        self.device = torch.device(device)
        self.updates = [op for op in plan.ops if isinstance(op, Update)]
        self.evals = [op for op in plan.ops if isinstance(op, Eval)]
        n = 0
        self._layout = []            # per update: (coef offset, aux offset or -1, noise offset or -1)
        for op in self.updates:
            K = len(op.bufs)
            c = n
            n += B * K
            a = -1
            if op.aux_dst is not None:
                a, n = n, n + B * K
            z = -1
            if _draws(op):
                z, n = n, n + B
            self._layout.append((c, a, z))
        self.flat = torch.zeros(max(n, 1), dtype=torch.float64, device=self.device)
        self.coef, self.aux, self.noise = [], [], []
        for op, (c, a, z) in zip(self.updates, self._layout):
            K = len(op.bufs)
            self.coef.append(self.flat[c:c + B * K].view(B, K))
            self.aux.append(None if a < 0 else self.flat[a:a + B * K].view(B, K))
            self.noise.append(None if z < 0 else self.flat[z:z + B])
        rows = [2 * B if op.guidance is not None else B for op in self.evals]
        self._eval_off = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        tdt = _time_dtype(dtype)
        m = int(self._eval_off[-1])
        # [3, sum of rows]: model time, sigma, scale of each evaluation's rows
        self.times = torch.zeros((3, max(m, 1)), dtype=tdt, device=self.device)
        self.t, self.sigma, self.s = [], [], []
        for i in range(len(self.evals)):
            lo, hi = int(self._eval_off[i]), int(self._eval_off[i + 1])
            self.t.append(self.times[0, lo:hi])
            self.sigma.append(self.times[1, lo:hi])
            self.s.append(self.times[2, lo:hi])
        self.loaded = None
        self.load(plan)

    def host(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays :meth:`load` copies (float64 table, [3, rows] times)."""
        B = self.batch
        flat = np.zeros(self.flat.numel(), dtype=np.float64)
        ups = [op for op in plan.ops if isinstance(op, Update)]
        for op, (c, a, z) in zip(ups, self._layout):
            K = len(op.bufs)
            flat[c:c + B * K] = np.tile(op.coefs, B)
            if a >= 0:
                flat[a:a + B * K] = np.tile(op.aux_coefs, B)
            if z >= 0:
                flat[z:z + B] = op.noise
        times = np.zeros(tuple(self.times.shape), dtype=np.float64)
        evs = [op for op in plan.ops if isinstance(op, Eval)]
        for i, op in enumerate(evs):
            lo, hi = int(self._eval_off[i]), int(self._eval_off[i + 1])
            times[:, lo:hi] = np.array([[op.t], [op.sigma], [op.s]])
        return flat, times

    def load(self, plan: Plan) -> None:
        """Write ``plan``'s numbers into the tables (same signature required)."""
        if plan is self.loaded:
            return
        if plan_signature(plan) != self.signature:
            raise ValueError(f"plan {plan.solver!r} ({len(plan.sigmas) - 1} steps) has another "
                             f"structure than the tables were laid out for")
        flat, times = self.host(plan)
        _to_device(self.flat, flat)
        _to_device(self.times, times)
        self.loaded = plan


class _Loop:
    """The device-resident loop of one plan structure: static buffers, tables, one body."""

    def __init__(self, plan: Plan, model, shape, dtype, device, backend, extra_args,
                 compute_dtype):
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        B = self.shape[0]
        self.ops = plan.ops
        self.output = plan.output
        self.tables = DeviceTables(plan, B, self.device, dtype)
        self.noise_in = torch.zeros(self.shape, dtype=dtype, device=self.device)
        self.scale = torch.ones((), dtype=dtype, device=self.device)
        self.seeds = torch.zeros(B, dtype=torch.int64, device=self.device)
        self._seed_base = torch.arange(B, dtype=torch.int64, device=self.device) << 32
        self.extra = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in (extra_args or {}).items()}
        self.adapter = ModelAdapter(model, self.extra)
        self.backend = backend
        self.kw = {"compute_dtype": compute_dtype} if compute_dtype else {}
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

    def set_extra(self, extra_args) -> None:
        for k, v in (extra_args or {}).items():
            if k not in self.extra:
                raise ValueError(f"extra_args[{k!r}] was not given when the loop was compiled "
                                 f"(compiled with {sorted(self.extra)})")
            cur = self.extra[k]
            if isinstance(cur, torch.Tensor):
                if not isinstance(v, torch.Tensor) or v.shape != cur.shape:
                    raise ValueError(f"extra_args[{k!r}] must be a tensor of shape "
                                     f"{tuple(cur.shape)} (as compiled)")
                cur.copy_(v)
            elif v is not cur and v != cur:
                raise ValueError(f"extra_args[{k!r}] differs from the compiled value; non-tensor "
                                 f"arguments are baked into the loop")

    def body(self) -> torch.Tensor:
        """The whole loop, from the static noise to the output slot (what gets captured)."""
        tb, be, kw = self.tables, self.backend, self.kw
        slots = {"x": self.noise_in * self.scale}
        seeds = self.seeds
        ie = iu = 0
        for op in self.ops:
            if isinstance(op, Eval):
                src = slots[op.src]
                if op.guidance is not None:
                    B = src.shape[0]
                    out = self.adapter.call_rows(torch.cat([src, src]), tb.t[ie], tb.sigma[ie],
                                                 tb.s[ie])
                    slots[op.dst + "/u"] = out[:B]
                    slots[op.dst + "/c"] = out[B:]
                else:
                    slots[op.dst] = self.adapter.call_rows(src, tb.t[ie], tb.sigma[ie], tb.s[ie])
                ie += 1
            elif isinstance(op, Update):
                dst = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                aux = None if op.aux_dst is None else torch.empty_like(dst)
                nz = tb.noise[iu]
                be.fused_update(dst, [slots[b] for b in op.bufs], tb.coef[iu],
                                0.0 if nz is None else nz, seeds,
                                op.noise_index if nz is not None else -1, aux, tb.aux[iu], **kw)
                slots[op.dst] = dst
                if aux is not None:
                    slots[op.aux_dst] = aux
                iu += 1
            else:
                op.execute(slots=slots, backend=be, model=self.adapter, seeds=seeds,
                           generator=None, state_dtype=self.dtype,
                           compute_dtype=kw.get("compute_dtype"))
        return slots[self.output]


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


def _extra_signature(extra_args) -> tuple:
    out = []
    for k, v in sorted((extra_args or {}).items()):
        if isinstance(v, torch.Tensor):
            out.append((k, "tensor", tuple(v.shape), v.dtype, str(v.device)))
        else:
            out.append((k, "value", repr(v)))
    return tuple(out)


class CompiledLoop:
    """What :meth:`pyengine.Sampler.compile` returns: call it with standard-normal noise of the
    compiled shape (and a seed) to get samples.

    >>> fn = sampler.compile(unet, (8, 4, 64, 64), torch.float16, "cuda")
    >>> x0 = fn(torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.float16), seed=7)

    ``captured`` says whether the whole loop replays as one CUDA graph; ``fallback_reason``
    why not (None when captured). The returned tensor is a fresh copy of the static output.
    """

    def __init__(self, plan: Plan, model, shape, dtype, device, *, init_noise_scale: float,
                 backend=None, capture: bool | None = None, extra_args=None,
                 compute_dtype=None, warmup: int = 2, cache: GraphCache | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        try:
            shape = tuple(int(d) for d in shape)
        except TypeError:
            raise ValueError(f"shape must be a sequence of ints [B, ...], got {shape!r}") from None
        if len(shape) < 1 or any(d < 1 for d in shape):
            raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        device = torch.device(device if device is not None else "cpu")
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
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError("extra_args must be a dict of keyword arguments for the model")
        if not math.isfinite(float(init_noise_scale)):
            raise ValueError(f"init_noise_scale must be finite, got {init_noise_scale!r}")
        self.plan, self.model = plan, model
        self.shape, self.dtype, self.device = shape, dtype, device
        self.init_noise_scale = float(init_noise_scale)
        self.capture = bool(capture)
        self.warmup = warmup
        self.compute_dtype = compute_dtype
        self.backend = (backend if hasattr(backend, "fused_update") else
                        backends.get(backend, device=device, dtype=dtype))
        self.extra_args = dict(extra_args or {})
        self.cache = graph_cache if cache is None else cache
        self.key = (id(model), shape, dtype, str(device), self.backend.name, compute_dtype,
                    self.capture, plan_signature(plan), _extra_signature(self.extra_args))

    # -- the cache entry -------------------------------------------------------------------
    def _entry(self) -> _Entry:
        entry = self.cache.get(self.key)
        if entry is not None and not entry.released:
            return entry
        loop = _Loop(self.plan, self.model, self.shape, self.dtype, self.device, self.backend,
                     self.extra_args, self.compute_dtype)
        loop.load(self.plan, self.init_noise_scale)
        entry = _Entry(loop)
        if self.capture:
            try:
                entry.graph, entry.out = _capture(loop, self.warmup)
            except Exception as exc:                   # noqa: BLE001 -- any capture failure
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
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

    def __call__(self, noise: torch.Tensor, seed=0, *, extra_args=None) -> torch.Tensor:
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
        entry = self._entry()
        loop = entry.loop
        loop.set_seeds(seed)                 # validates before anything is written
        loop.set_extra(extra_args)
        loop.load(self.plan, self.init_noise_scale)
        loop.noise_in.copy_(noise)
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
