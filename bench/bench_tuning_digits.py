"""Issue 15's digits table: Frechet distance of fixed, GITS-grid and fully tuned plans by NFE.

    .venv/bin/python bench/bench_tuning_digits.py --json d.json --markdown d.md   # ~15 min
    .venv/bin/python bench/bench_tuning_digits.py --quick                         # < 20 s

The digits model (``pyengine.models.digits``, EDM, x0 prediction); a sample set's score is
``quality(x)["fd"]``: the Frechet distance between the bundled classifier's features of the
samples and of the 1797 training digits. Held-out noise: ``torch.randn(n, 1, 8, 8)`` of a
``torch.Generator`` seeded ``--eval-seed`` (default 0, the demo's: its 128-sample set is the
demo's digits noise), for each size of ``--eval`` (default 512 and 128). Fitting noise:
``initial_noise(--fit-seed, range(--num))`` (Philox, default seed 1 and 256 noises: the noise
of ``pyengine tune digits``), never the held-out noise. Per NFE:

* fixed: dpmpp_2m, unipc, ipndm, dpm_multistep (order 3) on the karras, time_uniform and
  logsnr schedules; the best (lowest FD at the first ``--eval`` size) is reported;
* GITS: each of those solvers on the grid of :func:`pyengine.tuning.gits.gits_schedule`
  (one teacher trajectory of ``--gits-fine`` steps on the fitting noise serves every NFE);
  the best solver is reported;
* tuned: ``pe.tune`` of ``--base`` (default ipndm, Karras start) with the classifier-feature
  loss, the same settings as ``pyengine tune digits --nfe N --solver ipndm --loss features``
  (256 noises of seed 1, a quarter for validation, 300 Adam iterations at most, batch 128,
  float64 state). Each fit runs in its own process (``--jobs`` at a time, 1 torch thread
  each) that reports its fit seconds and its peak resident memory.

Also: the fits' teacher and unipc / dpmpp_2m at ``--ref-nfe`` (the exact ODE's FD), the
bundled plan ``pyengine/models/digits_nfe5.json`` (L2 loss) at its NFE, and for every row
the feature distance to the teacher on the first held-out set (the fits' loss on held-out
noise: paired, far less noisy than the FD). ``--plans-dir`` keeps the fitted plans and fit
records; ``--reuse`` takes them instead of refitting (e.g. with another ``--eval-seed``).
``--quick``: one NFE, tiny fits and sample sets, in process (a smoke test, < 20 s).

``--seeds 0,1,2,3 --eval 4096,512,128``: the large-sample table. Every row (the teacher,
fixed solvers on ``--schedules``, GITS, tuned, ``--ref-nfe``) on each held-out seed's
``torch.randn(4096, 1, 8, 8)``, the FD of each prefix size (the prefixes of one draw equal the
smaller draws, so the 512 / 128 cells of seed 0 are those of the single-seed table), then the
mean and spread over the seeds and the targets on the mean, per seed and as the paired
difference tuned - fixed. One worker process per seed (``--jobs`` at a time); each seed's
measurement is kept in ``--plans-dir`` and ``--reuse`` takes it when its configuration (sizes,
candidates, GITS grids, plan files) is the same, so seeds can be added in later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOLVERS = [("dpmpp_2m", {}), ("unipc", {}), ("ipndm", {}), ("dpm_multistep", {"order": 3})]
SCHEDULES = ["karras", "time_uniform", "logsnr"]
HERE = Path(__file__).resolve()


def machine() -> str:
    try:
        sys.path.insert(0, str(HERE.parent))
        from bench_tuning import machine as m
        return m()
    except Exception:                                   # noqa: BLE001 - a label only
        import platform
        return platform.processor() or platform.machine()


def _label(solver, opts):
    return solver + (f"(order {opts['order']})" if "order" in opts else "")


def fit_one(nfe: int, args, plan_out: Path) -> dict:
    """One fit (the worker): ``pe.tune`` as ``pyengine tune digits --loss features`` does it;
    the plan is written to ``plan_out``; returns seconds, memory and losses."""
    import pyengine as pe
    from pyengine.cli import _digits_features
    from pyengine.distributed import initial_noise
    from pyengine.models.digits import load_digits_model

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    process, model, pred = load_digits_model()
    s = pe.Sampler(process, solver=args.base, steps=nfe, schedule="karras", prediction=pred)
    if s.nfe != nfe:
        raise SystemExit(f"--base {args.base}: {nfe} steps make {s.nfe} model calls")
    noise = initial_noise(args.fit_seed, range(args.num), model.sample_shape,
                          dtype=torch.float64)
    t0 = time.perf_counter()
    tuned = pe.tune(s, model, noise, feature=_digits_features(), iters=args.iters,
                    batch_size=args.batch, seed=args.fit_seed, progress=False)
    wall = time.perf_counter() - t0
    tuned.save(plan_out)
    pv = tuned.provenance
    return {"nfe": nfe, "fit_seconds": wall, "maxrss_mib": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024, "maxrss_before_mib": rss0 / 1024,
        "losses": pv["losses"], "iters": pv["fitted"]["iters"],
        "gradient_grid": pv["fitted"].get("gradient_grid"),
        "schedule_evals": pv["fitted"].get("schedule_evals"), "plan": str(plan_out)}


def run_fits(nfes, args, plans_dir: Path) -> dict:
    """Fit every NFE: in process (``--jobs 0``) or in ``--jobs`` worker processes at a time,
    the most expensive (highest NFE) first."""
    out = {}
    todo = sorted(nfes, reverse=True)
    if args.reuse:                       # the plans and fit records of an earlier run
        for n in list(todo):
            info = plans_dir / f"fit_nfe{n}.json"
            if info.exists() and (plans_dir / f"digits_nfe{n}.json").exists():
                out[n] = dict(json.loads(info.read_text()), reused=True)
                todo.remove(n)
    if args.jobs == 0:
        for n in todo:
            out[n] = fit_one(n, args, plans_dir / f"digits_nfe{n}.json")
            (plans_dir / f"fit_nfe{n}.json").write_text(json.dumps(out[n], indent=1))
        return out
    common = ["--iters", str(args.iters), "--num", str(args.num), "--batch", str(args.batch),
              "--fit-seed", str(args.fit_seed), "--base", args.base]
    running = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            n = todo.pop(0)
            info = plans_dir / f"fit_nfe{n}.json"
            cmd = [sys.executable, str(HERE), "--fit-worker", str(n), "--plan-out",
                   str(plans_dir / f"digits_nfe{n}.json"), "--info-out", str(info)] + common
            env = dict(os.environ, OMP_NUM_THREADS="1")
            running[n] = (subprocess.Popen(cmd, env=env), info, time.perf_counter())
            print(f"fit NFE {n}: started", flush=True)
        time.sleep(1.0)
        for n, (p, info, t0) in list(running.items()):
            if p.poll() is None:
                continue
            del running[n]
            if p.returncode != 0:
                raise SystemExit(f"the fit of NFE {n} failed (exit {p.returncode})")
            out[n] = json.loads(info.read_text())
            print(f"fit NFE {n}: {out[n]['fit_seconds']:.0f} s, peak "
                  f"{out[n]['maxrss_mib']:.0f} MiB, val loss "
                  f"{out[n]['losses']['base']['val']:.3f} -> "
                  f"{out[n]['losses']['tuned']['val']:.3f}", flush=True)
    return out


#: the teacher's classifier features on the first held-out set (set by measure)
_REF: dict = {}


def _features(x):
    from pyengine.models.digits import _classifier, to_pixels
    return _classifier()[0].features(to_pixels(x).reshape(-1, 64)).to(torch.float64)


def scores(sample, noises: dict) -> dict:
    """{n: fd} of one sampler over each held-out set, the first set's confidence and, once
    the teacher's endpoints are known, ``tdist``: the mean over the first set's samples of
    the RMS distance of a sample's classifier features to the teacher's (the fits' loss, on
    held-out noise; paired, so far less noisy than the FD)."""
    from pyengine.models.digits import quality

    res = {}
    with torch.no_grad():
        for n, z in noises.items():
            x = sample(z)
            q = quality(x)
            res[str(n)] = q["fd"]
            if "confidence" not in res:
                res["confidence"] = q["confidence"]
                if "feat" in _REF:
                    d = _features(x) - _REF["feat"]
                    res["tdist"] = float(d.pow(2).mean(1).sqrt().mean())
    return res


def gits_grids(args, process, model, pred) -> dict:
    """{nfe: the GITS grid}: dynamic programming over one teacher trajectory of
    ``--gits-fine`` steps on the fitting noise (every NFE shares it)."""
    import pyengine as pe
    from pyengine.distributed import initial_noise
    from pyengine.tuning.gits import dp_path, step_costs, teacher_trajectory

    fit_noise = initial_noise(args.fit_seed, range(args.num), model.sample_shape,
                              dtype=torch.float64)
    ref = pe.Sampler(process, solver="ipndm", steps=args.nfe[0], prediction=pred)
    traj = teacher_trajectory(ref, model, fit_noise, fine_steps=args.gits_fine)
    costs = step_costs(traj)
    return {n: traj.sigmas[dp_path(costs, n)[0]] for n in args.nfe}


def measure(args) -> dict:
    import pyengine as pe
    from pyengine.models.digits import load_digits_model

    _REF.clear()
    process, model, pred = load_digits_model()
    sizes = args.eval_sizes
    noises = {n: torch.randn(n, *model.sample_shape,
                             generator=torch.Generator().manual_seed(args.eval_seed))
              for n in sizes}
    key = str(sizes[0])
    res = {"machine": machine(), "torch": torch.__version__, "threads": args.threads,
           "command": args.command, "eval_sizes": sizes, "eval_seed": args.eval_seed,
           "fit_seed": args.fit_seed, "num": args.num, "iters": args.iters,
           "batch": args.batch, "base": args.base, "gits_fine": args.gits_fine,
           "fixed": {}, "gits": {}, "tuned": {}}

    # -- the teacher of the fits (their floor: a fit matches its endpoints) -------------------
    from pyengine.tuning import DEFAULT_TEACHER
    from pyengine.tuning.fit import teacher_sigmas
    t_name, t_steps, t_opts = DEFAULT_TEACHER
    base = pe.Sampler(process, solver=args.base, steps=args.nfe[0], prediction=pred)
    ts = pe.Sampler(process, solver=t_name, prediction=pred, init_noise_scale=1.0,
                    sigmas=teacher_sigmas(base.sigmas, process, t_steps), **t_opts)
    res["teacher"] = {"solver": t_name, "steps": t_steps, **scores(
        lambda z: ts.sample(model, z * base.init_noise_scale), noises)}
    with torch.no_grad():
        _REF["feat"] = _features(ts.sample(model, noises[sizes[0]] * base.init_noise_scale))
    print(f"teacher: fd {res['teacher'][key]:.2f}", flush=True)
    # -- fixed solvers ------------------------------------------------------------------
    t0 = time.perf_counter()
    for nfe in args.fixed_nfe:
        rows = {}
        for solver, opts in SOLVERS:
            for sch in SCHEDULES:
                s = pe.Sampler(process, solver=solver, steps=nfe, schedule=sch,
                               prediction=pred, **opts)
                if s.nfe != nfe:
                    continue
                rows[f"{_label(solver, opts)}/{sch}"] = scores(
                    lambda z, s=s: s.sample(model, z), noises)
        best = min(rows, key=lambda k: rows[k][key])
        res["fixed"][str(nfe)] = {"best": best, **rows[best], "all": rows}
        print(f"fixed NFE {nfe}: {best} fd {rows[best][key]:.2f}", flush=True)
    res["fixed_seconds"] = time.perf_counter() - t0

    # -- GITS grids (one teacher trajectory on the fitting noise) ------------------------
    t0 = time.perf_counter()
    gits = gits_grids(args, process, model, pred)
    for nfe in args.nfe:
        grid = gits[nfe]
        rows = {}
        for solver, opts in SOLVERS:
            s = pe.Sampler(process, solver=solver, sigmas=grid, prediction=pred, **opts)
            if s.nfe != nfe:
                continue
            rows[_label(solver, opts)] = scores(lambda z, s=s: s.sample(model, z), noises)
        best = min(rows, key=lambda k: rows[k][key])
        res["gits"][str(nfe)] = {"best": best, **rows[best], "all": rows,
                                 "sigmas": [float(v) for v in grid]}
        print(f"GITS NFE {nfe}: {best} fd {rows[best][key]:.2f}", flush=True)
    res["gits_seconds"] = time.perf_counter() - t0

    # -- the bundled plan (for reference) ------------------------------------------------
    from pyengine.demo import TUNED_DIGITS
    if TUNED_DIGITS.exists():
        f = pe.load_plan(TUNED_DIGITS)
        s = pe.Sampler.from_tuned(f, process, prediction=pred, model=model)
        res["bundled"] = {"nfe": s.nfe, "loss": f.provenance.get("loss"),
                          "seed": f.provenance.get("seed"),
                          "n": f.provenance.get("n_train", 0) + f.provenance.get("n_val", 0),
                          **scores(lambda z: s.sample(model, z), noises)}

    res["converged"] = {}                 # the fixed solvers toward the exact ODE
    for nfe in args.ref_nfe:
        for solver in ("unipc", "dpmpp_2m"):
            s = pe.Sampler(process, solver=solver, steps=nfe, schedule="karras",
                           prediction=pred)
            res["converged"][f"{solver}/karras@{nfe}"] = scores(
                lambda z, s=s: s.sample(model, z), noises)

    # -- fully tuned plans ---------------------------------------------------------------
    plans_dir = Path(args.plans_dir) if args.plans_dir else Path(tempfile.mkdtemp())
    plans_dir.mkdir(parents=True, exist_ok=True)
    fits = run_fits(args.nfe, args, plans_dir)
    for nfe in args.nfe:
        fi = fits[nfe]
        s = pe.Sampler.from_tuned(fi["plan"], process, prediction=pred, model=model)
        res["tuned"][str(nfe)] = {**fi, **scores(lambda z, s=s: s.sample(model, z), noises)}
        print(f"tuned NFE {nfe}: fd {res['tuned'][str(nfe)][key]:.2f}", flush=True)
    res["maxrss_main_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def verdicts(r: dict, size: str) -> list:
    """The issue's targets at one sample size: (text, met)."""
    out = []
    for t_nfe, f_nfe in ((5, 10), (4, 8)):
        t, f = r["tuned"].get(str(t_nfe)), r["fixed"].get(str(f_nfe))
        if t and f:
            ok = t[size] <= f[size]
            out.append((f"tuned {t_nfe} NFE {t[size]:.2f} <= best fixed at {f_nfe} NFE "
                        f"({f['best']}) {f[size]:.2f}: {'met' if ok else 'MISSED'}", ok))
    return out


