"""The tunable plan: a base solver's plan with a fitted schedule, evaluation times and
coefficient corrections, exported as an ordinary :class:`~pyengine.plan.Plan`.

Three groups of parameters, all zero at the start (the zero plan *is* the base plan,
bitwise: same ops, same float64 numbers):

* ``theta`` (numpy float64, one per log-sigma increment but the last) -- the schedule. The
  positive levels p_0 > ... > p_{n-1} of the base grid keep their two ends; the increments
  d_i = log p_i - log p_{i+1} become d_i exp(theta_i) (theta_{n-2} = 0), rescaled to the same
  total, so any theta gives a strictly decreasing grid with the same ends (a final 0 stays).
  On a grid that ends at 0 the last positive level p_{n-1} moves too (one more entry, see
  ``free_end``): the final step to 0 is then a real step of the solver, not a model call
  spent at sigma_min, and only the plan's true ends (p_0 and 0) are fixed.
  The plan is rebuilt with :func:`pyengine.sampler.build_plan` on the new grid (float64 host
  code, not differentiable): the schedule is fitted derivative-free.
* ``phi`` (torch float64, one per model evaluation) -- decoupled evaluation times. Evaluation
  i at model time t_i is called at

      t_i + frac * tanh(phi_i) * (gap above if phi_i > 0 else gap below)

  where the gaps are those to the neighbouring distinct evaluation times of the plan (the
  process's model times at sigma_max / sigma_min beyond the ends). Only the model's time input
  (``Eval.t``) moves; ``Eval.sigma`` and ``Eval.s`` (which fold the model's parameterization
  into the coefficients) stay the level of the state the model is given.
* ``z`` (torch float64) -- coefficient corrections. Update j's coefficients become
  ``coefs + W_j N_j z_j`` (``aux_coefs`` are left alone), where N_j spans the null space of
  the update's consistency system below and W_j is a diagonal scaling that makes one unit
  of z change the update's output by about one unit of its own magnitude. N_j is built by
  elimination, not by an SVD: coordinate i of z_j moves the coefficient of the i-th buffer
  outside a fixed pivot pair (the best conditioned pair of columns on the base grid) and
  the pivot pair absorbs it. So a coordinate names one buffer's coefficient on every grid
  (an SVD basis of a null space of dimension >= 2 is whichever orthonormal basis LAPACK
  returns), which the alternation of :func:`pyengine.tuning.tune` relies on when it moves
  the schedule with z held.

**The consistency condition.** Take a model whose denoiser is a constant, D(x, sigma) = c.
The exact PF-ODE solution from any state is then x_hat(sigma) = c + sigma k with k constant,
so every buffer the walk holds is a linear function of the pair (c, k): a state at level
sigma with scale s is s (c + sigma k); a model output of the plan's prediction kind is the
corresponding combination (epsilon: k; sample: c; v: s k - s sigma c; flow: k - c;
score: -k / (s sigma); read off :func:`pyengine.parameterization.output_from_denoised`); an
aux output is the combination its aux coefficients make. Writing v_b in R^2 for buffer b,
every update must map the exact solution to the exact solution:

    sum_b coef_b v_b = s(sigma') (1, sigma')        (sigma', s(sigma'): the level written)

a 2 x K linear system. The registry's deterministic solvers satisfy it (to 1e-15) but for
three ComfyUI ports: deis and ipndm_v (order 4), whose quadrature weights miss it by about
1e-5, and unipc_comfy's final step to 0 (x = (x + D) / 2, which leaves sigma_min k / 2).
The corrections live in its null space, so the tuned plan satisfies it exactly too (to
rounding) whatever z is. An update with K <= 2 buffers (or a rank-deficient system) has no
freedom; an update whose base coefficients miss the condition (relative residual above
1e-9, ``TunablePlan.residuals``) is left uncorrected. With time shifts the condition still
holds for a model whose denoiser is constant in x and t (the sample prediction of such a
model does not depend on the time).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..parameterization import output_from_denoised
from ..plan import Custom, Eval, Plan, Update

__all__ = ["TunablePlan", "consistency_systems"]


def _state_vec(sigma: float, s: float) -> np.ndarray:
    """(c, k) coefficients of a state s (c + sigma k) (sigma = inf: the pure-noise state k)."""
    if math.isinf(sigma):
        return np.array([0.0, 1.0])
    return np.array([s, s * sigma])


def _output_vec(prediction: str, sigma: float, s: float) -> np.ndarray:
    """(c, k) coefficients of the model output (prediction kind) on the exact state at sigma
    of a model whose denoiser is the constant c."""
    sd = 1.0 if math.isinf(sigma) else s * sigma
    out = []
    for c, k in ((1.0, 0.0), (0.0, 1.0)):
        x = s * c + sd * k
        out.append(float(output_from_denoised(prediction, x, c, s, sd)))
    return np.array(out)


def consistency_systems(plan: Plan, process, prediction: str):
    """Per update of ``plan``: (A [2, K], target [2], residual) of the consistency condition
    (module docstring); ``residual`` is |A coefs - target| relative to the terms' size."""
    vec: dict[str, np.ndarray] = {}
    s0 = 0.0 if math.isinf(plan.sigmas[0]) else float(process.s_of_sigma(float(plan.sigmas[0])))
    vec["x"] = _state_vec(float(plan.sigmas[0]), s0)
    out = []
    for op in plan.ops:
        if isinstance(op, Eval):
            v = _output_vec(prediction, op.sigma, op.s)
            if op.guidance is not None:
                vec[op.dst + "/u"] = v
                vec[op.dst + "/c"] = v
            else:
                vec[op.dst] = v
        elif isinstance(op, Update):
            A = np.stack([vec[b] for b in op.bufs], axis=1)
            target = _state_vec(op.sigma, op.scale)
            got = A @ op.coefs
            size = np.abs(A) @ np.abs(op.coefs) + np.abs(target)
            res = float(np.max(np.abs(got - target) / np.maximum(size, 1e-300)))
            out.append((A, target, res))
            vec[op.dst] = target        # each update is judged on exact inputs
            if op.aux_dst is not None:
                vec[op.aux_dst] = A @ op.aux_coefs
        else:
            raise ValueError(f"plan {plan.solver!r} holds a {type(op).__name__} op; a tunable "
                             f"plan has model evaluations and fused updates only")
    return out


