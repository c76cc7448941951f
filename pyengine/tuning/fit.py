"""Fitting a plan to a model: ``pe.tune(sampler, model, noise)``.

1. **Teacher.** The endpoints of the noise under a high-accuracy run of the registry (default
   :data:`DEFAULT_TEACHER`: ``dpmpp_3m_corrected`` over 256 steps of a log-uniform grid
   between the plan's first and last levels, :func:`teacher_sigmas`), on the same process
   and prediction, with the caller's ``extra_args`` and
   the sampler's guidance; or the caller's endpoints (``teacher=`` a tensor).
2. **Split.** A train / validation split of the noise, deterministic given ``seed``.
3. **Schedule** (``schedule=True`` or ``"nelder-mead"``). Nelder-Mead (scipy) on the
   training loss over the schedule parameters of
   :class:`~pyengine.tuning.tunable.TunablePlan` with the base solver's coefficients, from
   the base grid and (``schedule_starts`` > 1) from random grids drawn from ``seed``; the
   result of the lowest validation loss is kept only when it lowers the validation loss
   of the base grid. This is the schedule-only baseline, and the grid the next stage
   starts from. ``"gits"``: the dynamic-programming grid of
   :func:`pyengine.tuning.gits.gits_schedule` on the training noise instead;
   ``"gits+nelder-mead"``: Nelder-Mead started there.
4. **Times and coefficients** (``times=``, ``coefficients=``). Adam (minibatches) or L-BFGS
   (full training set, gradients accumulated over minibatches) through the differentiable
   walk (:mod:`pyengine.tuning.difwalk`); the validation loss is measured every
   ``eval_every`` iterations and the best parameters kept; ``patience`` measurements without
   improvement stop the fit. When the schedule stage moved the grid, this stage runs on
   every distinct grid it found and on the base grid, and the lowest validation loss wins
   (a schedule fitted with the base coefficients is often not the best grid to fit
   coefficients on: measured on the exact mixture, bench/results/tuning_mixture_*).
5. **Alternation** (``alternate`` rounds): Nelder-Mead on the schedule with the fitted
   times and coefficients held (their coordinates keep their meaning on a moved grid:
   :class:`~pyengine.tuning.tunable.TunablePlan`), then the gradient stage again from
   them; a round is kept when it lowers the validation loss, and the first that does not
   ends the alternation.

The loss is the mean over samples of the RMS distance (per element) of a sample's endpoint
to the teacher's (``feature=f``: of f(x) to f(teacher), e.g. the digits classifier's
features): an L2 distance per sample, not squared, so that the few samples a coarse plan
sends to another mode of the data do not dominate the fit. ``trim`` > 0 leaves the
fraction ``trim`` of the largest distances out of every loss (the training objective per
minibatch, Nelder-Mead's, the validation loss): such a sample's distance jumps by the gap
between modes when the plan moves a little, which makes the loss a poor guide to the
other samples (on the exact VP mixture at 5 NFE, one validation sample in 128 at distance
1.3 decided the choice between two fits whose 90th percentiles differ 4x). Memory is bounded by
``batch_size`` samples in flight (one walk with its autograd graph); the teacher and the
validation passes run without gradients, in the same minibatches. Measured on the digits
model (ipndm, NFE 5, 256 noises, batch 128, feature loss, float32; 2-vCPU Xeon): peak
resident memory of the whole process 733 MiB (231 MiB before the fit), 245 s with the
teacher; the autograd graph grows linearly with ``batch_size`` and the NFE
(``bench/results/tuning_mixture_Xeon-2vCPU_2026-12-07.md``).
"""

from __future__ import annotations

import copy
import datetime
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from ..parameterization import Denoiser
from ..plan import Plan
from .difwalk import walk
from .tunable import TunablePlan

__all__ = ["DEFAULT_TEACHER", "TunedPlan", "teacher_sigmas", "tune"]

#: (solver, steps, options) of the default teacher run
DEFAULT_TEACHER = ("dpmpp_3m_corrected", 256, {})


