"""Continuous batching: requests at different noise levels share one model call per iteration.

A :class:`RequestScheduler` holds requests, each with its own plan (solver, schedule, step
count, img2img strength) and seed. Every :meth:`~RequestScheduler.step` advances each active
request by one model evaluation:

1. the updates each request has due before its next evaluation run as fused updates over the
   whole batch with **per-sample coefficient rows** (a [B, K] table: each row is that
   request's own coefficients, and rows of requests with nothing due keep their buffer with
   the identity row), per-sample noise coefficients and per-sample Philox draw numbers;
2. one model call on all requests' states, with per-sample times ``t`` (a [B] tensor);
   a request with classifier-free guidance puts its rows in twice (unconditional, then
   conditional, with its own 2b-row conditioning), as ``Sampler.sample`` does; requests whose
   non-tensor (or 0-d tensor) ``extra_args`` differ are evaluated in separate model calls.

Requests join at the start of an iteration and leave when their plan ends; nothing is
recompiled. Each request's rows go through exactly the operations of running it alone, in
the same order, so the result equals ``sampler.sample(model, noise, seed)`` bit for bit on
the same backend: the extra terms a shared update reads for other requests have coefficient
zero, and adding 0 * b to a sum leaves it unchanged.

Buffers are [B, ...] tensors shared by all requests, one per buffer name of the plans. They
are rebuilt only when requests join or leave (a copy of each buffer), and a model output is
bound without a copy whenever every request evaluates the same buffer (the steady state).
The model call and the fused updates are the executor's (:class:`pyengine.runtime.Walker`);
this module decides which rows run what. An iteration is all-or-nothing: every update writes
a new tensor, so if the model raises, the scheduler is put back exactly as it was before the
call (admissions included) and ``step()`` can be called again.
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from . import backends
from .errors import as_device, check_callable, check_tensor
from .fused_update.contract import check_compute_dtype
from .noise import sample_seed
from .parameterization import Denoiser, ModelAdapter
from .plan import K_MAX, Eval, Plan, Update
from .runtime.graph import same_value
from .runtime.transforms import KNOWN, KNOWN_NOISE, check_state_dtype, inpaint, inpaint_inputs
from .runtime.walk import Program, Walker

__all__ = ["Request", "RequestScheduler"]

_MASK = "inpaint/mask"


@dataclass
class _Segment:
    updates: list          # Update ops due before the evaluation
    eval: Eval | None      # None for the plan's closing updates


def _segments(plan: Plan) -> list[_Segment]:
    program = Program(plan)
    if program.has_custom:
        op = program.customs[0]
        raise ValueError(f"solver {plan.solver!r} has a custom op ({type(op).__name__}) that "
                         f"runs outside the fused updates; the request scheduler merges only "
                         f"fused updates and model calls across requests")
    segs, pending = [], []
    for op in plan.ops:
        if isinstance(op, Eval):
            segs.append(_Segment(pending, op))
            pending = []
        else:
            pending.append(op)
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


def _rows(v) -> bool:
    """An extra_args value with one row per model row (concatenated across requests); any
    other value (0-d tensors included) is passed whole and groups the model calls."""
    return isinstance(v, torch.Tensor) and v.dim() > 0


_ROWS = object()        # the group key of a per-row tensor argument


def _seeds(seed, b: int) -> list[int]:
    if isinstance(seed, bool):
        raise ValueError(f"seed must be an int in [0, 2**32) or {b} per-sample seeds, got {seed!r}")
    if isinstance(seed, numbers.Integral):
        if not 0 <= int(seed) < 2 ** 32:
            raise ValueError(f"seed must be in [0, 2**32) (or per-sample seeds), got {seed}")
        return [sample_seed(int(seed), i) for i in range(b)]
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    try:
        vals = list(seed)
    except TypeError:
        raise ValueError(f"seed must be an int in [0, 2**32) or {b} per-sample seeds, got "
                         f"{type(seed).__name__} {seed!r}") from None
    if len(vals) != b or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                 and 0 <= int(v) < 2 ** 64 for v in vals):
        raise ValueError(f"seed must be an int or {b} per-sample integer seeds in [0, 2**64), "
                         f"got {seed!r}")
    return [int(v) for v in vals]


class RequestScheduler:
    """Continuous batching of sampling requests (see the module docstring).

    >>> sch = pe.RequestScheduler(model, device="cuda")
    >>> a = sch.submit(pe.Sampler(proc, "dpmpp_2m", steps=20), torch.randn(1, 4, 64, 64), seed=1)
    >>> b = sch.submit(pe.Sampler(proc, "ddim", steps=50), torch.randn(2, 4, 64, 64), seed=2)
    >>> while sch.pending or sch.active:
    ...     for r in sch.step():
    ...         save(r.result)

    ``max_batch`` bounds the rows in one model call (requests wait until rows free up; a
    guided request counts its rows twice); ``extra_args`` given to :meth:`submit` are
    per-request model arguments whose tensors have the request's batch size (2b rows,
    unconditional first, for a guided request), concatenated in the model call's order; a
    0-d tensor or any other value is passed whole (requests whose values differ get separate
    model calls).
    Supported per request: img2img (``init``, ``strength``/``start_sigma``), inpainting
    (``init`` with ``mask``) and classifier-free guidance (the sampler's ``guidance_scale``).
    Not supported: plans with custom ops (the guidance rescale, the Langevin corrector),
    which run outside the fused updates; such submissions raise ValueError.
    """

    def __init__(self, model, *, device=None, dtype: torch.dtype = torch.float32,
                 max_batch: int = 64, backend: str | None = None,
                 compute_dtype: torch.dtype | None = None):
        check_callable("model", model)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        check_compute_dtype(compute_dtype)
        self.model = model
        self.device = as_device(device)
        self.dtype = dtype
        self.max_batch = max_batch
        self.backend = (backend if hasattr(backend, "fused_update") else
                        backends.get(backend, device=self.device, dtype=dtype))
        self._walker = Walker(None, None, self.backend, compute_dtype=compute_dtype,
                              recycle=False)
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
               mask=None, extra_args: dict | None = None) -> Request:
        """Queue a request: ``sampler`` (a :class:`pyengine.Sampler`) with standard-normal
        ``noise`` [b, ...] (b samples), ``seed`` an int (sample i uses the key (seed, i), as in
        ``Sampler.sample``) or b per-sample seeds, optional img2img ``init`` with
        ``strength``/``start_sigma``, inpainting ``mask`` (with ``init``). Returns the
        :class:`Request`; it joins at the next :meth:`step` with room for it. Everything is
        checked before the scheduler changes: a rejected submission leaves it as it was."""
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or \
                noise.dim() < 1 or noise.shape[0] < 1:
            raise ValueError("noise must be a floating tensor [b, ...] with b >= 1")
        check_tensor("noise", noise)
        if not callable(getattr(sampler, "start", None)) or \
                not hasattr(sampler, "prediction"):
            raise TypeError(f"sampler must be a pe.Sampler, got {type(sampler).__name__}")
        b = noise.shape[0]
        guided = getattr(sampler, "guidance_scale", None) is not None
        rows = 2 * b if guided else b
        if rows > self.max_batch:
            raise ValueError(f"noise has {b} samples ({rows} model rows), more than "
                             f"max_batch={self.max_batch}")
        shape = tuple(noise.shape[1:])
        if self.sample_shape is not None and shape != self.sample_shape:
            raise ValueError(f"noise has sample shape {shape}; this scheduler batches "
                             f"{self.sample_shape}")
        if isinstance(self.model, Denoiser) and sampler.prediction != "sample":
            raise ValueError("model is a pe.Denoiser (it returns x0); the sampler must use "
                             "prediction='sample'")
        if mask is not None and init is None:
            raise ValueError("mask= (inpainting) needs init= (the image whose known region is "
                             "kept)")
        seeds = _seeds(seed, b)
        if extra_args is not None and not isinstance(extra_args, dict):
            raise ValueError(f"extra_args must be a dict of model keyword arguments, got "
                             f"{type(extra_args).__name__}")
        extra = dict(extra_args or {})
        for k, v in extra.items():
            if _rows(v) and v.shape[0] != rows:
                raise ValueError(f"extra_args[{k!r}] must have the request's model batch size "
                                 f"{rows} in dim 0, got {tuple(v.shape)}")
        if self.active or self.pending:
            ref = (self.active + self.pending)[0].extra_args
            if sorted(ref) != sorted(extra):
                raise ValueError(f"extra_args keys {sorted(extra)} differ from the other "
                                 f"requests' {sorted(ref)}")
        plan, x = sampler.start(noise, init=init, strength=strength, start_sigma=start_sigma)
        inputs = None
        if mask is not None:
            plan = inpaint(plan)
            m, known, kn = inpaint_inputs(noise.to(device=self.device, dtype=self.dtype), mask,
                                          init, noise)
            inputs = {_MASK: m, KNOWN: known, KNOWN_NOISE: kn}
        check_state_dtype(plan, self.dtype)
        segs = _segments(plan)                          # raises for custom ops
        # -- accepted: nothing above changed the scheduler --
        if self.sample_shape is None:
            self.sample_shape = shape
        req = Request(next(self._ids), plan, b, seeds, extra)
        req._x0 = x.to(device=self.device, dtype=self.dtype)   # the initial state
        req._inputs = inputs
        req._model_rows = rows
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

    @property
    def _model_batch(self) -> int:
        return sum(r._model_rows for r in self.active)

    def _fill(self, name: str, r: Request) -> torch.Tensor:
        """Request ``r``'s rows of buffer ``name`` when it joins."""
        if name == "x":
            return r._x0
        if r._inputs is not None and name in r._inputs:
            return r._inputs[name]
        fill = torch.ones if name == _MASK else torch.zeros
        return fill((r.rows,) + self.sample_shape, dtype=self.dtype, device=self.device)

    def _admit(self) -> None:
        joined, rows = [], self._model_batch
        while self.pending and rows + self.pending[0]._model_rows <= self.max_batch:
            rows += self.pending[0]._model_rows
            joined.append(self.pending.pop(0))
        if not joined:
            return
        names = set(self._slots) | {"x"}
        for r in joined:
            if r._inputs is not None:
                names |= set(r._inputs)
        for name in names:
            old = [self._slots[name]] if name in self._slots else [
                self._fill(name, a) for a in self.active]
            self._slots[name] = torch.cat(old + [self._fill(name, r) for r in joined])
        self.active = self.active + joined

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
            masked = op.mask_coefs is not None
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
                c["masked"] = c["masked"] or masked
                break
            else:
                classes.append({"dst": op.dst, "aux_dst": op.aux_dst, "order": list(op.bufs),
                                "jobs": [job], "masked": masked})
        B = self.batch
        w = self._walker
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
            mcoef = np.zeros((B, K)) if c["masked"] else None
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
                if op.mask_coefs is not None:
                    for k, name in enumerate(op.bufs):
                        mcoef[lo:hi, col[name]] = op.mask_coefs[k]
                if op.noise_index >= 0 and op.noise != 0.0:
                    noisy = True
                    nz[lo:hi] = op.noise
                    steps[lo:hi] = op.noise_index
            for r, lo, hi in self._row_ranges():
                seeds[lo:hi] = r.seeds
            for name in order:
                self._slot(name)
            if noisy:
                seeds_t = self._table(seeds.view(np.int64))
                step_arg = (int(steps[0]) if np.all(steps == steps[0])
                            else self._table(steps))
                noise_arg = self._table(nz)
            else:
                seeds_t, step_arg, noise_arg = None, -1, 0.0
            w.mask = None
            if mcoef is not None:
                # the blend applies to the rows of masked jobs only: every other row (other
                # requests, and requests with nothing due, whose identity row keeps dst) gets
                # mask 1, so it is exactly the unblended result
                masked = [(lo, hi) for r, lo, hi, op in c["jobs"] if op.mask_coefs is not None]
                w.mask = self._slots[_MASK]
                if sum(hi - lo for lo, hi in masked) != B:
                    w.mask = torch.ones_like(w.mask)
                    for lo, hi in masked:
                        w.mask[lo:hi] = self._slots[_MASK][lo:hi]
            w.apply(c["dst"], order, self._table(coef), noise_arg, seeds_t, step_arg,
                    c["aux_dst"], None if aux is None else self._table(aux),
                    mask_coef=None if mcoef is None else self._table(mcoef))
            self.fused_updates += 1

    def step(self) -> list[Request]:
        """One iteration: admit waiting requests, run every active request's due updates,
        then the model call(s) for all that evaluate. Returns the requests finished in it.
        All-or-nothing: if the model raises, the scheduler is left as before the call."""
        saved = (dict(self._slots), list(self.active), list(self.pending), self.iterations,
                 self.model_calls, self.fused_updates)
        try:
            return self._step()
        except BaseException:
            (slots, self.active, self.pending, self.iterations, self.model_calls,
             self.fused_updates) = saved
            self._slots = slots
            raise

    def _step(self) -> list[Request]:
        self._admit()
        if not self.active:
            return []
        self.iterations += 1
        w = self._walker
        w.slots = self._slots
        w.like = self._slots["x"]
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
        self._slots = w.slots
        for r, *_ in due:                  # nothing can fail past this point
            r.segment += 1
        self._retire(finished)
        return finished

    def _groups(self, evals) -> list[list]:
        """Evaluations grouped by equal non-tensor extra_args (one model call per group)."""
        groups: list[tuple[dict, list]] = []
        for job in evals:
            fixed = {k: _ROWS if _rows(v) else v for k, v in job[0].extra_args.items()}
            for ref, members in groups:
                if all(same_value(ref[k], fixed[k]) for k in ref):
                    members.append(job)
                    break
            else:
                groups.append((fixed, [job]))
        return [members for _, members in groups]

    def _evaluate(self, evals) -> None:
        groups = self._groups(evals)
        simple = (len(groups) == 1 and len(evals) == len(self.active)
                  and len({e.src for *_, e in evals}) == 1
                  and all(e.guidance is None for *_, e in evals))
        outs = {}
        for group in groups:
            out = self._call(group, simple)
            outs[id(group)] = out
        w = self._walker
        dst = {e.dst for *_, e in evals}
        if simple and len(dst) == 1:
            w.slots[dst.pop()] = outs[id(groups[0])]
            return
        # rows of each call's output are in model-call order (a guided request's rows twice:
        # unconditional, then conditional); copy each request's rows into the buffers it binds
        parts: dict[str, tuple[list, list]] = {}
        for group in groups:
            out, off = outs[id(group)], 0
            for r, lo, hi, e in group:
                n = hi - lo
                rows = torch.arange(lo, hi)
                if e.guidance is None:
                    halves = [(e.dst, out[off:off + n])]
                else:
                    halves = [(e.dst + "/u", out[off:off + n]),
                              (e.dst + "/c", out[off + n:off + 2 * n])]
                for name, val in halves:
                    p = parts.setdefault(name, ([], []))
                    p[0].append(rows)
                    p[1].append(val)
                off += r._model_rows
        for name, (rows, vals) in parts.items():
            val = torch.cat(vals)
            t = self._slot(name)
            # a model output of another float dtype than the buffer (a float16 model for a
            # float32 state): the buffer takes the wider one, so both convert exactly
            t = t.to(torch.promote_types(t.dtype, val.dtype), copy=True)
            t.index_copy_(0, torch.cat(rows).to(self.device), val.to(t.dtype))
            w.slots[name] = t

    def _call(self, group, simple: bool) -> torch.Tensor:
        """One model call for a group of evaluations (per-row times; guided rows twice)."""
        if simple:
            x = self._slots[group[0][3].src]
        else:
            xs = []
            for r, lo, hi, e in group:
                v = self._slots[e.src][lo:hi]
                xs += [v, v] if e.guidance is not None else [v]
            x = torch.cat(xs)
        times = np.zeros((3, x.shape[0]))
        i = 0
        for r, lo, hi, e in group:
            n = r._model_rows
            times[:, i:i + n] = np.array([[e.sigma], [e.t], [e.s]])
            i += n
        tdt = torch.float64 if self.dtype == torch.float64 else torch.float32
        tt = self._table(times).to(tdt)
        extra = {}
        for k, v in group[0][0].extra_args.items():
            if _rows(v):
                extra[k] = torch.cat([r.extra_args[k] for r, *_ in group]).to(self.device)
            else:
                extra[k] = v
        w = self._walker
        w.adapter = ModelAdapter(self.model, extra)
        out = w.call_model(x, tt[0], tt[1], tt[2])
        self.model_calls += 1
        return out

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