def _pivot_pair(Aw: np.ndarray) -> tuple[int, int]:
    """The two buffers whose (scaled) columns of the 2 x K consistency system are the best
    conditioned pair: they absorb each correction; the other K - 2 are its coordinates."""
    K = Aw.shape[1]
    best, pair = -1.0, (0, 1)
    for a in range(K):
        for b in range(a + 1, K):
            M = Aw[:, [a, b]]
            den = float(np.linalg.norm(M[:, 0]) * np.linalg.norm(M[:, 1]))
            q = abs(float(np.linalg.det(M))) / den if den > 0 else 0.0
            if q > best + 1e-12:
                best, pair = q, (a, b)
    return pair


def _null_basis(Aw: np.ndarray, pivots: tuple[int, int]) -> np.ndarray:
    """A basis [K, K - 2] of the null space of the rank-2 system ``Aw``: coordinate i moves
    the i-th non-pivot buffer's coefficient by one and the two pivot buffers' so that the
    system still holds. Unlike an SVD basis it depends smoothly on the grid (no sign flips
    or rotations), so fitted coordinates keep their meaning when the schedule moves."""
    K = Aw.shape[1]
    piv = list(pivots)
    free = [i for i in range(K) if i not in piv]
    N = np.zeros((K, len(free)))
    N[free, range(len(free))] = 1.0
    N[piv, :] = -np.linalg.solve(Aw[:, piv], Aw[:, free])
    return N


def _structure(plan: Plan):
    return [(type(op).__name__, getattr(op, "src", None), op.dst,
             tuple(op.bufs) if isinstance(op, Update) else None,
             getattr(op, "aux_dst", None), getattr(op, "noise_index", None))
            for op in plan.ops]


