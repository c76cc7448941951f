"""Continuous batching: requests at different noise levels share one model call per iteration.

A :class:`RequestScheduler` holds requests, each with its own plan (solver, schedule, step
count, img2img strength) and seed. Every :meth:`~RequestScheduler.step` advances each active
request by one model evaluation:

1. the updates each request has due before its next evaluation run as fused updates over the
   whole batch with **per-sample coefficient rows** (a [B, K] table: each row is that
   request's own coefficients, and rows of requests with nothing due keep their buffer with
   the identity row), per-sample noise coefficients and per-sample Philox draw numbers;
2. one model call on all requests' states, with per-sample times ``t`` (a [B] tensor).

Requests join at the start of an iteration and leave when their plan ends; nothing is
recompiled. Each request's rows go through exactly the operations of running it alone, in
the same order, so the result equals ``sampler.sample(model, noise, seed)`` bit for bit on
the same backend: the extra terms a shared update reads for other requests have coefficient
zero, and adding 0 * b to a sum leaves it unchanged.

Buffers are [B, ...] tensors shared by all requests, one per buffer name of the plans. They
are rebuilt only when requests join or leave (a copy of each buffer), and a model output is
bound without a copy whenever every request evaluates the same buffer (the steady state).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from . import backends
from .noise import sample_seed
from .parameterization import Denoiser, ModelAdapter
from .plan import K_MAX, Eval, Plan, Update

__all__ = ["Request", "RequestScheduler"]


@dataclass
class _Segment:
    updates: list          # Update ops due before the evaluation
    eval: Eval | None      # None for the plan's closing updates


def _segments(plan: Plan) -> list[_Segment]:
    segs, pending = [], []
    for op in plan.ops:
        if isinstance(op, Eval):
            segs.append(_Segment(pending, op))
            pending = []
        elif isinstance(op, Update):
            pending.append(op)
        else:
            raise ValueError(f"solver {plan.solver!r} has a custom op ({type(op).__name__}) "
                             f"whose numbers depend on the whole batch; the request scheduler "
                             f"runs plans of fused updates and model calls only")
    segs.append(_Segment(pending, None))
    return segs


@dataclass(eq=False)
class Request:
    """One request in a :class:`RequestScheduler`: its plan, seeds, progress and result."""

    id: int
    plan: Plan
    rows: int                                   # samples in the request
    seeds: list = field(default_factory=list)   # per-sample 64-bit Philox keys
    extra_args: dict = field(default_factory=dict)
    segment: int = 0                            # the next segment to run
    result: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def evaluations(self) -> int:
        """Model evaluations done so far."""
        return min(self.segment, self.plan.nfe)

    def __repr__(self) -> str:
        state = "done" if self.done else f"{self.evaluations}/{self.plan.nfe} evaluations"
        return f"Request({self.id}, {self.plan.solver!r}, rows={self.rows}, {state})"


def _merge(order: list, seq: list) -> list | None:
    """``order`` extended so that ``seq`` is a subsequence of it (None if it cannot be)."""
    out, pos = list(order), 0
    for item in seq:
        if item in out:
            j = out.index(item)
            if j < pos:
                return None
            pos = j + 1
        else:
            out.insert(pos, item)
            pos += 1
    return out


class RequestScheduler:
    """Continuous batching of sampling requests (see the module docstring).

    >>> sch = pe.RequestScheduler(model, device="cuda")
    >>> a = sch.submit(pe.Sampler(proc, "dpmpp_2m", steps=20), torch.randn(1, 4, 64, 64), seed=1)
    >>> b = sch.submit(pe.Sampler(proc, "ddim", steps=50), torch.randn(2, 4, 64, 64), seed=2)
    >>> while sch.pending or sch.active:
    ...     for r in sch.step():
    ...         save(r.result)

    ``max_batch`` bounds the rows in one model call (requests wait until rows free up);
    ``extra_args`` given to :meth:`submit` are per-request model arguments whose tensors have
    the request's batch size (class labels, embeddings), concatenated in the model call's
    order. Not supported: classifier-free guidance and plans with custom ops (the guidance
    rescale, the Langevin corrector), whose numbers depend on the batch; such submissions
    raise ValueError.
    """

    def __init__(self, model, *, device=None, dtype: torch.dtype = torch.float32,
                 max_batch: int = 64, backend: str | None = None,
                 compute_dtype: torch.dtype | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.model = model
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype = dtype
        self.max_batch = max_batch
        self.backend = (backend if hasattr(backend, "fused_update") else
                        backends.get(backend, device=self.device, dtype=dtype))
        self.kw = {"compute_dtype": compute_dtype} if compute_dtype else {}
        self.pending: list[Request] = []
        self.active: list[Request] = []
        self.sample_shape: tuple | None = None
        self._slots: dict[str, torch.Tensor] = {}
        self._segs: dict[int, list[_Segment]] = {}
        self._ids = itertools.count()
        self.iterations = 0
        self.model_calls = 0
        self.fused_updates = 0

    # -- requests ----------------------------------------------------------------------------
    def submit(self, sampler, noise: torch.Tensor, seed=0, *, init=None,
               strength: float | None = None, start_sigma: float | None = None,
               extra_args: dict | None = None) -> Request:
        """Queue a request: ``sampler`` (a :class:`pyengine.Sampler`) with standard-normal
        ``noise`` [b, ...] (b samples), ``seed`` an int (sample i uses the key (seed, i), as in
        ``Sampler.sample``) or b per-sample seeds, optional img2img ``init`` with
        ``strength``/``start_sigma``. Returns the :class:`Request`; it joins at the next
        :meth:`step` with room for it."""
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or \
                noise.dim() < 1 or noise.shape[0] < 1:
            raise ValueError("noise must be a floating tensor [b, ...] with b >= 1")
        b = noise.shape[0]
        if b > self.max_batch:
            raise ValueError(f"noise has {b} samples, more than max_batch={self.max_batch}")
        shape = tuple(noise.shape[1:])
        if self.sample_shape is None:
            self.sample_shape = shape
        elif shape != self.sample_shape:
            raise ValueError(f"noise has sample shape {shape}; this scheduler batches "
                             f"{self.sample_shape}")
        if isinstance(self.model, Denoiser) and sampler.prediction != "sample":
            raise ValueError("model is a pe.Denoiser (it returns x0); the sampler must use "
                             "prediction='sample'")
        if getattr(sampler, "guidance_scale", None) is not None:
            raise ValueError("classifier-free guidance is not supported by the request "
                             "scheduler (the sampler has guidance_scale set)")
        plan, x = sampler.start(noise, init=init, strength=strength, start_sigma=start_sigma)
        segs = _segments(plan)                          # raises for custom ops
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            if not 0 <= int(seed) < 2 ** 32:
                raise ValueError(f"seed must be in [0, 2**32) (or per-sample seeds), got {seed}")
            seeds = [sample_seed(int(seed), i) for i in range(b)]
        else:
            seeds = [int(v) for v in seed]
            if len(seeds) != b or any(not 0 <= v < 2 ** 64 for v in seeds):
                raise ValueError(f"seed must be an int or {b} per-sample seeds in [0, 2**64)")
        extra = dict(extra_args or {})
        for k, v in extra.items():
            if isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != b):
                raise ValueError(f"extra_args[{k!r}] must have the request's batch size {b} "
                                 f"in dim 0, got {tuple(v.shape)}")
        if self.active or self.pending:
            ref = (self.active + self.pending)[0].extra_args
            if sorted(ref) != sorted(extra):
                raise ValueError(f"extra_args keys {sorted(extra)} differ from the other "
                                 f"requests' {sorted(ref)}")
        req = Request(next(self._ids), plan, b, seeds, extra)
        req._x0 = x.to(device=self.device, dtype=self.dtype)   # the initial state
        self._segs[req.id] = segs
        self.pending.append(req)
        return req

    # -- the batch ---------------------------------------------------------------------------
    def _row_ranges(self):
        lo = 0
        for r in self.active:
            yield r, lo, lo + r.rows
            lo += r.rows

    @property
    def batch(self) -> int:
        return sum(r.rows for r in self.active)

    def _admit(self) -> None:
        joined = []
        while self.pending and self.batch + sum(r.rows for r in joined) + \
                self.pending[0].rows <= self.max_batch:
            joined.append(self.pending.pop(0))
        if not joined:
            return
        shape = self.sample_shape
        for name, t in list(self._slots.items()):
            new = [t] + [torch.zeros((r.rows,) + shape, dtype=self.dtype, device=self.device)
                         for r in joined]
            if name == "x":
                new = [t] + [r._x0 for r in joined]
            self._slots[name] = torch.cat(new)
        if "x" not in self._slots:
            self._slots["x"] = torch.cat([r._x0 for r in joined])
        for r in joined:
            del r._x0
        self.active += joined

    def _retire(self, finished: list[Request]) -> None:
        if not finished:
            return
        keep = []
        for r, lo, hi in self._row_ranges():
            if r in finished:
                r.result = self._slots[r.plan.output][lo:hi].clone()
                del self._segs[r.id]
            else:
                keep.append((lo, hi))
        self.active = [r for r in self.active if r not in finished]
        if not keep:
            self._slots = {}
            return
        idx = torch.cat([torch.arange(lo, hi) for lo, hi in keep]).to(self.device)
        self._slots = {k: v.index_select(0, idx) for k, v in self._slots.items()}

    def _slot(self, name: str) -> torch.Tensor:
        t = self._slots.get(name)
        if t is None:
            t = torch.zeros((self.batch,) + self.sample_shape, dtype=self.dtype,
                            device=self.device)
            self._slots[name] = t
        return t

    def _table(self, host: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(host)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _run_updates(self, jobs: list[tuple[Request, int, int, Update]]) -> None:
        """One round of due updates (at most one per request): fused updates over the whole
        batch with per-sample rows, one per class of updates writing the same buffers."""
        classes: list[dict] = []
        for job in jobs:
            op = job[3]
            for c in classes:
                if c["dst"] != op.dst or c["aux_dst"] != op.aux_dst:
                    continue
                order = _merge(c["order"], list(op.bufs))
                if order is None:
                    continue
                extra = [d for d in (op.dst, op.aux_dst) if d is not None and d not in order]
                if len(order) + len(extra) > K_MAX:
                    continue
                c["order"] = order
                c["jobs"].append(job)
                break
            else:
                classes.append({"dst": op.dst, "aux_dst": op.aux_dst, "order": list(op.bufs),
                                "jobs": [job]})
        B = self.batch
        for c in classes:
            order = c["order"]
            for d in (c["dst"], c["aux_dst"]):
                if d is not None and d not in order:
                    order.append(d)
            K = len(order)
            col = {name: k for k, name in enumerate(order)}
            coef = np.zeros((B, K))
            coef[:, col[c["dst"]]] = 1.0                   # identity rows: keep dst
            aux = None
            if c["aux_dst"] is not None:
                aux = np.zeros((B, K))
                aux[:, col[c["aux_dst"]]] = 1.0
            nz = np.zeros(B)
            steps = np.zeros(B, dtype=np.int64)
            seeds = np.zeros(B, dtype=np.uint64)
            noisy = False
            for r, lo, hi, op in c["jobs"]:
                coef[lo:hi] = 0.0
                for k, name in enumerate(op.bufs):
                    coef[lo:hi, col[name]] = op.coefs[k]
                if aux is not None:
                    aux[lo:hi] = 0.0
                    for k, name in enumerate(op.bufs):
                        aux[lo:hi, col[name]] = op.aux_coefs[k]
                if op.noise_index >= 0 and op.noise != 0.0:
                    noisy = True
                    nz[lo:hi] = op.noise
                    steps[lo:hi] = op.noise_index
            for r, lo, hi in self._row_ranges():
                seeds[lo:hi] = r.seeds
            bufs = [self._slot(name) for name in order]
            out = torch.empty_like(bufs[0])
            aux_out = None if aux is None else torch.empty_like(out)
            if noisy:
                seeds_t = self._table(seeds.view(np.int64))
                step_arg = (int(steps[0]) if np.all(steps == steps[0])
                            else self._table(steps))
                noise_arg = self._table(nz)
            else:
                seeds_t, step_arg, noise_arg = None, -1, 0.0
            self.backend.fused_update(out, bufs, self._table(coef), noise_arg, seeds_t,
                                      step_arg, aux_out,
                                      None if aux is None else self._table(aux), **self.kw)
            self.fused_updates += 1
            self._slots[c["dst"]] = out
            if aux_out is not None:
                self._slots[c["aux_dst"]] = aux_out

    def step(self) -> list[Request]:
        """One iteration: admit waiting requests, run every active request's due updates,
        then one model call for all that evaluate. Returns the requests finished in it."""
        self._admit()
        if not self.active:
            return []
        self.iterations += 1
        due = []
        for r, lo, hi in self._row_ranges():
            seg = self._segs[r.id][r.segment]
            due.append((r, lo, hi, seg))
        depth = max(len(s.updates) for *_, s in due)
        for p in range(depth):
            self._run_updates([(r, lo, hi, s.updates[p]) for r, lo, hi, s in due
                               if p < len(s.updates)])
        finished = [r for r, *_, s in due if s.eval is None]
        evals = [(r, lo, hi, s.eval) for r, lo, hi, s in due if s.eval is not None]
        if evals:
            self._evaluate(evals)
        for r, *_ in due:
            r.segment += 1
        self._retire(finished)
        return finished

    def _evaluate(self, evals) -> None:
        everyone = len(evals) == len(self.active)
        src = {e.src for *_, e in evals}
        dst = {e.dst for *_, e in evals}
        if everyone and len(src) == 1:
            x = self._slots[src.pop()]
        else:
            x = torch.cat([self._slots[e.src][lo:hi] for _, lo, hi, e in evals])
        m = x.shape[0]
        times = np.zeros((3, m))
        i = 0
        for r, lo, hi, e in evals:
            times[:, i:i + hi - lo] = np.array([[e.t], [e.sigma], [e.s]])
            i += hi - lo
        tdt = torch.float64 if self.dtype == torch.float64 else torch.float32
        tt = self._table(times).to(tdt)
        extra = {}
        ref = evals[0][0].extra_args
        for k, v in ref.items():
            if isinstance(v, torch.Tensor):
                extra[k] = torch.cat([r.extra_args[k] for r, *_ in evals]).to(self.device)
            else:
                extra[k] = v
        out = ModelAdapter(self.model, extra).call_rows(x, tt[0], tt[1], tt[2])
        self.model_calls += 1
        if everyone and len(dst) == 1:
            self._slots[dst.pop()] = out
            return
        # rows of `out` are in model-call order; copy each request's rows into the buffer it
        # binds (requests binding another name keep their own value of this one)
        for name in dst:
            parts_out, parts_rows, off = [], [], 0
            for r, lo, hi, e in evals:
                if e.dst == name:
                    parts_out.append(out[off:off + hi - lo])
                    parts_rows.append(torch.arange(lo, hi))
                off += hi - lo
            t = self._slot(name).clone()
            t.index_copy_(0, torch.cat(parts_rows).to(self.device), torch.cat(parts_out))
            self._slots[name] = t

    def run(self) -> list[Request]:
        """Step until every submitted request is done; the requests in completion order."""
        done = []
        while self.pending or self.active:
            n_before = len(self.active) + len(self.pending)
            done += self.step()
            if not self.active and self.pending and len(self.pending) == n_before:
                raise RuntimeError("a pending request can never be admitted")
        return done

    def __repr__(self) -> str:
        return (f"RequestScheduler(active={len(self.active)}, pending={len(self.pending)}, "
                f"batch={self.batch}/{self.max_batch}, backend={self.backend.name!r})")
