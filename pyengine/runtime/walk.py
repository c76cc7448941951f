"""The walk: the only code that runs a Plan's ops (DESIGN.md s.2).

A :class:`Program` is a plan numbered for walking: its model evaluations and fused updates
indexed in plan order, split into the prologue (ops before the first model call) and one
segment per model call (the call and the ops up to the next one). A :class:`Walker` runs a
program over one batch: it holds the buffers (slots), calls the model (classifier-free
guidance doubling written here once), issues every fused update (the one ``fused_update``
call for plans), runs custom ops, and reports each model call to a callback.

What differs between the modes comes in through two small interfaces:

* numbers -- ``update(i, op) -> (coef, aux_coef, noise_coef, mask_coef)`` and
  ``times(i, op) -> (sigma, t, s)``: host floats read off the plan (:class:`HostNumbers`,
  eager sampling), or device-resident tables (:class:`~pyengine.runtime.tables.DeviceTables`,
  the compiled / captured loop) whose [B, K] rows and [B] times the kernels and the model read
  from device memory;
* noise -- ``draw(op, like) -> (seeds, step, tensor)``: pyengine's in-kernel Philox keyed by
  per-sample seeds (:class:`PhiloxDraws`), a torch generator in plan order
  (:class:`GeneratorDraws`, diffusers' order), or the caller's tensors
  (:class:`SuppliedDraws`: k-diffusion noise samplers, a diffusers pipeline's generator).

The request scheduler and the diffusers drop-in reuse the walker's model call and update
call (:meth:`Walker.call_model`, :meth:`Walker.apply`) and walk segments with
:meth:`Walker.run_segment`.

Buffers are recycled: an update writes into a tensor of the walk's pool that no slot holds
any more, so a 50-step loop touches the same few tensors (ping-pong) instead of fresh pages
every step. Tensors the walk did not allocate (the caller's, the model's outputs) are never
written. run_plan turns recycling off when a user callback (which may keep slot tensors)
is given.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading

import torch

from ..fused_update import validate as _validate
from ..parameterization import ModelAdapter
from ..plan import Custom, Eval, Plan, Update
from . import custom as _custom

__all__ = ["GeneratorDraws", "HostNumbers", "PhiloxDraws", "Program", "SuppliedDraws",
           "Walker"]

EVAL, UPDATE, CUSTOM = 0, 1, 2


_TRUSTED: dict[int, bool] = {}


def _takes_trusted(backend) -> bool:
    """Whether ``backend.fused_update`` takes ``trusted=`` (the registry's backends do)."""
    if backend is None:
        return False
    key = id(backend)
    if key not in _TRUSTED:
        try:
            params = inspect.signature(backend.fused_update).parameters
            _TRUSTED[key] = "trusted" in params
        except (TypeError, ValueError, AttributeError):
            _TRUSTED[key] = False
    return _TRUSTED[key]


def _storage_uses(t: torch.Tensor) -> int | None:
    """How many tensors share ``t``'s storage (torch's own count, plus the one storage
    object made to ask), or None where this torch cannot say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    try:
        return count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError, TypeError):
        return None


def _host_key(index, dtype, like_key, noise, seeds, mask_coef, aux) -> tuple:
    """What the validation of update ``index`` of a program walked with host numbers depends
    on beyond the update itself: the model output's dtype, the state's layout and which of
    noise tensor, seeds, mask and aux output the call has."""
    return (index, dtype, like_key, noise is None, seeds is None, mask_coef is None,
            aux is None)


class BufferPool:
    """Tensors of finished eager walks, lent to the next walk of the same layout.

    A tensor of a few MiB that goes back to the C library at the end of a call is often
    returned to the system, and the next call's tensor of the same size then faults in
    every 4 KiB page anew (16x4x128x128 float32, a 50-step loop: 2,016 page faults and
    about 1.4 ms per call on the 2-vCPU Xeon, a quarter of a DDIM loop's time at that size).
    ``run_plan`` lends its walk's tensors from here and gives them back when the walk ends:
    all but the result, and only tensors nothing else refers to any more (neither the tensor
    object nor its memory through a view: a model that kept its input keeps it intact). A
    tensor is lent to one walk at a time. At most ``per_key`` tensors per (shape, strides,
    dtype, device) and ``max_bytes`` in all are kept, the least recently used layouts going
    first; ``$PYENGINE_BUFFER_POOL_MB`` sets the bound (0: no pool); :meth:`clear` releases
    everything.
    """

    def __init__(self, per_key: int = 6, max_bytes: int | None = None):
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("PYENGINE_BUFFER_POOL_MB", "256")) * 2 ** 20)
        self.per_key, self.max_bytes = per_key, max_bytes
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(t: torch.Tensor) -> tuple:
        return (tuple(t.shape), t.stride(), t.dtype, t.device)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def take(self, like: torch.Tensor) -> torch.Tensor | None:
        """A tensor of ``like``'s layout that no one else holds, or None."""
        if not self._free:
            return None
        k = self.key(like)
        with self._lock:
            lst = self._free.get(k)
            if not lst:
                return None
            t = lst.pop()
            self._bytes -= t.numel() * t.element_size()
            return t

    def give(self, tensors: list) -> None:
        """Take back ``tensors`` (the caller's list holds the only other reference to each):
        those still referred to elsewhere are left alone."""
        if self.max_bytes <= 0:
            return
        # a tensor here is referred to by the list, the loop variable and getrefcount's
        # argument; its storage by the tensor and the storage object made to ask
        free = [t for t in tensors if sys.getrefcount(t) <= 3 and _storage_uses(t) == 2]
        with self._lock:
            for t in free:
                k = self.key(t)
                lst = self._free.pop(k, [])        # re-inserted last: most recently used
                if len(lst) < self.per_key:
                    lst.append(t)
                    self._bytes += t.numel() * t.element_size()
                self._free[k] = lst
            while self._bytes > self.max_bytes and self._free:
                k = next(iter(self._free))
                for t in self._free.pop(k):
                    self._bytes -= t.numel() * t.element_size()

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._bytes = 0


#: the pool of the eager walks (``run_plan``); ``pyengine.runtime.buffer_pool.clear()``
#: releases what it keeps
buffer_pool = BufferPool()


class Program:
    """A plan numbered for walking (see the module docstring)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.output = plan.output
        self.evals: list[Eval] = []
        self.updates: list[Update] = []
        self.instructions: list[tuple] = []
        for op in plan.ops:
            if isinstance(op, Eval):
                self.instructions.append((EVAL, op, len(self.evals)))
                self.evals.append(op)
            elif isinstance(op, Update):
                self.instructions.append((UPDATE, op, len(self.updates)))
                self.updates.append(op)
            elif isinstance(op, Custom):
                self.instructions.append((CUSTOM, op, _custom.implementation(op)))
            else:
                raise TypeError(f"plan {plan.solver!r} holds {type(op).__name__}, which is "
                                f"neither Eval, Update nor a pyengine.plan.Custom op")
        starts = [j for j, ins in enumerate(self.instructions) if ins[0] == EVAL]
        first = starts[0] if starts else len(self.instructions)
        self.prologue = self.instructions[:first]
        bounds = starts + [len(self.instructions)]
        self.segments = [self.instructions[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self.customs = [ins[1] for ins in self.instructions if ins[0] == CUSTOM]
        self._host_lists = None
        self.steady_seen: dict = {}
        # [B] model-time rows by (B, dtype, device, denoiser), reused while unmodified
        self.time_rows: dict = {}
        # call structures already validated against the fused-update contract: each
        # structure is checked once per program, then its steps run trusted
        self.validated: set = set()

    def host_lists(self) -> list[tuple]:
        """Each update's host numbers as Python lists (coef, aux_coef) and a float noise
        coefficient: what a launcher struct takes, made once per program.

        An aux output that copies one model output (a multistep solver's history) stays a
        copy: the model may hand back the same buffer, rewritten, on its next call (static
        output buffers of captured or compiled models), so history never shares a model
        output's memory."""
        if self._host_lists is None:
            self._host_lists = [
                (op.coefs.tolist() if hasattr(op.coefs, "tolist") else list(op.coefs),
                 None if op.aux_coefs is None else (op.aux_coefs.tolist() if hasattr(
                     op.aux_coefs, "tolist") else list(op.aux_coefs)),
                 float(op.noise) if op.noise_index >= 0 else 0.0)
                for op in self.updates]
        return self._host_lists

    @property
    def has_custom(self) -> bool:
        return bool(self.customs)

    @classmethod
    def of(cls, plan: Plan) -> Program:
        """The plan's program, made once per plan (and with it, validation once per plan and
        call structure across calls)."""
        prog = plan.__dict__.get("_program")
        if prog is None or prog.plan is not plan or len(prog.instructions) != len(plan.ops):
            prog = cls(plan)
            plan.__dict__["_program"] = prog
        return prog


class HostNumbers:
    """The plan's own float64 numbers, passed by value (eager sampling)."""

    rows = False

    @staticmethod
    def update(i: int, op: Update):
        return op.coefs, op.aux_coefs, (op.noise if op.noise_index >= 0 else 0.0), \
            op.mask_coefs

    @staticmethod
    def times(i: int, op: Eval):
        return op.sigma, op.t, op.s


class PhiloxDraws:
    """In-kernel Philox noise keyed by per-sample seeds (an int64 [B] tensor) and the
    update's draw number."""

    def __init__(self, seeds):
        self.seeds = seeds

    def draw(self, op, like):
        if self.seeds is None:
            raise ValueError(f"the {op.kind} update draws noise but no seeds were given")
        return self.seeds, op.noise_index, None

    def at_eval(self, op) -> None:
        pass


class GeneratorDraws:
    """``torch.randn(shape, generator=g)`` at every draw, in plan order (diffusers' order)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def draw(self, op, like):
        z = torch.randn(like.shape, generator=self.generator, dtype=like.dtype,
                        device=self.generator.device)
        return None, -1, z.to(like.device)

    def at_eval(self, op) -> None:
        pass


class SuppliedDraws:
    """The caller's noise: ``fn(op, like)`` returns the tensor z of an update (or None: the
    update adds no noise); ``at_eval(op)`` (optional) runs before each model call."""

    def __init__(self, fn, at_eval=None):
        self.fn, self._at_eval = fn, at_eval

    def draw(self, op, like):
        z = self.fn(op, like)
        return None, -1, (None if z is None else z.to(like.device))

    def at_eval(self, op) -> None:
        if self._at_eval is not None:
            self._at_eval(op)


class Walker:
    """One walk of a :class:`Program` over a batch (see the module docstring).

    ``model`` is the user's model (or a ModelAdapter); ``backend`` a fused-update backend;
    ``numbers`` a numbers source; ``noise`` a draws source; ``mask`` the inpainting mask
    (updates carrying ``mask_coefs`` blend with it); ``callback(step, sigma, slots)`` runs
    after each model call; ``recycle`` reuses the walk's own tensors (turn it off when the
    callback keeps slot tensors)."""

    def __init__(self, program: Program, model, backend, *, numbers=HostNumbers,
                 noise=None, compute_dtype=None, mask=None, callback=None, extra_args=None,
                 recycle: bool = True):
        self.program = program
        self.adapter = model if isinstance(model, ModelAdapter) else \
            (None if model is None else ModelAdapter(model, extra_args))
        self.backend = backend
        self.numbers = numbers
        self.noise = noise
        self.compute_dtype = compute_dtype
        self.kw = {"compute_dtype": compute_dtype} if compute_dtype else {}
        self.mask = mask
        self.callback = callback
        self.recycle = recycle
        self.slots: dict[str, torch.Tensor] = {}
        self._owned: dict[int, torch.Tensor] = {}
        self._spans: dict[int, tuple[int, int]] = {}
        self._rows = None
        self._rows_b = 0
        self._like_key = None
        self._free: list[torch.Tensor] = []
        self._like: torch.Tensor | None = None
        self.pool: BufferPool | None = None     # lends the walk's tensors (run_plan)
        self._trusted = _takes_trusted(backend)
        self._kw_trusted = dict(self.kw, trusted=True)
        self._validated: set = set()
        # the backend's steady-state launcher (structs kept per tensor combination), where it
        # has one; every call structure it serves was validated once first
        make = getattr(backend, "walk_launches", None) if self._trusted else None
        self._launch = make(compute_dtype) if make is not None else None
        self._host = numbers is HostNumbers and program is not None
        self._checked_out = None

    @property
    def like(self) -> torch.Tensor | None:
        """The tensor whose shape, dtype and device the walk's own buffers take."""
        return self._like

    @like.setter
    def like(self, t: torch.Tensor) -> None:
        self._like = t
        self._like_key = None

    # -- buffers ---------------------------------------------------------------------------
    def start(self, x: torch.Tensor, inputs: dict | None = None, *, own: bool = False):
        """Bind the initial state ``x`` and read-only ``inputs``. ``own``: ``x`` joins the
        walk's pool (it may be recycled, i.e. written); else it is read like any input (the
        walk writes only tensors it owns, so the caller's ``x`` is never modified, and no copy
        is made: a run whose output is ``x`` itself returns it, see :func:`run_plan`)."""
        if own:
            self._own(x)
        self.slots = {"x": x}
        self.like = x
        for k, v in (inputs or {}).items():
            self.slots[k] = v
        return self

    def restart(self, slots: dict, like: torch.Tensor) -> Walker:
        """Walk again from ``slots`` (not copied into the pool): every tensor the walk
        allocated so far is free again (a benchmark repeating one segment allocates nothing)."""
        self.slots = dict(slots)
        self.like = like
        self._free = [t for t in self._owned.values() if all(t is not v for v in slots.values())]
        return self

    def take(self) -> torch.Tensor:
        """A tensor of the state's shape and dtype that no slot holds (the walk's own)."""
        if self._free:
            return self._free.pop()
        t = self.pool.take(self.like) if self.pool is not None else None
        if t is None:
            t = torch.empty_like(self.like)
        self._own(t)
        return t

    def finish(self, keep: torch.Tensor) -> None:
        """The walk is over: it lets go of everything, and its own tensors that nothing
        else refers to (not ``keep``, the result the caller gets) go back to the pool."""
        owned = [t for t in self._owned.values() if t is not keep]
        self._owned, self._spans, self._free, self.slots = {}, {}, [], {}
        self._launch = self._checked_out = self._rows = None
        if self.pool is not None and self.recycle:
            self.pool.give(owned)

    def _own(self, t: torch.Tensor) -> None:
        self._owned[id(t)] = t
        p = t.data_ptr()
        self._spans[id(t)] = (p, p + t.numel() * t.element_size())

    def _pin_aliases(self, out: torch.Tensor) -> None:
        """A model output sharing memory with a tensor of the walk (a model returning its
        input, or a view of it): that tensor is never recycled in this walk."""
        if not self.recycle or id(out) in self._owned:
            return
        p = out.data_ptr()
        last = self._checked_out
        if last is not None and last[0] is out and last[1] == p:
            return      # the same live tensor as last time: no pool tensor can overlap it anew
        self._checked_out = (out, p)
        for key, (lo, hi) in list(self._spans.items()):
            if lo <= p < hi:
                del self._owned[key], self._spans[key]

    def bind(self, name: str, t: torch.Tensor) -> None:
        old = self.slots.get(name)
        self.slots[name] = t
        if old is not None and old is not t and self.recycle and id(old) in self._owned:
            for v in self.slots.values():
                if v is old:
                    return
            self._free.append(old)

    # -- the two calls ---------------------------------------------------------------------
    def call_model(self, x: torch.Tensor, sigma, t, s, row=None) -> torch.Tensor:
        """The model on ``x`` at host floats or per-row [B] tensors (sigma, t, s); ``row``:
        the [B] time (or sigma, for a Denoiser) tensor of host floats, made beforehand."""
        if isinstance(t, torch.Tensor):
            out = self.adapter.call_rows(x, t, sigma, s)
        else:
            out = self.adapter(x, sigma, t, s, row=row)
        self._pin_aliases(out)
        return out

    def apply(self, dst: str, bufs: list, coef, noise_coef=0.0, seeds=None, step=-1,
              aux_dst: str | None = None, aux_coef=None, noise=None, mask_coef=None,
              index: int | None = None) -> None:
        """The fused update ``dst = sum_k coef_k * slots[bufs_k] + noise_coef * z`` (and
        ``aux_dst``), written into the walk's own tensors; the mask blend when ``mask_coef``
        is given. ``index``: the program's update index, when the numbers are the plan's
        host numbers (the validation key is then the update itself)."""
        slots = self.slots
        ins = [slots[b] for b in bufs]
        out = self.take()
        aux = self.take() if aux_dst is not None else None
        kw = self.kw
        if mask_coef is not None:
            kw = dict(kw, mask=self.mask, mask_coef=mask_coef)
        if self._trusted and index is not None:
            # host numbers of a program: everything but the model output's dtype, the state's
            # shape and the noise source is fixed per update
            if self._like_key is None:
                self._like_key = (tuple(self.like.shape), str(self.like.device))
            key = _host_key(index, ins[-1].dtype, self._like_key, noise, seeds, mask_coef,
                            aux)
            validated = self.program.validated
            if key not in validated:
                _validate(out, ins, coef, noise_coef, seeds, step, aux, aux_coef, noise=noise,
                          backend=self.backend, **kw)
                validated.add(key)
            if self._launch is not None and noise is None and mask_coef is None and \
                    self._launch(out, ins, coef, noise_coef, seeds, step, aux, aux_coef):
                self.bind(dst, out)
                if aux is not None:
                    self.bind(aux_dst, aux)
                return
            kw = self._kw_trusted if kw is self.kw else dict(kw, trusted=True)
        elif self._trusted:
            # The steady state runs without Python re-validation: each update of the plan is
            # checked against the contract once per program, shape, noise mode, mask and
            # table kind (the model outputs it reads were checked by the adapter: shape,
            # device, a float dtype); the walk's outputs are its own fresh or recycled
            # tensors, which overlap no input.
            if self._like_key is None:
                self._like_key = (tuple(self.like.shape), str(self.like.device))
            key = (aux is None, mask_coef is None, noise is None, seeds is None, type(step),
                   type(noise_coef), getattr(coef, "ndim", 1), self._like_key)
            if self.program is not None:        # the plan's own buffer lists: fixed ids
                key = (id(bufs), ins[-1].dtype) + key
                validated = self.program.validated
            else:                               # lists made per call (the scheduler's)
                key = (tuple(bufs), tuple([t.dtype for t in ins])) + key
                validated = self._validated
            if key not in validated:
                _validate(out, ins, coef, noise_coef, seeds, step, aux, aux_coef, noise=noise,
                          backend=self.backend, **kw)
                validated.add(key)
            kw = self._kw_trusted if kw is self.kw else dict(kw, trusted=True)
        self.backend.fused_update(out, ins, coef, noise_coef, seeds, step, aux, aux_coef,
                                  noise=noise, **kw)
        self.bind(dst, out)
        if aux is not None:
            self.bind(aux_dst, aux)

    # -- ops -------------------------------------------------------------------------------
    def evaluate(self, op: Eval, i: int, output: torch.Tensor | None = None) -> None:
        """Model evaluation ``i`` (or bind the caller's ``output`` of it)."""
        if self.noise is not None and type(self.noise) is not PhiloxDraws:
            self.noise.at_eval(op)
        if output is not None:
            like = self.slots.get(op.src)
            if like is not None:                 # the caller's model output, as a model's
                output = ModelAdapter._check(output, like)
            self._pin_aliases(output)
            self.bind(op.dst, output)
        else:
            src = self.slots[op.src]
            sigma, t, s = self.numbers.times(i, op)
            if op.guidance is not None:
                # Classifier-free guidance: one call on the doubled batch (unconditional half
                # first, as diffusers pipelines do); the updates read the halves as two
                # buffers with the guidance folded into their coefficients.
                B = src.shape[0]
                out = self.call_model(torch.cat([src, src]), sigma, t, s)
                self.bind(op.dst + "/u", out[:B])
                self.bind(op.dst + "/c", out[B:])
            else:
                row = None
                if not self.numbers.rows:
                    row = self._time_row(i, src)
                self.bind(op.dst, self.call_model(src, sigma, t, s, row))
        if self.callback is not None:
            self.callback(op.step, op.sigma, self.slots)

    def _time_row(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Evaluation i's [B] model times (sigmas for a Denoiser), made for all evaluations
        of the walk at once (one small tensor instead of one per model call)."""
        B = x.shape[0]
        if self._rows is None or self._rows_b != B:
            tdt = torch.float64 if x.dtype == torch.float64 else torch.float32
            den = self.adapter.is_denoiser
            # kept on the program for the next walk of the same batch size, dtype and device
            key = (B, tdt, x.device, den)
            cache = self.program.time_rows
            entry = cache.get(key)
            if entry is None or entry[0][0]._version != entry[1]:
                vals = [op.sigma if den else op.t for op in self.program.evals]
                t = torch.tensor(vals, dtype=tdt).view(-1, 1).expand(-1, B).contiguous()
                rows = list(t.to(x.device).unbind(0))
                entry = cache[key] = (rows, rows[0]._version)
            self._rows, self._rows_v = entry
            self._rows_b = B
        row = self._rows[i]
        if row._version != self._rows_v:
            # the model changed a time row in place (the rows share one version counter):
            # this walk and later ones make new rows
            self.program.time_rows.clear()
            self._rows = None
            return self._time_row(i, x)
        return row

    def update(self, op: Update, i: int) -> None:
        """Fused update ``i`` with the numbers source's coefficients."""
        if self._host:
            coef, aux_coef, nc = self.program.host_lists()[i]
            mask_coef = op.mask_coefs
        else:
            coef, aux_coef, nc, mask_coef = self.numbers.update(i, op)
        seeds, step, z = None, -1, None
        if op.noise_index >= 0 and self.noise is not None:
            seeds, step, z = self.noise.draw(op, self.like)
            if seeds is None and z is None:
                nc = 0.0
        elif op.noise_index >= 0 and (isinstance(nc, torch.Tensor) or nc != 0.0):
            raise ValueError(f"the {op.kind} update draws noise but the walk has no noise "
                             f"source")
        self.apply(op.dst, op.bufs, coef, nc, seeds, step, op.aux_dst, aux_coef, z, mask_coef,
                   i if self._host else None)

    def execute(self, ins) -> None:
        kind, op, ref = ins
        if kind == UPDATE:
            self.update(op, ref)
        elif kind == EVAL:
            self.evaluate(op, ref)
        else:
            ref(op, self)

    def run(self) -> torch.Tensor:
        """The whole plan; returns the output slot."""
        if self._host and self._launch is not None and self.callback is None and \
                self.adapter is not None and not self.adapter.is_denoiser and \
                (self.noise is None or type(self.noise) is PhiloxDraws):
            return self._run_steady()
        update, evaluate = self.update, self.evaluate
        for kind, op, ref in self.program.instructions:
            if kind == UPDATE:
                update(op, ref)
            elif kind == EVAL:
                evaluate(op, ref)
            else:
                ref(op, self)
        return self.slots[self.program.output]

    def _run_steady(self) -> torch.Tensor:
        """:meth:`run` for the eager walk of host numbers on a backend with a steady-state
        launcher: the same ops in the same order, with the commonest two written out (a
        plain model call; a noiseless, maskless update whose call structure was validated
        before) and everything else through :meth:`evaluate` / :meth:`update`."""
        prog = self.program
        lists, validated, launch = prog.host_lists(), prog.validated, self._launch
        call_row, time_row, pin, bind, take = (self.adapter.call_row, self._time_row,
                                               self._pin_aliases, self.bind, self.take)
        slots = self.slots
        if self._like_key is None:
            self._like_key = (tuple(self.like.shape), str(self.like.device))
        # per state layout, the model-output dtype each update was found valid with (kept on
        # the program: each update runs once per walk)
        seen = prog.steady_seen.get(self._like_key)
        if seen is None:
            seen = prog.steady_seen[self._like_key] = [None] * len(prog.updates)
        for kind, op, ref in prog.instructions:
            if kind == EVAL:
                if op.guidance is not None:
                    self.evaluate(op, ref)
                    continue
                src = slots[op.src]
                out = call_row(src, time_row(ref, src))
                pin(out)
                bind(op.dst, out)
            elif kind == UPDATE:
                if op.noise_index >= 0 or op.mask_coefs is not None:
                    self.update(op, ref)
                    continue
                ins = [slots[b] for b in op.bufs]
                dt = ins[-1].dtype
                if seen[ref] is not dt:
                    # the key apply() records once it validated this update's structure
                    if _host_key(ref, dt, self._like_key, None, None, None,
                                 op.aux_dst) not in validated:
                        self.update(op, ref)
                        continue
                    seen[ref] = dt
                coef, aux_coef, _ = lists[ref]
                out = take()
                aux = None if op.aux_dst is None else take()
                if not launch(out, ins, coef, 0.0, None, -1, aux, aux_coef):
                    self.backend.fused_update(out, ins, coef, 0.0, None, -1, aux, aux_coef,
                                              **self._kw_trusted)
                bind(op.dst, out)
                if aux is not None:
                    bind(op.aux_dst, aux)
            else:
                ref(op, self)
                slots = self.slots
        return self.slots[prog.output]

    def run_segment(self, k: int, output: torch.Tensor | None = None) -> None:
        """Segment ``k``: model call k (or the caller's ``output`` for it) and the ops up to
        the next model call (``k = -1``: the prologue)."""
        if k < 0:
            for ins in self.program.prologue:
                self.execute(ins)
            return
        seg = self.program.segments[k]
        _, op, i = seg[0]
        self.evaluate(op, i, output)
        for ins in seg[1:]:
            self.execute(ins)