def _conform(plan: Plan, base: Plan) -> None:
    """Give ``plan``'s updates the buffer lists of ``base``'s where they differ only by
    terms the plan builder drops when their coefficient is exactly 0 (a coefficient that is 0
    on one grid can be a rounding residue such as 2e-16 on another): missing buffers get
    coefficient 0, extra buffers whose coefficients are rounding residues are dropped."""
    if len(plan.ops) != len(base.ops):
        return
    for op, ref in zip(plan.ops, base.ops):
        if not (isinstance(op, Update) and isinstance(ref, Update)) or op.bufs == ref.bufs \
                or op.dst != ref.dst:
            continue
        scale = max(float(np.abs(op.coefs).max()), 1e-300)
        extra = [k for k, b in enumerate(op.bufs) if b not in ref.bufs]
        if any(abs(op.coefs[k]) > 1e-13 * scale or
               (op.aux_coefs is not None and op.aux_coefs[k] != 0.0) for k in extra):
            continue                                # a real difference: reported by caller
        if len(set(op.bufs)) != len(op.bufs):
            continue
        pos = {b: k for k, b in enumerate(op.bufs)}

        def pick(c):
            return None if c is None else np.array(
                [c[pos[b]] if b in pos else 0.0 for b in ref.bufs], dtype=np.float64)
        op.coefs, op.aux_coefs = pick(op.coefs), pick(op.aux_coefs)
        op.mask_coefs = pick(op.mask_coefs)
        op.bufs = list(ref.bufs)


