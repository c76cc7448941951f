"""``pyengine demo``: every solver on the exact Gaussian mixture (error against the exact
PF-ODE endpoint, time per step), the trained digits model per solver and NFE with a
schedule-tuned (GITS) and a fully tuned plan beside the fixed solvers, and the plots (error vs
NFE of fixed, schedule-tuned and tuned plans, a 2-D scatter, a per-step timing chart; PNG,
with matplotlib).

The digits model's tuned plan is the bundled file :data:`TUNED_DIGITS` (fitting it takes
minutes on a CPU, more than a demo should), made by::

    pyengine tune digits --nfe 5 --solver ipndm -o pyengine/models/digits_nfe5.json

(iPNDM from the Karras grid, the command's defaults: 256 noises of seed 1, which the demo's
seeds are not, the L2 loss; 236 s on the 2-vCPU Xeon). Retraining the weights makes it
stale: the demo then says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .render import counting, progress

__all__ = ["DemoConfig", "TUNED_DIGITS", "run", "gmm_table", "digits_section", "plots_section",
           "tuning_section"]

#: the bundled tuned plan of the digits model (see the module docstring)
TUNED_DIGITS = Path(__file__).with_name("models") / "digits_nfe5.json"
#: the command that makes it
TUNED_DIGITS_COMMAND = ("pyengine tune digits --nfe 5 --solver ipndm -o "
                        "pyengine/models/digits_nfe5.json")


@dataclass
class DemoConfig:
    """The demo's settings (the command line's options, with the same defaults)."""
    nfe: tuple = (10, 20, 40)             # model-evaluation budgets of the mixture tables
    solvers: tuple = ()                   # solver names; () = every registered solver
    process: str = "vp"                   # "vp" (epsilon model) or "edm" (denoiser)
    dim: int = 16
    batch: int = 8                        # samples measured against the exact endpoint
    samples: int = 512                    # samples per stochastic solver (moment error)
    seed: int = 0
    backend: str | None = None
    threads: int = 1
    out: str = "pyengine-demo"
    digits_nfe: tuple = (5, 10, 20)
    digits_samples: int = 128
    scatter_nfe: int = 10
    digits: bool = True
    plots: bool = True
    tuning: bool = True                   # GITS and tuned plans beside the fixed solvers
    tuning_nfe: tuple = (3, 4, 5, 6, 8)   # NFE budgets of the fixed vs tuned mixture table
    quiet: bool = False


def _info(name: str):
    from .solvers import get
    try:
        return get(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _backend(name):
    from . import backends
    try:
        return backends.get(name).name
    except ValueError as e:
        raise UsageError(str(e)) from None


def _infos(cfg: DemoConfig):
    from .solvers import list_solvers
    return [_info(n) for n in cfg.solvers] if cfg.solvers else list_solvers()


def _steps_for_nfe(process, name, nfe, schedule):
    """The step count whose plan makes the number of model calls closest to ``nfe``."""
    from .sampler import Sampler
    from .solvers import get

    per = get(name).nfe_per_step
    guess = max(1, round(nfe / per))
    best = None
    for steps in sorted({max(1, guess - 1), guess, guess + 1}):
        s = Sampler(process, solver=name, steps=steps, schedule=schedule)
        key = (abs(s.nfe - nfe), s.nfe > nfe)
        if best is None or key < best[0]:
            best = (key, steps, s.nfe)
    return best[1], best[2]


def _moment_error(x, mean, cov):
    import torch
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    m = x.mean(0)
    c = (x - m).T @ (x - m) / (x.shape[0] - 1)
    return max(float((m - mean).abs().max()), float((c - cov).abs().max()))


def _fmt_err(e):
    return f"{e:.1e}" if math.isfinite(e) else "diverged"


def gmm_table(cfg: DemoConfig, infos, backend: str) -> None:
    """The solver x NFE table on the exact Gaussian mixture (printed as it is measured)."""
    import torch

    from . import processes
    from .models import GaussianMixture
    from .sampler import Sampler

    skipped = [i.name for i in infos if i.family == "inversion"]
    det = [i for i in infos if not i.stochastic and i.family != "inversion"]
    sto = [i for i in infos if i.stochastic]

    gmm = GaussianMixture.random(d=cfg.dim, M=4, seed=cfg.seed)
    proc = processes.named(cfg.process)
    if cfg.process == "edm":
        prediction, proc_text = "sample", "EDM, x0 (denoiser) model"
    else:
        prediction = "epsilon"
        proc_text = f"{processes.describe(cfg.process)}, epsilon model"
    model = gmm.as_model(proc, prediction)
    schedule = "karras"
    nfes = cfg.nfe

    print(f"pyengine demo: Gaussian mixture, d={cfg.dim}, 4 components; {proc_text}; "
          f"{schedule} schedule from sigma {proc.sigma_max:.4g} to 0; float64; {backend} "
          f"backend, {cfg.threads} thread(s)")

    # Exact PF-ODE endpoint of the noise, from the first level of the grid to sigma 0.
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(cfg.batch, cfg.dim, generator=g, dtype=torch.float64)
    sigma0 = proc.sigma_max
    x_hat0 = noise * (float(proc.prior_std(sigma0)) / float(proc.s_of_sigma(sigma0)))
    t0 = time.perf_counter()
    exact = gmm.ode_endpoint(x_hat0, sigma0, 0.0)
    print(f"exact endpoint: scipy DOP853, rtol 1e-10, {time.perf_counter() - t0:.1f} s")

    def run_one(info, nfe, x, seed=0):
        steps, actual = _steps_for_nfe(proc, info.name, nfe, schedule)
        s = Sampler(proc, solver=info.name, steps=steps, schedule=schedule,
                    prediction=prediction, backend=backend)
        s.sample(model, x[:1], seed=seed)                       # warm-up
        t = time.perf_counter()
        out = s.sample(model, x, seed=seed)
        return out, actual, (time.perf_counter() - t) / steps

    header = ["solver", "order"] + [f"NFE {n}" for n in nfes] + ["ms/step"]
    sep = "|" + "---|" * len(header)
    note_nfe = False

    def table(rows, x, score, seed):
        nonlocal note_nfe
        print()
        print("| " + " | ".join(header) + " |")
        print(sep)
        for info in rows:
            cells, per_step = [], float("nan")
            for nfe in nfes:
                out, actual, per_step = run_one(info, nfe, x, seed)
                cell = _fmt_err(score(out))
                if actual != nfe:
                    cell += f" @{actual}"
                    note_nfe = True
                cells.append(cell)
            print(f"| {info.name} | {info.order} | " + " | ".join(cells)
                  + f" | {1e3 * per_step:.2f} |", flush=True)

    if det:
        print()
        print(f"Deterministic solvers: max |x - x_exact| over {cfg.batch} samples "
              f"(exact PF-ODE endpoint at sigma 0); ms/step at NFE {nfes[-1]}, batch "
              f"{cfg.batch}.")
        table(det, noise, lambda out: float((out - exact).abs().max()), 0)
    if sto:
        n = cfg.samples
        gd = torch.Generator().manual_seed(cfg.seed + 1)
        mean = (gmm.weights[:, None] * gmm.means).sum(0)
        second = (gmm.weights[:, None, None]
                  * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
        cov = second - mean[:, None] * mean[None, :]
        floor = _moment_error(gmm.sample(n, generator=gd), mean, cov)
        big = torch.randn(n, cfg.dim, generator=gd, dtype=torch.float64)
        print()
        print(f"Stochastic solvers: max error of the mean and covariance of {n} samples "
              f"against the data's exact moments; {n} exact data samples score {floor:.1e} "
              f"(the Monte-Carlo floor). ms/step at NFE {nfes[-1]}, batch {n}.")
        table(sto, big, lambda out: _moment_error(out, mean, cov), cfg.seed)
    print()
    if note_nfe:
        print("@n: the step count closest to the NFE budget makes n model calls (e.g. Heun's "
              "last step to sigma 0 is a single Euler call).")
    if skipped:
        print(f"Not shown: {', '.join(skipped)} (inversion: data to noise).")


def digits_section(cfg: DemoConfig, infos, out: Path) -> Path:
    """The digits model: a quality table per solver and NFE, and a PNG of the first 16 samples
    of each cell (with matplotlib a labelled figure, else a plain mosaic: a row per solver,
    the NFE budgets side by side). Without ``cfg.solvers``, the registry's featured solvers."""
    import torch

    from .models.digits import load_checkpoint, load_digits_model, quality, to_pixels
    from .plots import have_matplotlib, plot_digits_grid, save_image_grid
    from .sampler import Sampler
    from .solvers import registry

    if cfg.solvers:
        names = [i.name for i in infos if i.family != "inversion"]
    else:
        names = [i.name for i in registry.featured()]
    nfes = cfg.digits_nfe
    process, model, prediction = load_digits_model()
    ref = load_checkpoint()["reference"]
    n = cfg.digits_samples
    n_ref = min((64, 128, 256), key=lambda m: abs(m - n))     # the yardsticks' nearest size
    print()
    print(f"Digits model (8x8, EDM denoiser trained by pyengine/models/train_digits.py): "
          f"{n} samples per cell scored by the bundled digit classifier: the Frechet distance "
          f"of its features to the training digits' (fd) and its mean confidence (conf). "
          f"Yardsticks at {n_ref} samples: held-out real digits fd "
          f"{ref[f'fd_real_{n_ref}']:.1f}, a Gaussian with the digits' pixel mean and "
          f"covariance fd {ref[f'fd_gauss_{n_ref}']:.1f}; real digits conf "
          f"{ref['confidence_real']:.2f}. Karras schedule, seeds 0..{n - 1}.")
    print()
    head = ["solver"] + [f"NFE {nfe}" for nfe in nfes]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    noise = torch.randn(n, *model.sample_shape, generator=torch.Generator().manual_seed(cfg.seed))
    grid = {}
    with progress(len(names) * sum(nfes), "digits", cfg.quiet, unit="eval") as bar:
        counted = counting(model, bar)
        for name in names:
            per = _info(name).nfe_per_step
            cells = []
            for nfe in nfes:
                s = Sampler(process, solver=name, steps=max(1, round(nfe / per)),
                            prediction=prediction)
                x = s.sample(counted, noise, seed=cfg.seed)
                q = quality(x)
                grid[(name, s.nfe)] = to_pixels(x[:16])
                at = f" @{s.nfe}" if s.nfe != nfe else ""
                cells.append(f"fd {q['fd']:.1f}, conf {q['confidence']:.2f}{at}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if cfg.tuning:
        _digits_tuned_rows(cfg, process, model, prediction, noise, grid)
    path = out / "digits_grid.png"
    if have_matplotlib():
        plot_digits_grid(grid, path)
    else:
        per_row = max(len([k for k in grid if k[0] == name]) for name in names)
        save_image_grid(torch.cat(list(grid.values())), path, nrow=min(n, 16) * per_row,
                        scale=4)
    rows = list(dict.fromkeys(k[0] for k in grid))
    print(f"wrote {path} (the first {min(n, 16)} samples of each cell, the same seeds "
          f"everywhere; rows: {', '.join(rows)}; columns: NFE {', '.join(map(str, nfes))})")
    return path


#: the solvers the digits table shows on GITS grids (one teacher run serves all)
GITS_SOLVERS = ("dpmpp_2m", "ipndm")


def _digits_tuned_rows(cfg: DemoConfig, process, model, prediction, noise, grid) -> None:
    """More rows of the digits table: :data:`GITS_SOLVERS` on GITS grids (one teacher run on
    64 noises of seed cfg.seed + 1000), and the bundled tuned plan at its NFE."""
    import warnings

    import torch

    from .models.digits import quality, to_pixels
    from .sampler import Sampler
    from .tuning.artifact import load_plan
    from .tuning.gits import dp_path, step_costs, teacher_trajectory

    nfes = cfg.digits_nfe
    train = torch.randn(64, *model.sample_shape,
                        generator=torch.Generator().manual_seed(cfg.seed + 1000))
    ref = Sampler(process, "dpmpp_2m", steps=nfes[0], prediction=prediction)
    traj = teacher_trajectory(ref, model, train.to(torch.float64), fine_steps=100)
    costs = step_costs(traj)
    for base in GITS_SOLVERS:
        cells = []
        for nfe in nfes:
            if nfe >= traj.sigmas.size:
                cells.append("-")
                continue
            s = Sampler(process, base, sigmas=traj.sigmas[dp_path(costs, nfe)[0]],
                        prediction=prediction)
            x = s.sample(model, noise, seed=cfg.seed)
            q = quality(x)
            grid[(f"{base} + GITS", s.nfe)] = to_pixels(x[:16])
            cells.append(f"fd {q['fd']:.1f}, conf {q['confidence']:.2f}")
        print(f"| {base} + GITS | " + " | ".join(cells) + " |", flush=True)
    note = ""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = load_plan(TUNED_DIGITS)
            s = Sampler.from_tuned(f, process, prediction=prediction, model=model)
        if caught:
            note = (" The bundled plan was fitted to other weights than these: regenerate it "
                    f"with `{TUNED_DIGITS_COMMAND}`.")
    except (OSError, ValueError) as e:
        print(f"(no tuned row: {e}; make the file with `{TUNED_DIGITS_COMMAND}`)")
        return
    x = s.sample(model, noise, seed=cfg.seed)
    q = quality(x)
    label = f"tuned {f.provenance.get('base_solver', '')}".strip()
    grid[(label, s.nfe)] = to_pixels(x[:16])
    cell = f"fd {q['fd']:.1f}, conf {q['confidence']:.2f}"
    cells = [cell if nfe == s.nfe else "-" for nfe in nfes]
    if s.nfe not in nfes:
        cells[0] = f"{cell} @{s.nfe}"
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"+ GITS: the solver on the grid chosen by dynamic programming over a 100-level "
          f"teacher run on 64 other noises (pyengine.tuning.gits). tuned: the bundled plan "
          f"{TUNED_DIGITS.name} (schedule, evaluation times and coefficients fitted to this "
          f"model by `{TUNED_DIGITS_COMMAND}`).{note}")