@dataclass
class TunedPlan:
    """The result of :func:`tune`: ``plan`` (an ordinary :class:`pyengine.plan.Plan`),
    ``provenance`` (process description, prediction, nfe, base solver, model fingerprint,
    teacher, losses, seed, parameters, fitting seconds, date) and the ``process``."""

    plan: Plan
    provenance: dict
    process: object = None
    params: dict = field(default_factory=dict)

    def sampler(self, backend: str | None = None):
        """A :class:`pyengine.Sampler` that samples with the tuned plan (every mode)."""
        from ..sampler import Sampler
        return Sampler.from_tuned(self, self.process, backend=backend)

    def save(self, path):
        """Write the plan and its provenance to a JSON file (``pe.load_plan`` reads it)."""
        from .artifact import save_plan
        return save_plan(self.plan, path, provenance=self.provenance)

    def __repr__(self) -> str:
        lo = self.provenance.get("losses", {})
        return (f"TunedPlan({self.provenance.get('base_solver')}, nfe={self.plan.nfe}, "
                f"val loss {lo.get('base', {}).get('val', math.nan):.3g} -> "
                f"{lo.get('tuned', {}).get('val', math.nan):.3g})")


def teacher_sigmas(sigmas, process, steps: int) -> np.ndarray:
    """The teacher's grid: ``steps`` log-uniform steps from the first level of ``sigmas`` to
    its last level; when ``sigmas`` ends at 0, down to the lower of its last positive level
    and the process's sigma_min, then 0 (the endpoint at 0 does not depend on where a plan
    takes its last step, and a tuned plan may move it)."""
    sig = np.asarray(sigmas, dtype=np.float64)
    zero = sig[-1] == 0.0
    hi = float(sig[0])
    if zero:
        lo = min(float(sig[-2]), float(process.sigma_min))
        if not lo < hi:
            lo = hi * 1e-3 if len(sig) == 2 else float(sig[-2])
    else:
        lo = float(sig[-1])
    n = int(steps) - (1 if zero else 0)
    grid = np.exp(np.linspace(math.log(hi), math.log(lo), max(n, 1) + 1))
    grid[0], grid[-1] = hi, lo
    return np.append(grid, 0.0) if zero else grid


def _teacher_spec(teacher):
    if teacher is None:
        return DEFAULT_TEACHER
    if isinstance(teacher, str):
        return (teacher, DEFAULT_TEACHER[1], {})
    if isinstance(teacher, (tuple, list)) and 2 <= len(teacher) <= 3:
        name, steps = teacher[0], teacher[1]
        opts = dict(teacher[2]) if len(teacher) == 3 else {}
        if not isinstance(name, str) or isinstance(steps, bool) or \
                not isinstance(steps, (int, np.integer)) or steps < 2:
            raise ValueError(f"teacher must be (solver name, steps >= 2[, options]), got "
                             f"{teacher!r}")
        return (name, int(steps), opts)
    raise TypeError(f"teacher must be None, a solver name, (solver, steps[, options]) or a "
                    f"tensor of endpoints, got {type(teacher).__name__}")


def _slice_args(extra_args, idx, n, guided):
    """``extra_args`` for the samples ``idx`` of ``n``: tensors with n rows (2n under
    guidance, unconditional rows first) are sliced; everything else passes unchanged."""
    if not extra_args:
        return extra_args
    out = {}
    for k, v in extra_args.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            if guided and v.shape[0] == 2 * n:
                v = torch.cat([v[idx.to(v.device)], v[n + idx.to(v.device)]])
            elif v.shape[0] == n:
                v = v[idx.to(v.device)]
        out[k] = v
    return out