class TunablePlan:
    """A base sampler's plan with tunable schedule, evaluation times and coefficients
    (module docstring). ``time_fraction`` bounds the time shifts (a fraction of the gap to
    the neighbouring evaluation time, at most 0.5 so that shifted times keep their order).
    ``free_end``: on a grid that ends at 0, the last positive level is a schedule parameter
    too (theta's last entry tau: log p_last rises by (1 - exp(-tau^2)) / 2 of the grid's
    log span); otherwise both ends stay."""

    def __init__(self, sampler, *, time_fraction: float = 0.5, free_end: bool = True):
        plan = sampler.plan
        info = sampler.info
        if plan.n_noise or any(isinstance(op, Update) and op.noise_index >= 0
                               for op in plan.ops):
            raise ValueError(f"sampler: solver {info.name!r} draws noise; a tuned plan is "
                             f"fitted to the deterministic probability-flow ODE, so the base "
                             f"solver must be deterministic (e.g. dpmpp_2m, unipc, ipndm)")
        customs = [type(op).__name__ for op in plan.ops if isinstance(op, Custom)]
        if customs:
            raise ValueError(f"sampler: the plan of {info.name!r} holds custom ops "
                             f"({', '.join(sorted(set(customs)))}) whose numbers depend on the "
                             f"data; a tuned plan is made of fixed tables only (guidance "
                             f"rescale, clipping and Langevin steps cannot be tuned)")
        if info.family == "inversion":
            raise ValueError(f"sampler: {info.name!r} is an inversion solver; tuning fits "
                             f"plans that sample (noise to data)")
        if sampler.timesteps is not None:
            raise ValueError("sampler: explicit timesteps= pin the model times to the base "
                             "grid's levels, so the schedule cannot move; build the sampler "
                             "without timesteps=")
        time_fraction = float(time_fraction)
        if not 0.0 <= time_fraction <= 0.5:
            raise ValueError(f"time_fraction must be in [0, 0.5], got {time_fraction!r}")
        self.sampler = sampler
        self.process = sampler.process
        self.prediction = sampler.prediction
        self.time_fraction = time_fraction
        self.base_plan = plan
        self.base_sigmas = np.array(sampler.sigmas, dtype=np.float64)
        sig = self.base_sigmas
        self._zero_end = bool(sig[-1] == 0.0)
        pos = sig[:-1] if self._zero_end else sig
        if not np.all(np.isfinite(pos)) or pos.size < 1:
            raise ValueError("sampler: a tunable schedule needs finite positive levels")
        self._log_pos = np.log(pos)
        self._inc = -np.diff(self._log_pos)                     # > 0
        # a grid ending at 0: its last positive level is free too (the plan's end, 0, stays)
        self._free_end = bool(free_end and self._zero_end and pos.size >= 2)
        self.theta = np.zeros(max(0, self._inc.size - 1) + int(self._free_end))
        self._structure = _structure(plan)
        self._dims = None                       # null-space dimension per update (base grid)
        self._set_plan(copy.deepcopy(plan))
        self.phi = torch.zeros(len(self._evals), dtype=torch.float64)
        self.z = torch.zeros(self.n_coef, dtype=torch.float64)

    # -- the schedule ----------------------------------------------------------------------
    def sigmas_for(self, theta) -> np.ndarray:
        """The grid of schedule parameters ``theta`` (theta == 0: the base grid, bitwise)."""
        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        if theta.shape != self.theta.shape:
            raise ValueError(f"theta must have {self.theta.size} entries, got {theta.size}")
        if not np.all(theta == 0.0):
            if not np.all(np.isfinite(theta)):
                raise ValueError("theta must be finite")
            last = self.base_sigmas[self._log_pos.size - 1]
            total = self._inc.sum()
            if self._free_end:
                tau, theta = theta[-1], theta[:-1]
                if tau != 0.0:      # up to halfway (in log sigma) to the first level
                    lift = 0.5 * total * -math.expm1(-tau * tau)
                    last, total = math.exp(self._log_pos[-1] + lift), total - lift
            w = self._inc * np.exp(np.append(np.clip(theta, -30.0, 30.0), 0.0))
            w = w * (total / w.sum())
            logp = self._log_pos[0] - np.concatenate([[0.0], np.cumsum(w)])
            pos = np.exp(logp)
            pos[0], pos[-1] = self.base_sigmas[0], last                        # the ends
            if not np.all(np.diff(pos) < 0):
                raise ValueError("theta gives levels that are not strictly decreasing "
                                 "(increments below float64 resolution)")
            return np.append(pos, 0.0) if self._zero_end else pos
        return self.base_sigmas.copy()

    def theta_for(self, sigmas) -> np.ndarray:
        """The schedule parameters of a grid (the inverse of :meth:`sigmas_for`): same
        length and first level as the base grid, strictly decreasing, ending at 0 when the
        base grid does; its last positive level the base's (or, with ``free_end``, at most
        halfway up in log sigma). ValueError when the grid cannot be represented."""
        sig = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        base = self.base_sigmas
        if sig.shape != base.shape or sig[0] != base[0] or (sig[-1] == 0.0) != self._zero_end \
                or not np.all(np.diff(sig) < 0):
            raise ValueError(f"sigmas must be a strictly decreasing grid of {base.size} levels "
                             f"from {base[0]:.6g}" + (" to 0" if self._zero_end else ""))
        pos = sig[:-1] if self._zero_end else sig
        logp = np.log(pos)
        inc = -np.diff(logp)
        total = self._inc.sum()
        lift = float(logp[-1] - self._log_pos[-1])
        tail = []
        if self._free_end:
            frac = 2.0 * lift / total
            if not -1e-12 <= frac < 1.0:
                raise ValueError("sigmas: the last positive level is below the base grid's or "
                                 "above halfway (in log sigma) to the first level")
            tail = [math.sqrt(-math.log1p(-max(frac, 0.0)))]
        elif abs(lift) > 1e-12 * max(1.0, abs(self._log_pos[-1])):
            raise ValueError("sigmas: the last level differs from the base grid's (free_end "
                             "is off)")
        r = np.log(inc / self._inc)
        return np.append(r[:-1] - r[-1], tail)

    def set_schedule(self, theta) -> None:
        """Rebuild the plan on the grid of ``theta``. Time and coefficient parameters keep
        their values as coordinates (the bases they scale are recomputed for the new grid):
        fit the schedule first, then times and coefficients."""
        from ..sampler import build_plan

        theta = np.asarray(theta, dtype=np.float64).reshape(-1)
        sig = self.sigmas_for(theta)
        if np.all(theta == 0.0):
            plan = copy.deepcopy(self.base_plan)
        else:
            s = self.sampler
            plan = build_plan(self.process, s.solver, sig, self.prediction,
                              guidance_scale=s.guidance_scale,
                              guidance_rescale=s.guidance_rescale, **s.options)
        _conform(plan, self.base_plan)
        if _structure(plan) != self._structure:
            raise RuntimeError(f"the {self.sampler.solver!r} plan on the tuned grid has "
                               f"another op structure than on the base grid")
        self.theta = theta.copy()
        self._set_plan(plan)

    def _set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self._evals = [op for op in plan.ops if isinstance(op, Eval)]
        self._updates = [op for op in plan.ops if isinstance(op, Update)]
        # time bases: the gaps to the neighbouring distinct evaluation times
        p = self.process
        t_hi = float(p.model_time(float(p.sigma_max)))
        t_lo = float(p.model_time(float(p.sigma_min)))
        ts = np.array([op.t for op in self._evals], dtype=np.float64)
        uniq = np.unique(ts)
        up, down = np.zeros_like(ts), np.zeros_like(ts)
        for i, t in enumerate(ts):
            above, below = uniq[uniq > t], uniq[uniq < t]
            up[i] = (above.min() if above.size else max(t_hi, t)) - t
            down[i] = t - (below.max() if below.size else min(t_lo, t))
        self._t_base = torch.from_numpy(ts)
        self._t_up = torch.from_numpy(up * self.time_fraction)
        self._t_down = torch.from_numpy(down * self.time_fraction)
        # coefficient bases: W N per update (numpy float64), and its torch copy
        self._bases, self._slices = [], []
        off = 0
        systems = consistency_systems(plan, self.process, self.prediction)
        first = self._dims is None
        if first:
            self._dims = []
            self.residuals = [res for _, _, res in systems]
        if first:
            self._pivots = []
        for j, (op, (A, target, res)) in enumerate(zip(self._updates, systems)):
            K = len(op.bufs)
            m = np.sqrt((A * A).sum(0))
            mt = math.sqrt(float(target @ target))
            w = np.where(m > 0, mt / np.where(m > 0, m, 1.0), 0.0)
            Aw = A * w[None, :]
            sv = np.linalg.svd(Aw, compute_uv=False)
            rank = int(np.sum(sv > 1e-12 * max(sv.max(initial=0.0), 1e-300)))
            if first:
                # an update the base solver itself does not keep consistent stays as it is
                self._dims.append(K - rank if res <= 1e-9 and rank == 2 else 0)
                self._pivots.append(_pivot_pair(Aw) if self._dims[j] else None)
            dim = self._dims[j]
            if dim and K - rank != dim:
                raise RuntimeError(f"update {j} of the tuned grid's plan has a consistency "
                                   f"system of another rank than on the base grid")
            basis = w[:, None] * _null_basis(Aw, self._pivots[j]) if dim else np.zeros((K, 0))
            self._bases.append(torch.from_numpy(np.ascontiguousarray(basis)))
            self._slices.append(slice(off, off + basis.shape[1]))
            off += basis.shape[1]
        self.n_coef = off

    # -- the tables ------------------------------------------------------------------------
    @property
    def n_times(self) -> int:
        return len(self._evals)

    def times(self, phi: torch.Tensor | None = None) -> torch.Tensor:
        """The model times of the evaluations (torch float64, differentiable in ``phi``)."""
        phi = self.phi if phi is None else phi
        # the gap on the side phi points to; at phi == 0 (value t_base) the mean of both, so
        # that the gradient there is not 0 for an evaluation with room on one side only
        gap = torch.where(phi > 0, self._t_up,
                          torch.where(phi < 0, self._t_down, 0.5 * (self._t_up + self._t_down)))
        return self._t_base + torch.tanh(phi) * gap

    def coefficients(self, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every update's coefficients (torch float64 [K], differentiable in ``z``)."""
        z = self.z if z is None else z
        out = []
        for op, basis, sl in zip(self._updates, self._bases, self._slices):
            base = torch.from_numpy(op.coefs)
            out.append(base + basis @ z[sl] if basis.shape[1] else base)
        return out

    def to_plan(self) -> Plan:
        """The tuned plan: an ordinary Plan (float64 numpy tables, a deep copy). With all
        parameters zero it equals the base plan bitwise (same ops, same numbers)."""
        plan = copy.deepcopy(self.plan)
        plan.__dict__.pop("_program", None)
        evals = [op for op in plan.ops if isinstance(op, Eval)]
        updates = [op for op in plan.ops if isinstance(op, Update)]
        with torch.no_grad():
            phi = self.phi.detach()
            if bool((phi != 0).any()):
                t = self.times(phi).numpy()
                for i, op in enumerate(evals):
                    if phi[i] != 0:
                        op.t = float(t[i])
            z = self.z.detach()
            for op, basis, sl in zip(updates, self._bases, self._slices):
                if basis.shape[1] and bool((z[sl] != 0).any()):
                    op.coefs = op.coefs + (basis @ z[sl]).numpy()
        return plan

    def describe(self) -> str:
        return (f"TunablePlan({self.sampler.solver}, nfe={self.plan.nfe}, schedule params "
                f"{self.theta.size}, time params {self.n_times}, coefficient params "
                f"{self.n_coef})")