def markdown(r: dict) -> str:
    sizes = [str(n) for n in r["eval_sizes"]]
    nfes = sorted({int(k) for k in r["fixed"]} | {int(k) for k in r["tuned"]})
    cell = " / ".join(sizes)
    lines = [f"# The digits model: fixed, GITS and tuned plans by NFE ({r['machine']})", "",
             f"`{r['command']}` (torch {r['torch']}, {r['threads']} thread per process). "
             f"Frechet distance on the bundled classifier's features (`quality(x)['fd']`) of "
             f"{' and '.join(sizes)} samples (each cell: FD at {cell} samples) from "
             f"`torch.randn` noise of seed {r['eval_seed']}"
             f"{' (the demo digits noise at 128)' if r['eval_seed'] == 0 else ''}, "
             f"none of it used in any fit. Fits: `pe.tune` of {r['base']} (Karras start), "
             f"classifier-feature loss, {r['num']} noises `initial_noise({r['fit_seed']}, "
             f"range({r['num']}))` (a quarter for validation), at most {r['iters']} Adam "
             f"iterations, batch {r['batch']}, float64 state, teacher dpmpp_3m_corrected "
             f"256 steps: the settings of `pyengine tune digits --nfe N --solver "
             f"{r['base']} --loss features`. GITS: the DP grid over a {r['gits_fine']}-step "
             f"teacher trajectory of the same fitting noise. 'Best' = lowest FD at "
             f"{sizes[0]} samples among the candidates (chosen on the held-out set itself). "
             f"Feature distance to the teacher: the mean over the {sizes[0]} held-out samples "
             f"of the RMS distance between the classifier features of a sample and of the "
             f"fits' teacher endpoint from the same noise (the fits' loss on held-out noise; "
             f"paired, so much less noisy than the FD).", "",
             "| NFE | best fixed (solver/schedule) | fixed FD | GITS (best solver) | GITS FD | "
             "tuned FD | feature dist. to teacher: fixed / GITS / tuned | fit s | "
             "peak RSS MiB | val loss base -> tuned |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fd(d):
        return " / ".join(f"{d[s]:.2f}" for s in sizes) if d else "-"
    def td(d):
        return f"{d['tdist']:.3f}" if d and "tdist" in d else "-"
    for n in nfes:
        f, g, t = (r[k].get(str(n)) for k in ("fixed", "gits", "tuned"))
        head = (f"| {n} | {f['best'] if f else '-'} | {fd(f)} | {g['best'] if g else '-'} | "
                f"{fd(g)} | {fd(t)} | {td(f)} / {td(g)} / {td(t)} |")
        if t:
            lo = t["losses"]
            lines.append(f"{head} {t['fit_seconds']:.0f} | {t['maxrss_mib']:.0f} | "
                         f"{lo['base']['val']:.3f} -> {lo['tuned']['val']:.3f} |")
        else:
            lines.append(f"{head} - | - | - |")
    lines.append("")
    for s in sizes:
        v = verdicts(r, s)
        if v:
            lines.append(f"Targets at {s} samples: " + "; ".join(t for t, _ in v) + ".")
    te = r.get("teacher")
    if te:
        lines += ["", f"The fits' teacher ({te['solver']}, {te['steps']} steps, log-uniform "
                  f"grid; a fit matches its endpoints, so its FD is the floor a fit aims at): "
                  f"FD {fd(te)}."]
    if r.get("converged"):
        lines += ["", "Fixed solvers at more NFE (toward the exact ODE): " + "; ".join(
            f"{k} {fd(v)}" for k, v in r["converged"].items()) + "."]
    grids = {n: v.get("gradient_grid") for n, v in sorted(r["tuned"].items(), key=lambda kv:
                                                          int(kv[0]))}
    if grids:
        lines += ["", "Grid the gradient stage of each fit started from (tuned: the "
                  "Nelder-Mead schedule; base: the Karras grid): " + ", ".join(
                      f"NFE {n} {g}" for n, g in grids.items()) + "."]
    if any(v.get("reused") for v in r["tuned"].values()):
        lines += ["", "The fits were taken from an earlier run of the same command "
                  "(`--reuse`): their seconds and memory are that run's."]
    b = r.get("bundled")
    if b:
        lines += ["", f"The bundled plan `pyengine/models/digits_nfe5.json` ({b['loss']} loss, "
                  f"{b['n']} noises of seed {b['seed']}; not the feature-loss settings, so not "
                  f"reused): NFE {b['nfe']}, FD {fd(b)}."]
    lines += ["", "All candidates (FD at " + cell + " samples):", ""]
    for kind in ("fixed", "gits"):
        for n in sorted(r[kind], key=int):
            lines.append(f"* {kind} NFE {n}: " + "; ".join(
                f"{k} {fd(v)}" for k, v in sorted(r[kind][n]["all"].items(),
                                                  key=lambda kv: kv[1][sizes[0]])))
    lines += ["", f"Seconds: fixed solvers {r['fixed_seconds']:.0f}, GITS (teacher "
              f"trajectory, DP, samples) {r['gits_seconds']:.0f}; peak resident memory of "
              f"the measuring process {r['maxrss_main_mib']:.0f} MiB.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# several held-out seeds at large sample sizes (``--seeds``)
# ---------------------------------------------------------------------------------------


def sample_chunked(s, model, z, chunk: int, scale: float = 1.0):
    """``s.sample`` over ``z`` in chunks of ``chunk`` samples (the digits U-Net runs at
    0.26 ms per sample and evaluation in batches of 512-1024 on one thread, 0.41 at 4096)."""
    with torch.no_grad():
        return torch.cat([s.sample(model, c * scale) for c in z.split(chunk)])


def seed_candidates(args, grids: dict, plans: dict) -> list:
    """(kind, nfe, label, sampler factory) of every row measured per held-out seed: the fits'
    teacher first (its endpoints are the reference of the feature distance), then the fixed
    solvers on ``--schedules``, the GITS grids, the tuned plans and ``--ref-nfe``."""
    import pyengine as pe
    from pyengine.models.digits import load_digits_model
    from pyengine.tuning import DEFAULT_TEACHER
    from pyengine.tuning.fit import teacher_sigmas

    process, model, pred = load_digits_model()
    t_name, t_steps, t_opts = DEFAULT_TEACHER
    base = pe.Sampler(process, solver=args.base, steps=args.nfe[0], prediction=pred)
    out = [("teacher", t_steps, f"{t_name}@{t_steps}", lambda: (pe.Sampler(
        process, solver=t_name, prediction=pred, init_noise_scale=1.0,
        sigmas=teacher_sigmas(base.sigmas, process, t_steps), **t_opts),
        base.init_noise_scale))]
    for nfe in args.fixed_nfe:
        for solver, opts in SOLVERS:
            for sch in args.schedules:
                out.append(("fixed", nfe, f"{_label(solver, opts)}/{sch}", lambda nfe=nfe,
                            solver=solver, opts=opts, sch=sch: (pe.Sampler(
                                process, solver=solver, steps=nfe, schedule=sch,
                                prediction=pred, **opts), 1.0)))
    for nfe, grid in grids.items():
        for solver, opts in SOLVERS:
            out.append(("gits", int(nfe), _label(solver, opts), lambda grid=grid,
                        solver=solver, opts=opts: (pe.Sampler(
                            process, solver=solver, sigmas=grid, prediction=pred, **opts),
                            1.0)))
    for nfe, path in plans.items():
        out.append(("tuned", int(nfe), "tuned", lambda path=path: (pe.Sampler.from_tuned(
            path, process, prediction=pred, model=model), 1.0)))
    for nfe in args.ref_nfe:
        for solver in ("unipc", "dpmpp_2m"):
            out.append(("converged", nfe, f"{solver}/karras", lambda nfe=nfe, solver=solver: (
                pe.Sampler(process, solver=solver, steps=nfe, schedule="karras",
                           prediction=pred), 1.0)))
    return out


def eval_seed(seed: int, args, grids: dict, plans: dict) -> dict:
    """Every candidate on the held-out noise ``torch.randn`` of ``seed``: the FD of each
    prefix of ``--eval`` sizes (the prefixes of one draw are the draws of those sizes, so
    the 512 and 128 cells are those of the single-seed table), the feature distance to the
    teacher over the largest set, and the sampling seconds."""
    from pyengine.models.digits import load_digits_model, quality

    _, model, _ = load_digits_model()
    sizes = sorted(args.eval_sizes, reverse=True)
    z = torch.randn(sizes[0], *model.sample_shape,
                    generator=torch.Generator().manual_seed(seed))
    rows, ref = {}, None
    t_all = time.perf_counter()
    for kind, nfe, label, make in seed_candidates(args, grids, plans):
        s, scale = make()
        t0 = time.perf_counter()
        x = sample_chunked(s, model, z, args.chunk, scale)
        sec = time.perf_counter() - t0
        with torch.no_grad():
            f = _features(x)
        if ref is None:
            ref = f
        row = {str(n): quality(x[:n])["fd"] for n in sizes}
        row["tdist"] = float((f - ref).pow(2).mean(1).sqrt().mean())
        row["seconds"] = sec
        rows.setdefault(kind, {}).setdefault(str(nfe), {})[label] = row
        print(f"seed {seed}: {kind} NFE {nfe} {label}: fd {row[str(sizes[0])]:.3f} "
              f"({sec:.0f} s)", flush=True)
    return {"seed": seed, "sizes": sizes, "rows": rows, "chunk": args.chunk,
            "seconds": time.perf_counter() - t_all, "schedules": args.schedules,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _seed_config(args, grids, plans) -> dict:
    """What a seed's measurement depends on (a cached one is reused only when it matches)."""
    return {"sizes": sorted(args.eval_sizes, reverse=True), "schedules": args.schedules,
            "fixed_nfe": args.fixed_nfe, "ref_nfe": args.ref_nfe,
            "grids": {str(k): v for k, v in grids.items()},
            "plans": {str(k): Path(v).read_text() for k, v in plans.items()}}


def _stats(vals: list) -> dict:
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "sd": float(t.std()) if len(vals) > 1 else 0.0,
            "min": float(t.min()), "max": float(t.max()), "values": list(vals)}


def measure_seeds(args) -> dict:
    """The fits (or ``--reuse``), the GITS grids, then :func:`eval_seed` per held-out seed
    (``--jobs`` worker processes at a time; kept in ``--plans-dir`` and, with ``--reuse``,
    taken from there when their configuration matches), aggregated over the seeds."""
    from pyengine.models.digits import load_digits_model

    plans_dir = Path(args.plans_dir) if args.plans_dir else Path(tempfile.mkdtemp())
    plans_dir.mkdir(parents=True, exist_ok=True)
    fits = run_fits(args.nfe, args, plans_dir)
    plans = {n: fits[n]["plan"] for n in args.nfe}
    process, model, pred = load_digits_model()
    t0 = time.perf_counter()
    grids = {n: [float(v) for v in g] for n, g in gits_grids(args, process, model,
                                                              pred).items()}
    gits_seconds = time.perf_counter() - t0
    config = _seed_config(args, grids, plans)
    per_seed, todo, running = {}, [], {}
    grids_file = plans_dir / "gits_grids.json"
    grids_file.write_text(json.dumps({str(k): v for k, v in grids.items()}))
    for seed in args.seeds:
        out = plans_dir / f"eval_seed{seed}_n{config['sizes'][0]}.json"
        if args.reuse and out.exists():
            old = json.loads(out.read_text())
            if old.get("config") == config:
                per_seed[seed] = dict(old, reused=True)
                continue
        if args.jobs == 0:                  # in process (--quick)
            per_seed[seed] = eval_seed(seed, args, grids, plans)
            out.write_text(json.dumps(dict(per_seed[seed], config=config), indent=1))
            continue
        todo.append((seed, out))
    common = ["--nfe", ",".join(map(str, args.nfe)), "--fixed-nfe",
              ",".join(map(str, args.fixed_nfe)), "--eval", ",".join(map(str, args.eval_sizes)),
              "--ref-nfe", ",".join(map(str, args.ref_nfe)), "--schedules",
              ",".join(args.schedules), "--chunk", str(args.chunk), "--base", args.base,
              "--grids-file", str(grids_file), "--plans-dir", str(plans_dir)]
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            seed, out = todo.pop(0)
            cmd = [sys.executable, str(HERE), "--seed-worker", str(seed), "--info-out",
                   str(out)] + common
            env = dict(os.environ, OMP_NUM_THREADS="1")
            running[seed] = (subprocess.Popen(cmd, env=env), out)
            print(f"held-out seed {seed}: started", flush=True)
        time.sleep(1.0)
        for seed, (p, out) in list(running.items()):
            if p.poll() is None:
                continue
            del running[seed]
            if p.returncode != 0:
                raise SystemExit(f"the measurement of seed {seed} failed (exit {p.returncode})")
            per_seed[seed] = json.loads(out.read_text())
    # -- aggregate: every row over the seeds --------------------------------------------
    seeds = sorted(per_seed)
    sizes = [str(n) for n in config["sizes"]]
    agg: dict = {}
    first = per_seed[seeds[0]]["rows"]
    for kind, by_nfe in first.items():
        for nfe, by_label in by_nfe.items():
            for label in by_label:
                cells = [per_seed[s]["rows"][kind][nfe][label] for s in seeds]
                agg.setdefault(kind, {}).setdefault(nfe, {})[label] = {
                    k: _stats([c[k] for c in cells]) for k in sizes + ["tdist", "seconds"]}
    best = {kind: {nfe: min(rows, key=lambda k: rows[k][sizes[0]]["mean"])
                   for nfe, rows in agg.get(kind, {}).items()} for kind in ("fixed", "gits")}
    return {"machine": machine(), "torch": torch.__version__, "threads": args.threads,
            "command": args.command, "seeds": seeds, "sizes": sizes, "fit_seed": args.fit_seed,
            "num": args.num, "iters": args.iters, "batch": args.batch, "base": args.base,
            "gits_fine": args.gits_fine, "chunk": args.chunk, "schedules": args.schedules,
            "fits": {str(k): v for k, v in fits.items()}, "gits_grids": config["grids"],
            "gits_seconds": gits_seconds, "rows": agg, "best": best,
            "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k != "config"}
                         for s in seeds}}


def seed_targets(r: dict, size: str) -> list:
    """The issue's targets at one size over the seeds: (text, met on the mean, seeds met)."""
    out = []
    rows, best = r["rows"], r["best"]
    for t_nfe, f_nfe in ((5, 10), (4, 8)):
        t = rows.get("tuned", {}).get(str(t_nfe), {}).get("tuned")
        fb = best["fixed"].get(str(f_nfe))
        if not (t and fb):
            continue
        f = rows["fixed"][str(f_nfe)][fb]
        tv, fv = t[size]["values"], f[size]["values"]
        diff = _stats([a - b for a, b in zip(tv, fv)])
        won = sum(a <= b for a, b in zip(tv, fv))
        ok = t[size]["mean"] <= f[size]["mean"]
        out.append((f"tuned {t_nfe} NFE {t[size]['mean']:.3f} <= best fixed at {f_nfe} NFE "
                    f"({fb}) {f[size]['mean']:.3f}: {'met' if ok else 'MISSED'} on the mean; "
                    f"on {won} of {len(tv)} seeds; paired difference tuned - fixed "
                    f"{diff['mean']:+.3f} +- {diff['sd']:.3f}", ok, won))
    return out


def markdown_seeds(r: dict) -> str:
    sizes, seeds, rows, best = r["sizes"], r["seeds"], r["rows"], r["best"]
    big = sizes[0]
    nfes = sorted({int(n) for k in ("fixed", "gits", "tuned") for n in rows.get(k, {})})

    def ms(cell, key, fmt=".2f"):
        return f"{cell[key]['mean']:{fmt}} +- {cell[key]['sd']:{fmt}}" if cell else "-"

    def row_of(kind, n):
        by = rows.get(kind, {}).get(str(n))
        if not by:
            return None, None
        label = best[kind][str(n)] if kind in best else "tuned"
        return label, by[label]
    (te_nfe, te_by), = rows["teacher"].items()
    te_label, te = next(iter(te_by.items()))
    lines = [f"# The digits model at large sample sizes: fixed, GITS and tuned plans over "
             f"{len(seeds)} held-out seeds ({r['machine']})", "",
             f"`{r['command']}` (torch {r['torch']}, {r['threads']} thread per process). "
             f"Frechet distance on the bundled classifier's features (`quality(x)['fd']`, "
             f"against the 1797 training digits) of the first {' / '.join(sizes)} samples of "
             f"`torch.randn({big}, 1, 8, 8)` from a generator seeded {', '.join(map(str, seeds))}"
             f" (seed 0's first 512 and 128 samples are the single-seed table's sets); none of "
             f"it used in any fit. Each cell: mean +- standard deviation over the "
             f"{len(seeds)} seeds. 'Best' = lowest mean FD at {big} samples among the "
             f"candidates (dpmpp_2m, unipc, ipndm, dpm_multistep order 3 on the "
             f"{', '.join(r['schedules'])} schedules; GITS: the same solvers on the DP grid of a "
             f"{r['gits_fine']}-step teacher trajectory of the fitting noise), chosen on the "
             f"held-out sets themselves. Tuned: `pe.tune` of {r['base']}, classifier-feature "
             f"loss, {r['num']} noises `initial_noise({r['fit_seed']}, range({r['num']}))`, at "
             f"most {r['iters']} Adam iterations, batch {r['batch']}. Feature distance to the "
             f"teacher: the mean over the {big} samples of the RMS distance of a sample's "
             f"classifier features to those of the teacher's endpoint from the same noise.", "",
             f"The fits' teacher ({te_label}, log-uniform grid; the exact ODE's endpoints, "
             f"which a fit matches): FD " + " / ".join(ms(te, s) for s in sizes) +
             f" at {' / '.join(sizes)} samples.", "",
             f"| NFE | best fixed | fixed FD @{big} | GITS (best) | GITS FD @{big} | "
             f"tuned FD @{big} | teacher FD @{big} | feature dist. to teacher: fixed / GITS "
             f"/ tuned | fit s |", "|---|---|---|---|---|---|---|---|---|"]
    for n in nfes:
        (fl, f), (gl, g), (_, t) = row_of("fixed", n), row_of("gits", n), row_of("tuned", n)
        fit = r["fits"].get(str(n))
        lines.append(f"| {n} | {fl or '-'} | {ms(f, big)} | {gl or '-'} | {ms(g, big)} | "
                     f"{ms(t, big)} | {ms(te, big)} | {ms(f, 'tdist', '.3f')} / "
                     f"{ms(g, 'tdist', '.3f')} / {ms(t, 'tdist', '.3f')} | "
                     f"{fit['fit_seconds']:.0f} |" if fit else
                     f"| {n} | {fl or '-'} | {ms(f, big)} | {gl or '-'} | {ms(g, big)} | "
                     f"{ms(t, big)} | {ms(te, big)} | {ms(f, 'tdist', '.3f')} / "
                     f"{ms(g, 'tdist', '.3f')} / {ms(t, 'tdist', '.3f')} | - |")
    lines.append("")
    for s in sizes:
        v = seed_targets(r, s)
        if v:
            lines.append(f"Targets at {s} samples: " + "; ".join(t for t, _, _ in v) + ".")
            lines.append("")
    for size in sizes:
        lines += [f"Per seed, FD at {size} samples (the rows best at {big}):", "",
                  "| seed | teacher | best fixed 10 | tuned 5 | best fixed 8 | tuned 4 | "
                  "GITS 5 | GITS 4 |", "|---|---|---|---|---|---|---|---|"]
        for i, s in enumerate(seeds):
            def v(kind, n):
                _, c = row_of(kind, n)
                return f"{c[size]['values'][i]:.3f}" if c else "-"
            lines.append(f"| {s} | {te[size]['values'][i]:.3f} | {v('fixed', 10)} | "
                         f"{v('tuned', 5)} | {v('fixed', 8)} | {v('tuned', 4)} | "
                         f"{v('gits', 5)} | {v('gits', 4)} |")
        lines.append("")
    for s in sizes[1:]:
        lines += [f"The same rows (best at {big}) at {s} samples, the prefixes, mean +- "
                  f"sd over the seeds:", "", "| NFE | fixed | GITS | tuned | teacher |",
                  "|---|---|---|---|---|"]
        for n in nfes:
            lines.append(f"| {n} | {ms(row_of('fixed', n)[1], s)} | "
                         f"{ms(row_of('gits', n)[1], s)} | {ms(row_of('tuned', n)[1], s)} | "
                         f"{ms(te, s)} |")
        lines.append("")
    if rows.get("converged"):
        lines += [f"Fixed solvers at more NFE (toward the exact ODE), FD @{big}: " +
                  "; ".join(f"{lab}@{n} {ms(c, big)}" for n, by in rows["converged"].items()
                            for lab, c in by.items()) + ".", ""]
    lines += [f"All candidates (mean FD at {big} samples over the seeds):", ""]
    for kind in ("fixed", "gits"):
        for n in sorted(rows.get(kind, {}), key=int):
            lines.append(f"* {kind} NFE {n}: " + "; ".join(
                f"{k} {c[big]['mean']:.2f}" for k, c in sorted(
                    rows[kind][n].items(), key=lambda kv: kv[1][big]["mean"])))
    secs = [p["seconds"] for p in r["per_seed"].values()]
    tsec = te["seconds"]["mean"]
    lines += ["", f"Seconds per seed (every candidate, {big} samples, chunks of {r['chunk']}, "
              f"one thread): {min(secs):.0f}-{max(secs):.0f}; the teacher alone "
              f"{tsec:.0f} s ({tsec / int(big) / int(te_nfe) * 1e3:.3f} ms per sample and "
              f"teacher step); GITS grids {r['gits_seconds']:.0f} s. Fits: " + ", ".join(
                  f"NFE {n} {v['fit_seconds']:.0f} s" + (" (reused)" if v.get("reused")
                                                         else "")
                  for n, v in sorted(r["fits"].items(), key=lambda kv: int(kv[0]))) + ".", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nfe", default="3,4,5,6,8", help="NFE of the GITS and tuned plans")
    ap.add_argument("--fixed-nfe", default="3,4,5,6,8,10", help="NFE of the fixed solvers")
    ap.add_argument("--eval", default="512,128", help="held-out sample-set sizes")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--ref-nfe", default="20,50",
                    help="NFE of unipc and dpmpp_2m (karras) toward the exact ODE")
    ap.add_argument("--fit-seed", type=int, default=1)
    ap.add_argument("--num", type=int, default=256, help="fitting noises")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--base", default="ipndm")
    ap.add_argument("--gits-fine", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2, help="fits at a time (0: in process)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plans-dir", default=None, help="keep the fitted plans here")
    ap.add_argument("--reuse", action="store_true",
                    help="take the fits found in --plans-dir (plan and fit record of an "
                         "earlier run, its seconds and memory) instead of refitting")
    ap.add_argument("--quick", action="store_true", help="a smoke run (< 20 s)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--from-json", default=None, help="render --markdown from this file")
    ap.add_argument("--seeds", default=None,
                    help="held-out seeds (e.g. 0,1,2,3): every row over each seed, mean and "
                         "spread (with --eval 4096,512,128; --jobs seeds at a time)")
    ap.add_argument("--schedules", default="karras,logsnr",
                    help="schedules of the fixed solvers under --seeds")
    ap.add_argument("--chunk", type=int, default=1024, help="samples per sampling call")
    ap.add_argument("--fit-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grids-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--info-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        r = json.loads(Path(args.from_json).read_text())
        Path(args.markdown).write_text(markdown_seeds(r) if "seeds" in r else markdown(r))
        return None
    if args.fit_worker is not None:
        info = fit_one(args.fit_worker, args, Path(args.plan_out))
        Path(args.info_out).write_text(json.dumps(info, indent=1))
        return info
    args.command = "bench/bench_tuning_digits.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.nfe, args.fixed_nfe, args.eval = "3", "3", "32"
        args.num, args.iters, args.batch, args.jobs, args.gits_fine = 8, 2, 8, 0, 20
        args.ref_nfe = "12"
        if args.seeds is not None:
            args.eval = "32,16"
    args.nfe = [int(v) for v in args.nfe.split(",")]
    args.fixed_nfe = [int(v) for v in args.fixed_nfe.split(",")]
    args.eval_sizes = [int(v) for v in args.eval.split(",")]
    args.ref_nfe = [int(v) for v in args.ref_nfe.split(",") if v]
    args.schedules = [v for v in args.schedules.split(",") if v]
    if args.seed_worker is not None:
        grids = {int(k): v for k, v in json.loads(Path(args.grids_file).read_text()).items()}
        plans = {n: str(Path(args.plans_dir) / f"digits_nfe{n}.json") for n in args.nfe}
        info = eval_seed(args.seed_worker, args, grids, plans)
        info["config"] = _seed_config(args, grids, plans)
        Path(args.info_out).write_text(json.dumps(info, indent=1))
        return info
    if args.seeds is not None:
        args.seeds = [int(v) for v in args.seeds.split(",")]
        res, render = measure_seeds(args), markdown_seeds
    else:
        res, render = measure(args), markdown
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    page = render(res)
    if args.markdown:
        Path(args.markdown).write_text(page)
    else:
        print(page)
    return res


if __name__ == "__main__":
    main()
