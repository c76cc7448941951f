"""A plan's numbers in device memory (the numbers source of the compiled loop)."""

from __future__ import annotations

import numpy as np
import torch

from ..plan import Custom, Eval, Plan, Update

__all__ = ["DeviceTables", "plan_signature", "to_device"]


def _draws(op: Update) -> bool:
    """Whether an update adds noise (a draw with a zero coefficient adds nothing)."""
    return op.noise_index >= 0 and op.noise != 0.0


def plan_signature(plan: Plan) -> tuple:
    """What a compiled loop depends on besides the coefficient values: the kinds of the ops,
    the buffers they read and write, which updates draw noise (and their draw numbers), which
    blend with the inpainting mask, the output slot, and custom ops in full (their parameters
    are baked into the loop). Two plans with equal signatures share a compiled loop;
    switching between them rewrites the tables."""
    sig: list = [plan.output]
    for op in plan.ops:
        if isinstance(op, Eval):
            sig.append(("eval", op.src, op.dst, op.guidance is not None))
        elif isinstance(op, Update):
            sig.append(("update", op.dst, tuple(op.bufs), op.noise_index if _draws(op) else -1,
                        op.aux_dst, op.mask_coefs is not None))
        else:
            assert isinstance(op, Custom)
            sig.append(("custom", type(op).__qualname__, repr(op)))
    return tuple(sig)


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_device(dst: torch.Tensor, host: np.ndarray) -> None:
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
      equal for a plain plan), its aux and mask coefficients and its [B] noise coefficients --
      the fused kernels read them from device memory, so a captured graph replays whatever
      the table holds;
    * per evaluation the model's time, sigma and scale as [B] rows (2B with guidance: the
      doubled batch), in the model's time dtype (float32, float64 for float64 states).

    As a numbers source of the walk: ``update(i, op)`` and ``times(i, op)`` return views of
    the tables. :meth:`load` rewrites everything in place for any plan with the same
    :func:`plan_signature`."""

    rows = True

    def __init__(self, plan: Plan, batch: int, device, dtype: torch.dtype):
        self.signature = plan_signature(plan)
        self.batch = B = int(batch)
        self.device = torch.device(device)
        ups = [op for op in plan.ops if isinstance(op, Update)]
        evs = [op for op in plan.ops if isinstance(op, Eval)]
        n = 0
        self._layout = []   # per update: offsets of coef, aux, mask (or -1), noise (or -1)
        for op in ups:
            K = len(op.bufs)
            c, n = n, n + B * K
            a = m = z = -1
            if op.aux_dst is not None:
                a, n = n, n + B * K
            if op.mask_coefs is not None:
                m, n = n, n + B * K
            if _draws(op):
                z, n = n, n + B
            self._layout.append((c, a, m, z, K))
        self.flat = torch.zeros(max(n, 1), dtype=torch.float64, device=self.device)
        f = self.flat

        def block(off, K):
            return None if off < 0 else f[off:off + B * K].view(B, K)
        self._update = [(block(c, K), block(a, K), 0.0 if z < 0 else f[z:z + B], block(m, K))
                        for c, a, m, z, K in self._layout]
        rows = [2 * B if op.guidance is not None else B for op in evs]
        self._eval_off = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        m = int(self._eval_off[-1])
        # [3, sum of rows]: sigma, model time, scale of each evaluation's rows
        self.times_table = torch.zeros((3, max(m, 1)), dtype=time_dtype(dtype),
                                       device=self.device)
        tt = self.times_table
        self._times = [(tt[0, lo:hi], tt[1, lo:hi], tt[2, lo:hi])
                       for lo, hi in zip(self._eval_off[:-1].tolist(), self._eval_off[1:].tolist())]
        self.loaded = None
        self.load(plan)

    # -- the numbers-source interface -------------------------------------------------------
    def update(self, i: int, op: Update):
        return self._update[i]

    def times(self, i: int, op: Eval):
        return self._times[i]

    # -- loading ---------------------------------------------------------------------------
    def host(self, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """The host arrays :meth:`load` copies (float64 table, [3, rows] times)."""
        B = self.batch
        flat = np.zeros(self.flat.numel(), dtype=np.float64)
        ups = [op for op in plan.ops if isinstance(op, Update)]
        for op, (c, a, m, z, K) in zip(ups, self._layout):
            flat[c:c + B * K] = np.tile(op.coefs, B)
            if a >= 0:
                flat[a:a + B * K] = np.tile(op.aux_coefs, B)
            if m >= 0:
                flat[m:m + B * K] = np.tile(op.mask_coefs, B)
            if z >= 0:
                flat[z:z + B] = op.noise
        times = np.zeros(tuple(self.times_table.shape), dtype=np.float64)
        evs = [op for op in plan.ops if isinstance(op, Eval)]
        for i, op in enumerate(evs):
            lo, hi = int(self._eval_off[i]), int(self._eval_off[i + 1])
            times[:, lo:hi] = np.array([[op.sigma], [op.t], [op.s]])
        return flat, times

    def load(self, plan: Plan) -> None:
        """Write ``plan``'s numbers into the tables (same signature required)."""
        if plan is self.loaded:
            return
        if plan_signature(plan) != self.signature:
            raise ValueError(f"plan {plan.solver!r} ({len(plan.sigmas) - 1} steps) has another "
                             f"structure than the tables were laid out for")
        flat, times = self.host(plan)
        to_device(self.flat, flat)
        to_device(self.times_table, times)
        self.loaded = plan
