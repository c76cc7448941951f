"""The schedule-only baseline: a noise-level grid chosen by dynamic programming over a fine
grid of teacher states (after GITS, Chen et al. 2024).

1. A teacher run on a fine grid (``fine_steps`` steps between the sampler's first and last
   positive levels, uniform in log sigma, plus the final level 0 when the sampler's grid ends
   there) with a high-order registry solver records, at every fine level i, the scaled state
   x_hat_i = x_i / s_i and the model's denoised estimate D_i at that state.
2. The cost of a coarse step i -> j (i < j) is the error of one data-prediction (DDIM / Euler
   in x_hat) step from the teacher's state at i, with no further model call:

       x_hat_j' = (sigma_j / sigma_i) x_hat_i + (1 - sigma_j / sigma_i) D_i
       cost(i, j) = mean over the batch of || x_hat_j' - x_hat_j ||_2

   ``weight="contraction"`` (a variant, not GITS's) multiplies cost(i, j) by the factor by
   which the PF-ODE of data with variance v shrinks an error made at level j by the end of
   the grid, sqrt((v + sigma_end^2) / (v + sigma_j^2)) (v: the per-coordinate variance of
   the teacher's endpoints), so that errors made at high noise, which the rest of the run
   contracts, count less. On the d = 24 Gaussian mixtures of tests/test_tuning_gits.py it
   is the more robust of the two (5-step grid error / Karras, six mixtures: ipndm
   0.44-0.55, unipc 0.29-0.60, against 0.35-1.05 and 0.56-0.82 unweighted).
3. Dynamic programming finds the path from the first fine level to the last with exactly N
   steps whose summed cost is least (:func:`dp_path`, O(N L^2) for L levels).

:func:`gits_schedule` returns that path's sigmas: a grid of N + 1 levels for any registry
solver (N steps; N model calls for a one-call-per-step solver such as dpmpp_2m, unipc,
ipndm). The fitted grid is a schedule, not a plan: ``pe.Sampler(process, solver,
sigmas=grid)`` runs it in every mode like any grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Trajectory", "dp_path", "gits_schedule", "step_costs", "teacher_trajectory"]

#: the default teacher: third order, one model call per step on the state at each level
TEACHER = "dpmpp_3m_corrected"


@dataclass
class Trajectory:
    """A teacher run recorded at every level of its grid: ``sigmas`` [L] (float64),
    ``x_hat`` [L, B, ...] (the scaled states), ``denoised`` [L - 1, B, ...] (the model's
    denoised estimate at each level but the last), ``solver`` and ``steps`` of the teacher."""

    sigmas: np.ndarray
    x_hat: torch.Tensor
    denoised: torch.Tensor
    solver: str
    steps: int


def _setting(sampler_or_process, prediction, sigma_max, sigma_min, to_zero):
    """(process, prediction, sigma_max, sigma_min, to_zero, init_noise_scale, guidance)."""
    from ..processes import Process
    from ..sampler import Sampler

    if isinstance(sampler_or_process, Sampler):
        s = sampler_or_process
        if s.info.family == "inversion":
            raise ValueError("gits_schedule: the sampler inverts data to noise; give a sampling "
                             "sampler")
        if s.guidance_rescale:
            raise ValueError("gits_schedule: guidance_rescale (a custom op) is not supported")
        pos = s.sigmas[s.sigmas > 0]
        hi = float(s.sigmas[0]) if sigma_max is None else float(sigma_max)
        lo = float(pos[-1]) if sigma_min is None else float(sigma_min)
        zero = bool(s.sigmas[-1] == 0) if to_zero is None else bool(to_zero)
        if prediction is not None and prediction != s.prediction:
            raise ValueError(f"gits_schedule: prediction={prediction!r} disagrees with the "
                             f"sampler's {s.prediction!r}")
        init = s.init_noise_scale if hi == float(s.sigmas[0]) else \
            float(s.process.prior_std(hi))
        return s.process, s.prediction, hi, lo, zero, init, s.guidance_scale
    if isinstance(sampler_or_process, Process):
        p = sampler_or_process
        hi = float(p.sigma_max if sigma_max is None else sigma_max)
        lo = float(p.sigma_min if sigma_min is None else sigma_min)
        return (p, prediction or "epsilon", hi, lo, True if to_zero is None else bool(to_zero),
                float(p.prior_std(hi)), None)
    raise TypeError(f"gits_schedule takes a pe.Sampler or a pe.processes process, got "
                    f"{type(sampler_or_process).__name__}")


def teacher_trajectory(sampler_or_process, model, noise: torch.Tensor, *,
                       fine_steps: int = 200, teacher: str = TEACHER,
                       prediction: str | None = None, sigma_max: float | None = None,
                       sigma_min: float | None = None, to_zero: bool | None = None,
                       extra_args: dict | None = None, backend: str | None = None,
                       **teacher_options) -> Trajectory:
    """The teacher's states and denoised estimates at every level of the fine grid (see the
    module docstring). ``noise`` is standard normal [B, ...]; it is scaled as the sampler
    scales it (its ``init_noise_scale``; for a process, the prior std at ``sigma_max``). The
    range and the final step to 0 are the sampler's unless given (for a process: its
    sigma_max, sigma_min, and to 0). ``teacher`` must be a deterministic registry solver
    that calls the model on the state at each level of its grid (dpmpp_2m, dpmpp_3m,
    dpmpp_3m_corrected, ipndm, deis, ...); the state and outputs are float64 when ``noise``
    is."""
    from ..parameterization import affine
    from ..runtime import Program
    from ..sampler import Sampler
    from ..schedules import exponential
    from ..solvers import get

    proc, pred, hi, lo, zero, init, w = _setting(sampler_or_process, prediction, sigma_max,
                                                 sigma_min, to_zero)
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 2:
        raise ValueError(f"fine_steps must be an integer >= 2, got {fine_steps!r}")
    info = get(teacher)
    if info.stochastic or info.family == "inversion":
        raise ValueError(f"teacher {teacher!r} must be a deterministic sampling solver")
    if not (hi > lo > 0):
        raise ValueError(f"need sigma_max > sigma_min > 0, got {hi!r} and {lo!r}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 2:
        raise ValueError("noise must be a floating tensor [B, ...]")
    n_pos = fine_steps if zero else fine_steps + 1
    fine = exponential(n_pos, lo, hi, append_zero=zero)
    fine[0], fine[n_pos - 1] = hi, lo                 # the range's ends exactly
    smp = Sampler(proc, solver=info.name, sigmas=fine, prediction=pred, init_noise_scale=init,
                  guidance_scale=w, backend=backend, **teacher_options)
    evals = Program.of(smp.plan).evals
    L = fine.size
    x_hat = torch.empty((L,) + tuple(noise.shape), dtype=noise.dtype, device=noise.device)
    den = torch.empty((L - 1,) + tuple(noise.shape), dtype=noise.dtype, device=noise.device)
    seen = np.zeros(L - 1, dtype=bool)
    count = [0]

    def record(step, sigma, slots):
        op = evals[count[0]]
        count[0] += 1
        k = op.step
        if op.src != "x" or seen[k] or not op.sigma == fine[k]:
            return
        x = slots["x"]
        out = slots[op.dst] if op.guidance is None else \
            (1.0 - op.guidance) * slots[op.dst + "/u"] + op.guidance * slots[op.dst + "/c"]
        (dx, do), _ = affine(pred, op.s, op.s * op.sigma)
        x_hat[k] = x / op.s
        den[k] = (x * dx if dx != 0.0 else 0.0) + out * do
        seen[k] = True

    with torch.no_grad():
        end = smp.sample(model, noise, extra_args=extra_args, callback=record)
    if not seen.all():
        missing = int(np.flatnonzero(~seen)[0])
        raise ValueError(f"teacher {teacher!r} does not call the model on the state at every "
                         f"level of its grid (not at level {missing}, sigma "
                         f"{fine[missing]:.6g}); pick a solver such as {TEACHER}")
    x_hat[L - 1] = end / float(proc.s_of_sigma(fine[-1]))
    return Trajectory(sigmas=fine, x_hat=x_hat, denoised=den, solver=info.name,
                      steps=fine_steps)


def step_costs(traj: Trajectory, *, weight: str = "none",
               max_elements: int = 1 << 22) -> np.ndarray:
    """[L, L] float64 costs: entry (i, j), i < j, is the batch-mean L2 error of one DDIM step
    from the teacher's state at level i to level j against the teacher's state at j; inf on
    and below the diagonal. ``weight``: "none" (GITS) or "contraction" (module docstring).
    Evaluated in chunks of at most ``max_elements`` numbers."""
    if weight not in ("none", "contraction"):
        raise ValueError(f"weight must be 'none' or 'contraction', got {weight!r}")
    sig = np.asarray(traj.sigmas, dtype=np.float64)
    L = sig.size
    xh = traj.x_hat.to(torch.float64)
    D = traj.denoised.to(torch.float64)
    B = xh.shape[1]
    per = max(1, xh[0].numel())
    chunk = max(1, max_elements // per)
    cost = np.full((L, L), np.inf)
    for i in range(L - 1):
        for a in range(i + 1, L, chunk):
            b = min(L, a + chunk)
            r = torch.from_numpy(sig[a:b] / sig[i]).to(xh.device).view(-1, *[1] * xh[0].dim())
            pred = r * xh[i] + (1.0 - r) * D[i]
            err = (pred - xh[a:b]).reshape(b - a, B, -1).norm(dim=2).mean(dim=1)
            cost[i, a:b] = err.cpu().numpy()
    if weight == "contraction":
        v = float(xh[-1].reshape(B, -1).var(dim=0).mean()) if B > 1 else 1.0
        cost = cost * np.sqrt((v + sig[-1] ** 2) / (v + sig ** 2))[None, :]
    return cost


def dp_path(cost: np.ndarray, steps: int) -> tuple[list[int], float]:
    """The path 0 = i_0 < i_1 < ... < i_steps = L - 1 minimising sum cost[i_k, i_{k+1}]:
    (indices, total). ``cost`` is [L, L] (entries on and below the diagonal are ignored);
    ties go to the smaller index."""
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"cost must be a square [L, L] array with L >= 2, got shape {c.shape}")
    L = c.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or \
            not 1 <= steps <= L - 1:
        raise ValueError(f"steps must be an integer in [1, {L - 1}] for {L} levels, got "
                         f"{steps!r}")
    c = np.where(np.triu(np.ones((L, L), dtype=bool), k=1), c, np.inf)
    best = np.full(L, np.inf)
    best[0] = 0.0
    back = np.zeros((steps + 1, L), dtype=np.int64)
    for k in range(1, steps + 1):
        tot = best[:, None] + c                      # [from, to]
        arg = np.argmin(tot, axis=0)
        back[k] = arg
        best = tot[arg, np.arange(L)]
    total = float(best[L - 1])
    if not math.isfinite(total):
        raise ValueError(f"no path of {steps} steps with finite cost")
    path = [L - 1]
    for k in range(steps, 0, -1):
        path.append(int(back[k][path[-1]]))
    return path[::-1], total


def gits_schedule(sampler_or_process, model, noise: torch.Tensor, nfe: int, *,
                  fine_steps: int = 200, extra_args: dict | None = None,
                  teacher: str = TEACHER, prediction: str | None = None,
                  sigma_max: float | None = None, sigma_min: float | None = None,
                  to_zero: bool | None = None, backend: str | None = None,
                  weight: str = "none", trajectory: Trajectory | None = None) -> np.ndarray:
    """The ``nfe + 1`` sigmas (``nfe`` steps) of the least-cost path over the teacher's fine
    grid (module docstring): run it with a one-call-per-step solver for ``nfe`` model calls
    (a two-call solver such as heun: ``nfe // 2`` steps). ``noise`` [B, ...] standard normal:
    the training noise (keep held-out noise apart). ``sampler_or_process``: a Sampler gives
    the process, prediction, range, the final step to 0 or not, its noise scale and guidance
    scale; a process needs ``prediction`` (default epsilon) and runs from its sigma_max to
    sigma_min, then 0 (``to_zero``). ``weight``: the step cost, "none" (GITS) or
    "contraction" (module docstring). ``trajectory``: a teacher run to reuse (from
    :func:`teacher_trajectory`; then model and noise are not used)."""
    if weight not in ("none", "contraction"):
        raise ValueError(f"weight must be 'none' or 'contraction', got {weight!r}")
    if trajectory is None:
        trajectory = teacher_trajectory(sampler_or_process, model, noise,
                                        fine_steps=fine_steps, teacher=teacher,
                                        prediction=prediction, sigma_max=sigma_max,
                                        sigma_min=sigma_min, to_zero=to_zero,
                                        extra_args=extra_args, backend=backend)
    L = trajectory.sigmas.size
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or not 1 <= nfe < L:
        raise ValueError(f"nfe must be an integer in [1, {L - 1}] (the fine grid's steps), "
                         f"got {nfe!r}")
    path, _ = dp_path(step_costs(trajectory, weight=weight), int(nfe))
    return np.asarray(trajectory.sigmas, dtype=np.float64)[path].copy()