def tune(sampler, model, noise: torch.Tensor, *, extra_args: dict | None = None,
         teacher=None, val_fraction: float = 0.25, schedule: bool = True,
         times: bool = True, coefficients: bool = True, feature=None, iters: int = 300,
         lr: float = 0.02, optimizer: str = "adam", batch_size: int = 128,
         schedule_evals: int | None = None, schedule_starts: int = 1, alternate: int = 0,
         trim: float = 0.0, eval_every: int = 10, patience: int = 8,
         time_fraction: float = 0.5, free_end: bool = True,
         dtype: torch.dtype = torch.float64, seed: int = 0, progress: bool = True) -> TunedPlan:
    """Fit the plan of ``sampler`` to ``model`` on the standard-normal ``noise`` [N, ...].

    See the module docstring for the stages. ``sampler``: a :class:`pyengine.Sampler` with a
    deterministic solver and no custom ops (its guidance scale is tuned with; its
    ``extra_args`` go to every model call: per-sample tensors with N rows, or 2N under
    guidance, are sliced per minibatch). ``teacher``: None (:data:`DEFAULT_TEACHER`), a
    solver name, ``(solver, steps[, options])``, or a tensor of endpoints of ``noise``.
    ``feature``: a differentiable map of endpoints whose distance is the loss (default: the
    endpoints themselves). ``schedule`` (True / "nelder-mead", "gits", "gits+nelder-mead"
    or False), ``times``, ``coefficients``: which parameters to fit and how (module
    docstring). ``iters``, ``lr``, ``optimizer`` ("adam" or "lbfgs"), ``batch_size``,
    ``eval_every``, ``patience``: the gradient stage; ``schedule_evals``: Nelder-Mead's budget
    of loss evaluations (default 60 per schedule parameter, at least 100) per start;
    ``schedule_starts``: Nelder-Mead runs (from the base grid, then from random grids of the
    seed), ``alternate``: rounds of schedule and gradient fits with each other's result held
    (module docstring). ``trim``: the fraction of the samples with the largest distances
    left out of every loss (training, Nelder-Mead, validation). ``time_fraction``
    and ``free_end``: see :class:`~pyengine.tuning.tunable.TunablePlan`. ``dtype``: the
    walk's state dtype (float64 for small models). Deterministic given ``seed``.
    Returns a :class:`TunedPlan`.
    """
    from .artifact import describe_process, model_fingerprint

    t_start = time.perf_counter()
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or \
            noise.dim() < 2 or noise.shape[0] < 2:
        raise ValueError(f"noise must be a floating tensor [N, ...] with N >= 2 (a training "
                         f"and a validation part), got "
                         f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else noise!r}")
    val_fraction = float(val_fraction)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    optimizer = str(optimizer).lower()
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    for name, v, lo in (("iters", iters, 0), ("batch_size", batch_size, 1),
                        ("eval_every", eval_every, 1), ("patience", patience, 1),
                        ("schedule_starts", schedule_starts, 1), ("alternate", alternate, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if schedule_evals is not None and (isinstance(schedule_evals, bool) or not isinstance(
            schedule_evals, (int, np.integer)) or schedule_evals < 1):
        raise ValueError(f"schedule_evals must be a positive integer, got {schedule_evals!r}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be a fraction in [0, 0.5), got {trim!r}")
    trim = float(trim)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if feature is not None and not callable(feature):
        raise TypeError(f"feature must be callable (endpoints -> features), got "
                        f"{type(feature).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")

    modes = {True: "nelder-mead", False: None, None: None, "nelder-mead": "nelder-mead",
             "gits": "gits", "gits+nelder-mead": "gits+nelder-mead"}
    if not isinstance(schedule, (bool, str, type(None))) or schedule not in modes:
        raise ValueError(f"schedule must be True / 'nelder-mead', 'gits', 'gits+nelder-mead' "
                         f"or False, got {schedule!r}")
    schedule_mode = modes[schedule]
    tp = TunablePlan(sampler, time_fraction=time_fraction, free_end=free_end)
    if times and isinstance(model, Denoiser):
        warnings.warn("tune: a pe.Denoiser is called with the state's sigma, not the plan's "
                      "model time, so evaluation times are not tuned (times=False)",
                      stacklevel=2)
        times = False
    guided = sampler.guidance_scale is not None
    N = noise.shape[0]
    device = noise.device
    x_all = noise.to(dtype) * sampler.init_noise_scale \
        if sampler.init_noise_scale != 1.0 else noise.to(dtype)

    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(N, generator=gen)
    n_val = min(N - 1, max(1, int(round(N * val_fraction))))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values

    def batches(idx):
        for a in range(0, idx.numel(), batch_size):
            yield idx[a:a + batch_size]

    # -- teacher ----------------------------------------------------------------------------
    if isinstance(teacher, torch.Tensor):
        if teacher.shape != noise.shape:
            raise ValueError(f"teacher endpoints must have the noise's shape "
                             f"{tuple(noise.shape)}, got {tuple(teacher.shape)}")
        target = teacher.detach().to(device=device, dtype=dtype)
        teacher_info = {"solver": "given", "steps": None}
    else:
        from ..sampler import Sampler
        t_name, t_steps, t_opts = _teacher_spec(teacher)
        ts = Sampler(sampler.process, solver=t_name,
                     sigmas=teacher_sigmas(sampler.sigmas, sampler.process, t_steps),
                     prediction=sampler.prediction, init_noise_scale=1.0,
                     guidance_scale=sampler.guidance_scale, backend=sampler.backend, **t_opts)
        if ts.info.stochastic and ts.plan.n_noise:
            raise ValueError(f"teacher: {t_name!r} draws noise; the teacher must solve the "
                             f"probability-flow ODE (a deterministic solver)")
        target = torch.empty_like(x_all)
        with torch.no_grad():
            for b in batches(torch.arange(N)):
                target[b] = ts.sample(model, x_all[b], extra_args=_slice_args(
                    extra_args, b, N, guided)).to(dtype)
        teacher_info = {"solver": t_name, "steps": t_steps, "options": t_opts,
                        "grid": "log-uniform"}
    target_f = None

    def feat(x):
        return x if feature is None else feature(x)

    with torch.no_grad():
        if feature is not None:
            target_f = torch.cat([feat(target[b]) for b in batches(torch.arange(N))])
        else:
            target_f = target

    def sample_dists(x, idx):
        """Per-sample RMS distance (per element) of the endpoints x of samples idx."""
        d = (feat(x) - target_f[idx]).reshape(idx.numel(), -1)
        return ((d * d).mean(1) + 1e-30).sqrt()

    def kept(d):
        """The distances without the ``trim`` fraction of the largest."""
        if trim > 0.0:
            d = d.sort().values[:max(1, math.ceil(d.numel() * (1.0 - trim)))]
        return d

    def dist(x, idx):
        return kept(sample_dists(x, idx)).mean()

    def run(idx, coefs=None, t=None):
        return walk(tp.plan, model, x_all[idx], coefs=coefs, times=t,
                    extra_args=_slice_args(extra_args, idx, N, guided))

    def loss_of(idx, coefs=None, t=None) -> float:
        """The loss over ``idx`` (no gradients)."""
        with torch.no_grad():
            d = torch.cat([sample_dists(run(b, coefs, t), b) for b in batches(idx)])
        return float(kept(d).mean())

    def current():
        return (tp.coefficients() if coefficients and tp.n_coef else None,
                tp.times() if times and tp.n_times else None)

    losses = {"base": {"train": loss_of(train_idx), "val": loss_of(val_idx)}}

    def nelder_mead(start, step, budget, label, fixed=False):
        """Nelder-Mead on the training loss over theta from ``start`` (simplex edge
        ``step``), with the base coefficients or (``fixed``) the current phi and z; returns
        (theta, evaluations, training loss at theta)."""
        from scipy.optimize import minimize
        dim = start.size
        bar = _bar(progress, budget, f"{label} ({dim} params, Nelder-Mead)")
        cache: dict = {}

        def f(theta):
            key = tuple(np.round(theta, 15))
            if key not in cache:
                try:
                    tp.set_schedule(theta)
                    v = loss_of(train_idx, *current()) if fixed else loss_of(train_idx)
                except (ValueError, FloatingPointError, RuntimeError):
                    v = math.inf                # not a grid of this plan's structure
                cache[key] = v if math.isfinite(v) else 1e300
                bar.update(1)
                bar.set_postfix(train=f"{min(cache.values()):.3g}")
            return cache[key]

        simplex = np.vstack([start, start + step * np.eye(dim)])
        res = minimize(f, start, method="Nelder-Mead",
                       options={"maxfev": budget, "initial_simplex": simplex,
                                "xatol": 1e-3, "fatol": 0.0})
        bar.close()
        return np.asarray(res.x, dtype=np.float64), int(res.nfev), float(res.fun)

    fit_log = {}

    # -- schedule: GITS and / or Nelder-Mead ----------------------------------------------------
    grids: list = []                                   # (theta, losses) of each schedule fit
    if schedule_mode and tp.theta.size:
        dim = tp.theta.size
        start = np.zeros(dim)
        budget_nm = schedule_evals if schedule_evals is not None else max(100, 60 * dim)
        if "gits" in schedule_mode:
            from .gits import gits_schedule
            grid = gits_schedule(sampler, model, noise[train_idx].to(dtype), sampler.steps,
                                 extra_args=_slice_args(extra_args, train_idx, N, guided),
                                 backend=sampler.backend)
            try:
                start = tp.theta_for(grid)
                tp.set_schedule(start)
            except (ValueError, RuntimeError) as e:
                start = np.zeros(dim)
                warnings.warn(f"tune: the GITS grid cannot be a schedule of this plan ({e}); "
                              f"starting from the base grid", stacklevel=2)
            fit_log["gits_sigmas"] = [float(v) for v in grid]
        theta = start
        if "nelder-mead" in schedule_mode:
            rng = np.random.default_rng(int(seed))
            nm_starts = [start] + [start + rng.normal(0.0, 1.0, dim)
                                   for _ in range(schedule_starts - 1)]
            nfev = 0
            for k, st in enumerate(nm_starts):
                label = "schedule" if len(nm_starts) == 1 else \
                    f"schedule, start {k + 1} of {len(nm_starts)}"
                th, n_ev, train_loss = nelder_mead(st, 0.5, budget_nm, label)
                nfev += n_ev
                try:
                    tp.set_schedule(th)
                except (ValueError, FloatingPointError, RuntimeError):
                    continue                    # a random start with no valid grid near it
                grids.append((th, {"train": train_loss, "val": loss_of(val_idx)}))
            fit_log["schedule_evals"] = nfev
            theta, sched_loss = min(grids, key=lambda g: g[1]["val"])
        else:
            tp.set_schedule(theta)
            sched_loss = {"train": loss_of(train_idx), "val": loss_of(val_idx)}
            grids.append((theta, sched_loss))
        tp.set_schedule(theta)
        if not sched_loss["val"] < losses["base"]["val"]:
            tp.set_schedule(np.zeros(dim))                # no better on held-out noise
            sched_loss = dict(losses["base"], kept=False)
        losses["schedule"] = sched_loss
    else:
        losses["schedule"] = dict(losses["base"])

    # -- times and coefficients: gradient ----------------------------------------------------
    def gradient_stage(start_val: float, label: str, warm=None):
        """Fit phi and z from zero (or from ``warm`` = (phi, z)) on the current grid; returns
        (best val, phi, z, iters)."""
        phi0, z0 = (torch.zeros_like(tp.phi), torch.zeros_like(tp.z)) if warm is None \
            else (warm[0].detach().clone(), warm[1].detach().clone())
        tp.phi = phi0.requires_grad_(bool(times and tp.n_times))
        tp.z = z0.requires_grad_(bool(coefficients and tp.n_coef))
        params = [p for p in (tp.phi, tp.z) if p.requires_grad]
        best = (start_val, [p.detach().clone() for p in params])
        if not params or not iters:
            return best[0], tp.phi.detach(), tp.z.detach(), 0
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr)
        else:
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=10, history_size=20,
                                    line_search_fn="strong_wolfe")
        bar = _bar(progress, iters, f"times+coefficients on the {label} grid "
                                    f"({sum(p.numel() for p in params)} params, {optimizer})")
        n_train = train_idx.numel()

        def closure_full():
            opt.zero_grad()
            total = 0.0
            for b in batches(train_idx):
                c, t = current()
                loss = dist(run(b, c, t), b) * (b.numel() / n_train)
                loss.backward()
                total += loss.item()
            return torch.tensor(total, dtype=torch.float64)

        bad = done = 0
        for it in range(iters):
            if optimizer == "adam":
                b = train_idx if n_train <= batch_size else \
                    train_idx[torch.randperm(n_train, generator=gen)[:batch_size]]
                opt.zero_grad()
                c, t = current()
                loss = dist(run(b, c, t), b)
                if not loss.requires_grad:
                    raise ValueError("feature: the loss carries no gradient to the plan's "
                                     "parameters (a feature map that detaches its input, or "
                                     "a model without autograd)")
                loss.backward()
                opt.step()
                train_now = loss.item()
            else:
                train_now = float(opt.step(closure_full))
            done = it + 1
            bar.update(1)
            if done % eval_every == 0 or done == iters:
                v = loss_of(val_idx, *current())
                bar.set_postfix(train=f"{train_now:.3g}", val=f"{v:.3g}")
                if v < best[0]:
                    best, bad = (v, [p.detach().clone() for p in params]), 0
                else:
                    bad += 1
                    if bad >= patience:
                        break
        bar.close()
        with torch.no_grad():
            for p, v in zip(params, best[1]):
                p.copy_(v)
        return best[0], tp.phi.detach(), tp.z.detach(), done

    # From the schedule-tuned grid, every other distinct grid the schedule stage found, and
    # the base grid: a schedule fitted with the base coefficients is not always the best
    # grid to fit coefficients on (on the exact mixture it often is not); the lowest
    # validation loss wins.
    starts = [("tuned" if np.any(tp.theta != 0) else "base", tp.theta.copy(),
               losses["schedule"]["val"])]
    for th, lo in sorted(grids, key=lambda g: g[1]["val"]):
        if np.any(th != 0) and not any(np.allclose(th, st[1], atol=1e-2) for st in starts):
            starts.append((f"tuned-{len(starts) + 1}", th.copy(), lo["val"]))
    if np.any(tp.theta != 0):
        starts.append(("base", np.zeros_like(tp.theta), losses["base"]["val"]))
    results = []
    for label, theta, start_val in starts:
        tp.set_schedule(theta)
        results.append((label, theta) + gradient_stage(start_val, label))
    label, theta, best_val, phi, z, iters_run = min(results, key=lambda r: r[2])
    tp.set_schedule(theta)
    tp.phi, tp.z = phi.clone(), z.clone()
    # Alternation: Nelder-Mead on the schedule with the fitted times and coefficients held,
    # then the gradient stage again from them; kept while the validation loss improves.
    rounds = []
    for r in range(alternate if schedule_mode and tp.theta.size else 0):
        th_new, _, _ = nelder_mead(theta, 0.25, budget_nm, f"schedule with the fitted times "
                                f"and coefficients, round {r + 1}", fixed=True)
        tp.set_schedule(th_new)
        v0 = loss_of(val_idx, *current())
        v, phi2, z2, it2 = gradient_stage(v0, f"round {r + 1}", warm=(phi, z))
        rounds.append({"val_before_gradient": v0, "val": v})
        better = v < best_val
        if better:
            theta, best_val, phi, z = th_new, v, phi2.clone(), z2.clone()
            iters_run += it2
        tp.set_schedule(theta)
        tp.phi, tp.z = phi.clone(), z.clone()
        if not better:
            break
    if rounds:
        fit_log["alternation"] = rounds
    fit_log["gradient_grid"] = label
    fit_log["gradient_val"] = {r[0]: r[2] for r in results}
    losses["tuned"] = {"train": loss_of(train_idx, *current()),
                       "val": loss_of(val_idx, *current())}

    plan = tp.to_plan()
    seconds = time.perf_counter() - t_start
    provenance = {
        "process": describe_process(sampler.process),
        "prediction": sampler.prediction,
        "nfe": plan.nfe,
        "base_solver": sampler.solver,
        "base_options": copy.deepcopy(sampler.options),
        "base_schedule": sampler.schedule,
        "base_sigmas": [float(v) for v in tp.base_sigmas],
        "guidance_scale": sampler.guidance_scale,
        "init_noise_scale": sampler.init_noise_scale,
        "model_fingerprint": model_fingerprint(model),
        "teacher": teacher_info,
        "loss": "feature" if feature is not None else "l2",
        "losses": losses,
        "fitted": {"schedule": schedule_mode if tp.theta.size else None,
                   "times": bool(times and tp.n_times),
                   "coefficients": bool(coefficients and tp.n_coef),
                   "optimizer": optimizer, "iters": iters_run, "lr": lr, **fit_log},
        "n_train": int(train_idx.numel()), "n_val": int(val_idx.numel()),
        "seed": int(seed),
        "fit_seconds": seconds,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    params_out = {"theta": tp.theta.tolist(), "phi": tp.phi.tolist(), "z": tp.z.tolist()}
    return TunedPlan(plan=plan, provenance=provenance, process=sampler.process,
                     params=params_out)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:                      # tqdm is optional: fit silently without it
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False)