def plots_section(cfg: DemoConfig, infos, out: Path, backend: str) -> list:
    """error_vs_nfe.png and scatter_2d.png on the exact Gaussian mixtures; bench.md and
    bench.png, a quick per-step solver timing (fused backend vs the torch reference) on
    4x4x64x64 float32 states."""
    import torch

    from .benchmark import solver_bench, solver_bench_table
    from .plots import (gmm_error_vs_nfe, gmm_scatter, plot_bench, plot_error_vs_nfe,
                        plot_scatter)

    det = [i.name for i in infos if not i.stochastic and i.family != "inversion"]
    names = [i.name for i in infos if i.family != "inversion"]
    paths = []
    nfes = (8, 16, 32, 64, 128)
    with progress(len(det) * len(nfes), "error vs NFE", cfg.quiet) as bar:
        results = gmm_error_vs_nfe(det, nfes, progress=bar.update)
    paths.append(plot_error_vs_nfe(results, out / "error_vs_nfe.png"))
    with progress(len(names), "2-D scatter", cfg.quiet) as bar:
        data, samples = gmm_scatter(names, nfe=cfg.scatter_nfe, n=1000, seed=cfg.seed,
                                    progress=bar.update)
    paths.append(plot_scatter(data, samples, out / "scatter_2d.png"))
    shape, steps = (4, 4, 64, 64), 10
    with progress(len(names), "timing solvers", cfg.quiet, unit="solver") as bar:
        copy_bw, rows = solver_bench(names, shape, steps, torch.float32, backend, 0.03,
                                     progress=bar.update)
    text = solver_bench_table(rows, shape, torch.float32, steps, backend, copy_bw)
    (out / "bench.md").write_text(text + "\n")
    paths.append(out / "bench.md")
    paths.append(plot_bench(text, out / "bench.png",
                            title=f"per-step solver time: {backend} backend vs torch reference "
                                  f"({'x'.join(map(str, shape))} float32, `pyengine bench` "
                                  f"for more)"))
    return paths


def tuning_section(cfg: DemoConfig, out: Path, plot: bool) -> Path | None:
    """Fixed, GITS-grid and fully tuned plans on an exact mixture by NFE: the medians as a
    table and, with ``plot``, tuning_error_vs_nfe.png (its path is returned)."""
    from .plots import plot_tuning_error_vs_nfe, tuning_error_vs_nfe

    nfes = tuple(cfg.tuning_nfe)
    solvers = ("dpmpp_2m", "unipc", "ipndm")
    with progress(len(nfes) * (len(solvers) + 1), "fixed, GITS and tuned plans",
                  cfg.quiet) as bar:
        results = tuning_error_vs_nfe(nfes, solvers, seed=cfg.seed, progress=bar.update)
    print()
    print("Tuned plans on an exact Gaussian mixture (d=16, EDM, Karras 80 -> 0.002 without the "
          "final step to 0): median RMS error against the exact PF-ODE endpoint of 64 held-out "
          "noises; GITS grids and tuned plans fitted on 48 other noises.")
    print()
    print("| plan | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|" + "---|" * (len(nfes) + 1))
    for label, pts in results.items():
        print(f"| {label} | " + " | ".join(_fmt_err(p[1]) for p in pts) + " |")
    if not plot:
        return None
    path = plot_tuning_error_vs_nfe(results, out / "tuning_error_vs_nfe.png")
    print(f"wrote {path}")
    return path


def run(cfg: DemoConfig) -> int:
    """The whole demo, printed as it runs; PNGs and bench.md go to ``cfg.out``."""
    import torch

    from .plots import MATPLOTLIB_HINT, have_matplotlib

    torch.set_num_threads(cfg.threads)
    infos = _infos(cfg)
    backend = _backend(cfg.backend)
    out = Path(cfg.out)
    if cfg.digits or cfg.plots:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {str(out)!r}: {e}") from None
    gmm_table(cfg, infos, backend)
    if cfg.digits:
        digits_section(cfg, infos, out)
    if cfg.tuning:
        tuning_section(cfg, out, cfg.plots and have_matplotlib())
    if cfg.plots:
        if have_matplotlib():
            for path in plots_section(cfg, infos, out, backend):
                print(f"wrote {path}")
        else:
            print(f"plots skipped: matplotlib is not installed; {MATPLOTLIB_HINT}")
    return 0
