"""The ``pyengine`` command line: ``sample``, ``demo``, ``bench``, ``info`` and ``solvers``.

``pyengine sample`` turns noise into samples with a built-in model (``digits``: the trained
8x8 digits denoiser; ``gmm``: the exact Gaussian mixture) or a user's model named by import
path (``module:attr``), any registered solver, schedule and step count, and writes them as
.pt, .npy or a .png grid; ``--distributed`` shards them over torchrun ranks. ``pyengine
demo`` is every solver on the exact Gaussian mixture (error against the exact PF-ODE
endpoint, time per step), the digits model's samples per solver and step count, and the
plots (PNG, when matplotlib is installed). ``pyengine bench`` times each solver's plan per
step on the fused backend against the torch reference (and runs the fused-update kernel
benchmark of a source checkout). ``pyengine info`` shows the install; ``pyengine solvers
--markdown`` prints the registry table the README carries.

Progress bars (tqdm, on stderr, shown after half a second) are silenced by ``--quiet``.
Exit codes: 0 success, 1 runtime error, 2 usage error (bad option, unknown solver or model).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main"]


class CLIError(Exception):
    """A user error found after parsing (unknown solver name, ...): exit code 2."""


# ---------------------------------------------------------------------------------------
# progress and shared checks
# ---------------------------------------------------------------------------------------


class _NoBar:
    """Stands in for a tqdm bar under --quiet or without tqdm."""

    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total: int, desc: str, quiet: bool = False, unit: str = "it"):
    """A tqdm bar on stderr (when it is a terminal) that appears only after half a second, so
    quick work stays silent, and clears when done; a no-op bar with ``quiet`` or without
    tqdm."""
    if quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # disable=None: no bar when stderr is not a terminal (logs and pipes stay clean)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, delay=0.5, leave=False,
                dynamic_ncols=True, disable=None)


def _say(args, *parts, **kw):
    """print unless --quiet."""
    if not getattr(args, "quiet", False):
        print(*parts, **kw)


def _solver_info(name: str):
    from .solvers import get
    try:
        return get(name)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _backend_name(name):
    from . import backends
    try:
        return backends.get(name).name
    except ValueError as e:
        raise CLIError(str(e)) from None


def _schedule_name(name: str) -> str:
    from .schedules import SCHEDULES
    if name not in SCHEDULES:
        raise CLIError(f"unknown schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}")
    return name


# ---------------------------------------------------------------------------------------
# solvers / info
# ---------------------------------------------------------------------------------------


def _short(summary: str) -> str:
    """The method and its source: a summary's text before the formula (first ': ')."""
    return summary.split(": ", 1)[0]


def _variants_text(info) -> str:
    """'label (order)' for each configuration with its own order, labels without the solver's
    name (``unipc_bh1_p2_c`` -> ``bh1_p2_c``); '' for a solver with a single configuration."""
    if not info.variants:
        return ""
    out = []
    for label, _, order, _ in info.configurations():
        short = label[len(info.name):] if label.startswith(info.name) else label
        short = short.strip("_[]") or "default"
        out.append(f"{short} ({order})")
    return ", ".join(out)


def solvers_table(markdown: bool = True, full: bool = False) -> str:
    """The registry as a table: name, order, NFE per step, stochastic, family, description
    (method and source, or the whole update formula with ``full``), configurations."""
    from .solvers import list_solvers

    head = ("solver", "order", "NFE/step", "stochastic", "family", "method",
            "configurations (order)")
    rows = []
    for info in list_solvers():
        text = info.summary if full else _short(info.summary)
        row = [info.name, str(info.order), str(info.nfe_per_step),
               "yes" if info.stochastic else "no", info.family, text, _variants_text(info)]
        if markdown:
            row = [c.replace("|", "\\|") for c in row]
            row[0] = f"`{row[0]}`"
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join([fmt.format(*head)] + [fmt.format(*r).rstrip() for r in rows])


def cmd_solvers(args) -> int:
    print(solvers_table(markdown=args.markdown, full=args.full))
    return 0


def cmd_info(args) -> int:
    import numpy
    import scipy
    import torch

    from . import __version__, backends
    from .backends import dispatch

    print(f"pyengine {__version__}")
    cuda = torch.version.cuda or "none (CPU build)"
    print(f"torch {torch.__version__} (CUDA {cuda}; device available: "
          f"{'cuda' if torch.cuda.is_available() else 'cpu only'}), numpy {numpy.__version__}, "
          f"scipy {scipy.__version__}")
    try:
        from . import _C  # noqa: F401
        native = "built"
    except ImportError as e:
        native = f"not built ({e})"
    print(f"native module pyengine._C: {native}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("devices: " + ", ".join(dispatch.device_name(d) for d in devices))
    print(f"backends available: {', '.join(backends.available())}")
    # per device: each backend's reasons for a typical float32 call, then the choice
    forced = os.environ.get("PYENGINE_BACKEND")
    status = 0
    for dev in devices:
        call = dispatch.Call.typical(dev)
        if os.environ.get("PYENGINE_RANK") == "1":       # measure once, cache per device name
            times = dispatch.rank(dev)
            print(f"measured on {dev}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in times)
                  + f" (saved to {dispatch.ranking_file()})")
        src = "measured ranking" if dispatch.ranking_for(dev) else "default priority"
        print(f"on {dev} (order: {', '.join(dispatch.order(dev))}; {src}):")
        for name in backends._REGISTRY:
            why = dispatch.reasons(name, call)
            print(f"  {name:7s} {'runs' if not why else 'no: ' + '; '.join(why)}")
        try:
            chosen = dispatch.select(call)
            typical = f"{dev}, float32, K={call.K}, [4, 4, 64, 64]"
            print(f"  chosen for a typical call ({typical}): {chosen.name}")
        except ValueError as e:
            print(f"  chosen for a typical call: error: {e}")
    try:
        chosen = backends.get()
        name = getattr(chosen, "name", str(chosen))
        why = f"forced by PYENGINE_BACKEND={forced}" if forced else "highest priority available"
        print(f"default backend: {name} ({why})")
    except ValueError as e:
        print(f"default backend: error: {e}")
        status = 1
    print()
    print(solvers_table(markdown=False))
    return status


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


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


def _moments(x):
    import torch
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    m = x.mean(0)
    c = (x - m).T @ (x - m) / (x.shape[0] - 1)
    return m, c


def _moment_error(x, mean, cov):
    m, c = _moments(x)
    return max(float((m - mean).abs().max()), float((c - cov).abs().max()))


def _fmt_err(e):
    return f"{e:.1e}" if math.isfinite(e) else "diverged"


def _demo_infos(args):
    from .solvers import list_solvers
    if args.solvers:
        return [_solver_info(n.strip()) for n in args.solvers.split(",") if n.strip()]
    return list_solvers()


def demo_gmm_table(args, infos, backend: str) -> None:
    """The solver x NFE table on the exact Gaussian mixture (printed as it is measured)."""
    import torch

    from . import processes
    from .models import GaussianMixture
    from .sampler import Sampler

    skipped = [i.name for i in infos if i.family == "inversion"]
    det = [i for i in infos if not i.stochastic and i.family != "inversion"]
    sto = [i for i in infos if i.stochastic]

    gmm = GaussianMixture.random(d=args.dim, M=4, seed=args.seed)
    if args.process == "vp":
        proc = processes.VP.discrete("linear")
        prediction, proc_text = "epsilon", "VP discrete (linear betas, 1000 steps), epsilon model"
    else:
        proc = processes.EDM()
        prediction, proc_text = "sample", "EDM, x0 (denoiser) model"
    model = gmm.as_model(proc, prediction)
    schedule = "karras"
    nfes = args.nfe

    print(f"pyengine demo: Gaussian mixture, d={args.dim}, 4 components; {proc_text}; "
          f"{schedule} schedule from sigma {proc.sigma_max:.4g} to 0; float64; {backend} "
          f"backend, {args.threads} thread(s)")

    # Exact PF-ODE endpoint of the noise, from the first level of the grid to sigma 0.
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, args.dim, generator=g, dtype=torch.float64)
    sigma0 = proc.sigma_max
    x_hat0 = noise * (float(proc.prior_std(sigma0)) / float(proc.s_of_sigma(sigma0)))
    t0 = time.perf_counter()
    exact = gmm.ode_endpoint(x_hat0, sigma0, 0.0)
    print(f"exact endpoint: scipy DOP853, rtol 1e-10, {time.perf_counter() - t0:.1f} s")

    def run(info, nfe, x, seed=0):
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
    if det:
        print()
        print(f"Deterministic solvers: max |x - x_exact| over {args.batch} samples "
              f"(exact PF-ODE endpoint at sigma 0); ms/step at NFE {nfes[-1]}, batch "
              f"{args.batch}.")
        print()
        print("| " + " | ".join(header) + " |")
        print(sep)
        for info in det:
            cells, per_step = [], float("nan")
            for nfe in nfes:
                out, actual, per_step = run(info, nfe, noise)
                err = float((out - exact).abs().max())
                cell = _fmt_err(err)
                if actual != nfe:
                    cell += f" @{actual}"
                    note_nfe = True
                cells.append(cell)
            print(f"| {info.name} | {info.order} | " + " | ".join(cells)
                  + f" | {1e3 * per_step:.2f} |", flush=True)
    if sto:
        n = args.samples
        gd = torch.Generator().manual_seed(args.seed + 1)
        mean = (gmm.weights[:, None] * gmm.means).sum(0)
        second = (gmm.weights[:, None, None]
                  * (gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])).sum(0)
        cov = second - mean[:, None] * mean[None, :]
        floor = _moment_error(gmm.sample(n, generator=gd), mean, cov)
        big = torch.randn(n, args.dim, generator=gd, dtype=torch.float64)
        print()
        print(f"Stochastic solvers: max error of the mean and covariance of {n} samples "
              f"against the data's exact moments; {n} exact data samples score {floor:.1e} "
              f"(the Monte-Carlo floor). ms/step at NFE {nfes[-1]}, batch {n}.")
        print()
        print("| " + " | ".join(header) + " |")
        print(sep)
        for info in sto:
            cells, per_step = [], float("nan")
            for nfe in nfes:
                out, actual, per_step = run(info, nfe, big, seed=args.seed)
                cell = _fmt_err(_moment_error(out, mean, cov))
                if actual != nfe:
                    cell += f" @{actual}"
                    note_nfe = True
                cells.append(cell)
            print(f"| {info.name} | {info.order} | " + " | ".join(cells)
                  + f" | {1e3 * per_step:.2f} |", flush=True)
    print()
    if note_nfe:
        print("@n: the step count closest to the NFE budget makes n model calls (e.g. Heun's "
              "last step to sigma 0 is a single Euler call).")
    if skipped:
        print(f"Not shown: {', '.join(skipped)} (inversion: data to noise).")


DIGITS_SOLVERS = ("euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral")


def demo_digits(args, infos, out: Path) -> Path:
    """The digits model: a quality table per solver and NFE, and a PNG of the first 16 samples
    of each cell (with matplotlib a labelled figure, else a plain mosaic: a row per solver,
    the NFE budgets side by side)."""
    import torch

    from .models.digits import load_checkpoint, load_digits_model, quality, to_pixels
    from .plots import have_matplotlib, plot_digits_grid, save_image_grid
    from .sampler import Sampler

    if args.solvers:
        names = [i.name for i in infos if i.family != "inversion"]
    else:
        names = [n for n in DIGITS_SOLVERS if n in {i.name for i in infos}]
    nfes = args.digits_nfe
    process, model, prediction = load_digits_model()
    ref = load_checkpoint()["reference"]
    n = args.digits_samples
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
    noise = torch.randn(n, *model.sample_shape, generator=torch.Generator().manual_seed(args.seed))
    grid = {}
    with progress(len(names) * sum(nfes), "digits", args.quiet, unit="eval") as bar:
        counted = _counting(model, bar)
        for name in names:
            per = _solver_info(name).nfe_per_step
            cells = []
            for nfe in nfes:
                s = Sampler(process, solver=name, steps=max(1, round(nfe / per)),
                            prediction=prediction)
                x = s.sample(counted, noise, seed=args.seed)
                q = quality(x)
                grid[(name, s.nfe)] = to_pixels(x[:16])
                at = f" @{s.nfe}" if s.nfe != nfe else ""
                cells.append(f"fd {q['fd']:.1f}, conf {q['confidence']:.2f}{at}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    path = out / "digits_grid.png"
    if have_matplotlib():
        plot_digits_grid(grid, path)
    else:
        per_row = max(len([k for k in grid if k[0] == name]) for name in names)
        save_image_grid(torch.cat(list(grid.values())), path, nrow=min(n, 16) * per_row,
                        scale=4)
    print(f"wrote {path} (the first {min(n, 16)} samples of each cell, the same seeds "
          f"everywhere; rows: {', '.join(names)}; columns: NFE {', '.join(map(str, nfes))})")
    return path


def demo_plots(args, infos, out: Path) -> list:
    """error_vs_nfe.png and scatter_2d.png on the exact Gaussian mixtures, bench.png."""
    from .plots import gmm_error_vs_nfe, gmm_scatter, plot_error_vs_nfe, plot_scatter

    det = [i.name for i in infos if not i.stochastic and i.family != "inversion"]
    names = [i.name for i in infos if i.family != "inversion"]
    paths = []
    nfes = (8, 16, 32, 64, 128)
    with progress(len(det) * len(nfes), "error vs NFE", args.quiet) as bar:
        results = gmm_error_vs_nfe(det, nfes, progress=bar.update)
    paths.append(plot_error_vs_nfe(results, out / "error_vs_nfe.png"))
    with progress(len(names), "2-D scatter", args.quiet) as bar:
        data, samples = gmm_scatter(names, nfe=args.scatter_nfe, n=1000, seed=args.seed,
                                    progress=bar.update)
    paths.append(plot_scatter(data, samples, out / "scatter_2d.png"))
    paths += demo_bench(args, names, out)
    return paths


def demo_bench(args, names, out: Path) -> list:
    """bench.md and bench.png: a quick per-step solver timing (fused backend vs the torch
    reference) on 4x4x64x64 float32 states."""
    import torch

    from .plots import plot_bench

    backend = _backend_name(args.backend)
    shape, steps = (4, 4, 64, 64), 10
    copy_bw, rows = solver_bench(names, shape, steps, torch.float32, backend, 0.03, args.quiet)
    text = solver_bench_table(rows, shape, torch.float32, steps, backend, copy_bw)
    (out / "bench.md").write_text(text + "\n")
    return [out / "bench.md", plot_bench(text, out / "bench.png",
                                         title=f"per-step solver time: {backend} backend vs "
                                               f"torch reference ({'x'.join(map(str, shape))} "
                                               f"float32, `pyengine bench` for more)")]


def cmd_demo(args) -> int:
    import torch

    from .plots import MATPLOTLIB_HINT, have_matplotlib

    torch.set_num_threads(args.threads)
    infos = _demo_infos(args)
    backend = _backend_name(args.backend)
    out = Path(args.out)
    if not (args.no_digits and args.no_plots):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"cannot create the output folder {str(out)!r}: {e}") from None
    demo_gmm_table(args, infos, backend)
    if not args.no_digits:
        demo_digits(args, infos, out)
    if not args.no_plots:
        if have_matplotlib():
            for path in demo_plots(args, infos, out):
                print(f"wrote {path}")
        else:
            print(f"plots skipped: matplotlib is not installed; {MATPLOTLIB_HINT}")
    return 0


# ---------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------

#: --process names -> (description, constructor)
PROCESSES = {
    "vp": ("VP discrete, linear betas 1e-4..0.02, 1000 steps (DDPM)",
           lambda p: p.VP.discrete("linear")),
    "vp_scaled_linear": ("VP discrete, scaled-linear betas 0.00085..0.012 (Stable Diffusion)",
                         lambda p: p.VP.discrete("scaled_linear", beta_start=0.00085,
                                                 beta_end=0.012)),
    "vp_cosine": ("VP discrete, cosine alpha_bar (Nichol & Dhariwal)",
                  lambda p: p.VP.discrete("squaredcos_cap_v2")),
    "vp_continuous": ("VP SDE, beta 0.1..20 (score_sde)", lambda p: p.VP.continuous()),
    "sub_vp": ("sub-VP SDE (score_sde)", lambda p: p.VP.sub_vp()),
    "ve": ("VE, sigma 0.01..50 (SMLD/NCSN)", lambda p: p.VE()),
    "edm": ("EDM, sigma 0.002..80 (Karras 2022)", lambda p: p.EDM()),
    "flow": ("rectified flow / flow matching", lambda p: p.RectifiedFlow()),
}


def make_process(name: str):
    from . import processes
    if name not in PROCESSES:
        raise CLIError(f"unknown process {name!r}; known: {', '.join(PROCESSES)}")
    return PROCESSES[name][1](processes)


@dataclass
class ModelSpec:
    """A model resolved from the command line, with what sampling it needs."""
    label: str
    process: object
    model: object
    prediction: str
    shape: tuple
    images: object = None          # samples -> images [N, (C,) H, W] in [0, 1], or None


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise CLIError(f"--shape must be positive integers like 3,32,32; got {text!r}")
    return shape


def _is_factory(obj) -> bool:
    """A class, or a callable that can be called with no arguments (and takes no *args): a
    factory. A torch module, or a callable needing positional arguments: the model itself."""
    import torch
    if isinstance(obj, torch.nn.Module):
        return False
    if isinstance(obj, type):
        return True
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return False
    return not any(p.kind in positional and p.default is p.empty for p in params)


def _import_attr(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise CLIError(f"model must be 'digits', 'gmm' or an import path 'module:attr', "
                       f"got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())          # a module in the current folder, as python -m
    try:
        obj = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise CLIError(f"cannot import module {mod_name!r} (model {spec!r}): {e}") from None
        raise RuntimeError(f"importing {mod_name!r} failed: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    return obj


def resolve_model(args) -> ModelSpec:
    """``digits``, ``gmm`` or ``module:attr`` -> ModelSpec.

    ``module:attr`` names a model ``model(x, t)`` (a torch module or any callable taking the
    state and the [B] model time in the process's convention), or a factory called with no
    arguments that returns the model, ``(process, model)`` or ``(process, model,
    prediction)``. --process and --prediction override what a factory returns (defaults: vp,
    epsilon). The sample shape is --shape, else the model's ``sample_shape`` attribute.
    """
    from .parameterization import check_prediction
    from .processes import Process

    def pred(p):
        try:
            return check_prediction(p)
        except ValueError as e:
            raise CLIError(str(e)) from None

    shape = _parse_shape(args.shape) if args.shape else None
    if args.model == "digits":
        from .models.digits import load_digits_model, to_pixels
        if args.process not in (None, "edm"):
            raise CLIError(f"the digits model is trained on the EDM process; drop --process "
                           f"{args.process}")
        if args.prediction is not None and pred(args.prediction) != "sample":
            raise CLIError(f"the digits model is a denoiser (prediction 'sample'); drop "
                           f"--prediction {args.prediction}")
        process, model, prediction = load_digits_model()
        if shape is not None and math.prod(shape) != 64:
            raise CLIError(f"the digits model makes 8x8 images; --shape {args.shape} has "
                           f"{math.prod(shape)} elements")
        return ModelSpec("digits (8x8, EDM denoiser)", process, model, prediction,
                         shape or tuple(model.sample_shape), to_pixels)
    if args.model == "gmm":
        from .models import GaussianMixture
        proc_name = args.process or "vp"
        process = make_process(proc_name)
        prediction = pred(args.prediction or "epsilon")
        gmm = GaussianMixture.random(d=args.dim, M=4, seed=args.model_seed)
        if shape is not None and shape != (args.dim,):
            raise CLIError(f"the gmm model makes vectors of --dim {args.dim}; --shape "
                           f"{args.shape} disagrees")
        return ModelSpec(f"gmm (d={args.dim}, 4 components, {proc_name}, {prediction})",
                         process, gmm.as_model(process, prediction), prediction, (args.dim,))

    obj = _import_attr(args.model)
    process = prediction = None
    if _is_factory(obj):
        made = obj()
        if isinstance(made, (tuple, list)):
            if len(made) not in (2, 3):
                raise CLIError(f"factory {args.model!r} returned {len(made)} items; expected "
                               f"the model, (process, model) or (process, model, prediction)")
            process, model = made[0], made[1]
            prediction = made[2] if len(made) == 3 else None
            if not isinstance(process, Process):
                raise CLIError(f"factory {args.model!r} returned {type(process).__name__} "
                               f"where a pyengine process (pe.processes.*) belongs")
        else:
            model = made
    else:
        model = obj
    if not callable(model):
        raise CLIError(f"{args.model!r} is not callable (a {type(model).__name__}); it must "
                       f"be a model(x, t) or a factory returning one")
    if args.process is not None or process is None:
        process = make_process(args.process or "vp")
    prediction = pred(args.prediction or prediction or "epsilon")
    if shape is None:
        shape = getattr(model, "sample_shape", None)
        if shape is None:
            raise CLIError(f"give --shape for model {args.model!r} (e.g. --shape 3,32,32), or "
                           f"give the model a sample_shape attribute")
        shape = tuple(int(s) for s in shape)
    images = None
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        def images(x):
            return ((x.detach().float() + 1.0) * 0.5).clamp(0.0, 1.0)
    return ModelSpec(args.model, process, model, prediction, shape, images)


def _counting(model, bar):
    """The model, with ``bar.update(1)`` after each call (the progress of a sampling run)."""
    from .parameterization import Denoiser

    def counted(*a, **kw):
        out = model(*a, **kw)
        bar.update(1)
        return out
    return Denoiser(counted) if isinstance(model, Denoiser) else counted


_SHADES = " .:-=+*#%@"


def ascii_digits(images, per_row: int = 8) -> str:
    """Images [N, 8, 8] in [0, 1] as text, two characters per pixel, side by side."""
    lines = []
    imgs = images.reshape(-1, 8, 8)
    for lo in range(0, imgs.shape[0], per_row):
        block = imgs[lo:lo + per_row]
        for r in range(8):
            lines.append("  ".join("".join(2 * _SHADES[min(9, int(float(v) * 10))]
                                           for v in img[r]) for img in block).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _output_kind(path: str | None) -> str | None:
    if path is None:
        return None
    kind = Path(path).suffix.lower()
    if kind not in (".pt", ".npy", ".png"):
        raise CLIError(f"--output must end in .pt, .npy or .png, got {path!r}")
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise CLIError(f"--output folder {str(parent)!r} does not exist")
    return kind


def save_samples(x, path: str, kind: str, spec: ModelSpec) -> None:
    import numpy as np
    import torch

    if kind == ".pt":
        torch.save(x, path)
    elif kind == ".npy":
        np.save(path, x.numpy())
    else:
        from .plots import save_image_grid
        imgs = spec.images(x)
        nrow = max(1, math.ceil(math.sqrt(imgs.shape[0])))
        width = nrow * (imgs.shape[-1] + 1)
        save_image_grid(imgs, path, nrow=nrow, scale=max(1, min(8, 320 // width)))


def cmd_sample(args) -> int:
    import torch

    from .sampler import Sampler

    torch.set_num_threads(args.threads)
    info = _solver_info(args.solver)
    if info.family == "inversion":
        raise CLIError(f"solver {info.name!r} inverts data to noise; pick a sampling solver")
    schedule = _schedule_name(args.schedule)
    backend = _backend_name(args.backend) if args.backend else None
    kind = _output_kind(args.output)
    spec = resolve_model(args)
    if kind == ".png" and spec.images is None:
        raise CLIError(f"a .png grid needs image samples; {spec.label} makes samples of shape "
                       f"{spec.shape}: write .pt or .npy")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here")
    try:
        sampler = Sampler(spec.process, solver=info.name, steps=args.steps, schedule=schedule,
                          prediction=spec.prediction, backend=backend)
    except ValueError as e:
        raise CLIError(str(e)) from None
    model = spec.model
    if device.type != "cpu" and hasattr(model, "to"):
        model = model.to(device)
    try:
        from . import distributed
    except ImportError as e:
        raise RuntimeError(f"pyengine.distributed is not available ({e})") from None

    created, rank, world = False, 0, 1
    if args.distributed:
        created = distributed.init_distributed()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    try:
        mine = distributed.shard_range(args.num, rank, world, args.batch)
        batches = len({i // args.batch for i in mine})
        t0 = time.perf_counter()
        with progress(sampler.nfe * batches, f"sampling ({info.name}, {sampler.nfe} NFE)",
                      args.quiet or rank != 0, unit="eval") as bar:
            counted = _counting(model, bar)
            if args.distributed:
                x = distributed.sample_sharded(sampler, counted, args.num, spec.shape, args.seed,
                                               batch_size=args.batch, dtype=dtype, device=device,
                                               gather="rank0")
            else:
                x = distributed.sample_indices(sampler, counted, range(args.num), spec.shape,
                                               args.seed, batch_size=args.batch, dtype=dtype,
                                               device=device)
        seconds = time.perf_counter() - t0
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
    if rank != 0:
        return 0
    x = x.detach().cpu()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())
        print(f"pyengine sample: warning: {bad} of {x.shape[0]} samples are not finite",
              file=sys.stderr)
    if kind is not None:
        save_samples(x, args.output, kind, spec)
    ranks = f" on {world} ranks" if world > 1 else ""
    _say(args, f"pyengine sample: {args.num} samples of shape {tuple(spec.shape)} from "
               f"{spec.label}; {info.name}, {sampler.steps} steps ({sampler.nfe} NFE), "
               f"{schedule} schedule, seed {args.seed}, {args.dtype}{ranks}: {seconds:.2f} s")
    if kind is not None:
        _say(args, f"wrote {args.output}")
    if args.model == "digits" and not args.quiet:
        from .models.digits import quality, to_pixels
        q = quality(x)
        print(f"digit classifier: mean confidence {q['confidence']:.3f}, samples per class "
              f"0-9 {q['classes']}" + (f", Frechet distance {q['fd']:.2f}" if args.num >= 128
                                       else ""))
        if kind is None:
            print(ascii_digits(to_pixels(x[:16])))
    elif kind is None and not args.quiet:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        print(f"mean {flat.mean():.4g}, std {flat.std():.4g}, min {flat.min():.4g}, "
              f"max {flat.max():.4g} (give --output FILE to keep them)")
    return 0


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------


def _timer(fn, min_seconds: float, min_reps: int = 5, max_reps: int = 1000):
    """(median, p10, p90) in microseconds of repeated calls, after one warm-up call."""
    import numpy as np
    fn()
    times, start = [], time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    a = np.array(times)
    return float(np.median(a)), float(np.percentile(a, 10)), float(np.percentile(a, 90))


def _fmt_t(t):
    return f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})" if t[0] >= 10 else \
        f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})"


def solver_bench(names, shape, steps: int, dtype, backend: str, min_seconds: float,
                 quiet: bool = False):
    """(copy GB/s, rows): each solver's whole plan per step on ``backend`` and on the torch
    reference, with a model that costs nothing (it returns a fixed tensor), so the time is the
    solver's: its fused updates, noise and the runtime's bookkeeping."""
    import torch

    from . import processes
    from .sampler import Sampler

    numel = math.prod(shape)
    esize = torch.tensor([], dtype=dtype).element_size()
    # The roofline: a copy of one state-sized buffer (read + write), timed in this run. At
    # the default 4x4x64x64 the buffers sit in cache, so this is the cache's bandwidth.
    src = torch.randn(shape).to(dtype)
    dst = torch.empty_like(src)
    t_copy = _timer(lambda: dst.copy_(src), min(min_seconds, 0.2))
    copy_bw = 2 * numel * esize / (t_copy[0] * 1e-6) / 1e9
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g).to(dtype)
    const = (0.1 * torch.randn(shape, generator=g)).to(dtype)

    def model(x, t):
        return const

    proc = processes.VP.discrete("linear")
    rows = []
    with progress(len(names), "timing solvers", quiet, unit="solver") as bar:
        for name in names:
            s = Sampler(proc, solver=name, steps=steps, prediction="epsilon")
            nbytes = sum((len(op.bufs) + 1 + (op.aux_dst is not None)) * numel * esize
                         for op in s.plan.ops if hasattr(op, "bufs"))
            fused = _timer(lambda s=s: s.sample(model, noise, seed=0, backend=backend),
                           min_seconds)
            ref = _timer(lambda s=s: s.sample(model, noise, seed=0, backend="torch"), min_seconds)
            per = tuple(v / steps for v in fused)
            gbs = nbytes / steps / (per[0] * 1e-6) / 1e9
            custom = any(hasattr(op, "execute") for op in s.plan.ops)
            rows.append({"solver": name + (" *" if custom else ""), "nfe": s.nfe,
                         "per": per, "ref": tuple(v / steps for v in ref), "gbs": gbs,
                         "pct": 100 * gbs / copy_bw})
            bar.update(1)
    return copy_bw, rows


def solver_bench_table(rows, shape, dtype, steps, backend, copy_bw) -> str:
    head = (f"| solver | NFE | {backend} us/step (p10-p90) | GB/s | % copy | torch us/step "
            f"| speedup |")
    caption = (f"Per-step time of each solver's plan, {steps} steps on "
               f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} states, with a "
               f"model that costs nothing; GB/s counts the bytes the fused updates must move; "
               f"% copy divides it by the bandwidth of copying one such state, measured in this "
               f"run: {copy_bw:.1f} GB/s. Speedup: the torch reference backend's time over "
               f"{backend}'s, same run.")
    lines = [caption, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['nfe']} | {_fmt_t(r['per'])} | {r['gbs']:.1f} | "
                     f"{r['pct']:.0f}% | {_fmt_t(r['ref'])} | {r['ref'][0] / r['per'][0]:.1f}x |")
    if any(r["solver"].endswith(" *") for r in rows):
        lines += ["", ("*: the plan has a custom op (the Langevin corrector) whose bytes are "
                       "not counted in GB/s.")]
    return "\n".join(lines)


def kernel_bench_script() -> Path | None:
    """bench/bench_fused_update.py of a source checkout, if this package lives in one."""
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_fused_update.py"
    return path if path.is_file() else None


def cmd_bench(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    if args.solvers:
        infos = [_solver_info(n.strip()) for n in args.solvers.split(",") if n.strip()]
    else:
        from .solvers import list_solvers
        infos = list_solvers()
    names = [i.name for i in infos if i.family != "inversion"]
    backend = _backend_name(args.backend)
    shape = _parse_shape(args.shape)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    if args.plot:
        from .plots import MATPLOTLIB_HINT, have_matplotlib
        if not have_matplotlib():
            raise CLIError(f"--plot needs matplotlib: {MATPLOTLIB_HINT}")
    texts = []
    if args.suite in ("all", "solvers") and names:
        copy_bw, rows = solver_bench(names, shape, args.steps, dtype, backend, args.min_seconds,
                                     args.quiet)
        text = solver_bench_table(rows, shape, dtype, args.steps, backend, copy_bw)
        print(text, flush=True)
        texts.append(text)
    if args.suite in ("all", "kernel"):
        script = kernel_bench_script()
        if script is None:
            msg = "kernel benchmark: bench/bench_fused_update.py is not here (a source " \
                  "checkout has it); skipped"
            if args.suite == "kernel":
                raise CLIError(msg)
            _say(args, "\n" + msg)
        else:
            cmd = [sys.executable, str(script), "--threads", str(args.threads)]
            cmd += [] if args.full else ["--quick"]
            if args.backend:
                cmd += ["--backend", args.backend]
            try:
                import diffusers  # noqa: F401
            except ImportError:
                cmd.append("--skip-diffusers")
            _say(args, f"\nkernel benchmark: {' '.join(cmd[1:])}", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{script.name} failed (exit {proc.returncode}): "
                                   f"{proc.stderr.strip()[-2000:]}")
            report = proc.stdout
            if "# fused update benchmark" in report:        # the final report, not the live rows
                report = report[report.index("# fused update benchmark"):]
            print(report.rstrip(), flush=True)
            texts.append(report)
    if args.output:
        Path(args.output).write_text("\n\n".join(texts) + "\n")
        _say(args, f"wrote {args.output}")
    if args.plot:
        from .plots import plot_bench
        plot_bench("\n\n".join(texts), args.plot, title=f"pyengine bench ({backend} backend)")
        _say(args, f"wrote {args.plot}")
    return 0

# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _seed(text):
    v = _nonneg_int(text)
    if v >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2^32), got {v}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


_BACKEND_HELP = ("fused-update backend (default: $PYENGINE_BACKEND, else the best available; "
                 "see `pyengine info`)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pyengine",
        description="pyengine: a compiled sampling engine for diffusion models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # -- sample ------------------------------------------------------------------------
    sm = sub.add_parser(
        "sample", help="sample a built-in or user model to a file",
        description="Turn noise into samples. MODEL is 'digits' (the trained 8x8 digits "
                    "denoiser), 'gmm' (the exact Gaussian mixture) or an import path "
                    "'module:attr' naming a model(x, t), or a factory called with no "
                    "arguments that returns the model, (process, model) or (process, model, "
                    "prediction). Sample i uses the Philox seed (seed, i) for its initial noise "
                    "and every noise draw, so a sample does not depend on --num or --batch "
                    "(for models that treat samples independently) nor on --distributed.",
        epilog="examples: pyengine sample digits --solver heun --steps 10 -o digits.png | "
               "pyengine sample gmm --num 1000 -o x.npy | "
               "pyengine sample mypkg.models:make_unet --shape 3,32,32 -o x.pt")
    sm.add_argument("model", nargs="?", default="digits",
                    help="digits (default), gmm, or module:attr")
    sm.add_argument("--solver", default="dpmpp_2m",
                    help="solver name (default dpmpp_2m; `pyengine solvers` lists them)")
    sm.add_argument("--steps", type=_positive_int, default=20, help="solver steps (default 20)")
    sm.add_argument("--schedule", default="karras", help="noise schedule (default karras)")
    sm.add_argument("--seed", type=_seed, default=0,
                    help="seed in [0, 2^32): sample i uses the Philox key (seed, i) (default 0)")
    sm.add_argument("-n", "--num", "--num-samples", dest="num", type=_positive_int, default=16,
                    help="number of samples (default 16); write -n under torchrun, whose own "
                         "parser takes --num for its --numa-binding")
    sm.add_argument("--batch", type=_positive_int, default=64,
                    help="samples per model call (default 64)")
    sm.add_argument("--process", default=None, choices=list(PROCESSES),
                    help="forward process of gmm or a user model (default vp: "
                         + PROCESSES["vp"][0] + "); the digits model is EDM")
    sm.add_argument("--prediction", default=None,
                    help="what the model predicts: epsilon (default), sample, v, flow, score")
    sm.add_argument("--shape", default=None,
                    help="shape of one sample, e.g. 3,32,32 (user models without a "
                         "sample_shape attribute)")
    sm.add_argument("--dim", type=_positive_int, default=2,
                    help="dimension of the gmm model (default 2)")
    sm.add_argument("--model-seed", type=_nonneg_int, default=0,
                    help="seed of the gmm model's random mixture (default 0)")
    sm.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="state dtype (default float32)")
    sm.add_argument("--device", default="cpu", help="torch device (default cpu)")
    sm.add_argument("--backend", default=None, help=_BACKEND_HELP)
    sm.add_argument("--output", "-o", default=None,
                    help="write the samples: .pt (torch.save of the tensor), .npy, or .png "
                         "(an image grid, for image models)")
    sm.add_argument("--distributed", action="store_true",
                    help="shard the samples over torchrun's ranks "
                         "(pyengine.distributed.sample_sharded); rank 0 writes the output")
    sm.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    sm.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    sm.set_defaults(func=cmd_sample)

    # -- demo --------------------------------------------------------------------------
    d = sub.add_parser("demo", help="solver tables, digits samples and plots",
                       description="Every solver of the registry on the exact Gaussian "
                                   "mixture (error against the exact PF-ODE endpoint, time per "
                                   "step); the trained digits model per solver and NFE; and, "
                                   "with matplotlib, the plots, written as PNG to --out.")
    d.add_argument("--nfe", type=_positive_int, nargs="+", default=[10, 20, 40],
                   help="model-evaluation budgets, one column each (default: 10 20 40)")
    d.add_argument("--solvers", default="",
                   help="comma-separated solver names (default: every registered solver; the "
                        "digits section then shows " + ", ".join(DIGITS_SOLVERS) + ")")
    d.add_argument("--process", choices=("vp", "edm"), default="vp",
                   help="forward process: VP discrete with an epsilon model, or EDM with a "
                        "denoiser (default: vp)")
    d.add_argument("--dim", type=_positive_int, default=16, help="data dimension (default 16)")
    d.add_argument("--batch", type=_positive_int, default=8,
                   help="samples measured against the exact endpoint (default 8)")
    d.add_argument("--samples", type=_positive_int, default=512,
                   help="samples per stochastic solver for the moment error (default 512)")
    d.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the mixture and noise")
    d.add_argument("--backend", default=None, help=_BACKEND_HELP)
    d.add_argument("--threads", type=_positive_int, default=1,
                   help="torch threads (default 1: these tensors are tiny, so more threads "
                        "only add overhead)")
    d.add_argument("--out", default="pyengine-demo",
                   help="folder for the PNGs (default ./pyengine-demo)")
    d.add_argument("--digits-nfe", type=_positive_int, nargs="+", default=[5, 10, 20],
                   help="NFE budgets of the digits section (default: 5 10 20)")
    d.add_argument("--digits-samples", type=_positive_int, default=128,
                   help="digits samples per solver and NFE for the scores (default 128)")
    d.add_argument("--scatter-nfe", type=_positive_int, default=10,
                   help="NFE of the 2-D scatter plot (default 10)")
    d.add_argument("--no-digits", action="store_true", help="skip the digits model")
    d.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    # -- bench -------------------------------------------------------------------------
    b = sub.add_parser("bench", help="benchmark tables: per-step solver time, fused kernel",
                       description="Per-step time of every solver's plan on the fused backend "
                                   "against the torch reference, with a free model; then "
                                   "bench/bench_fused_update.py (fused kernel vs unfused torch "
                                   "vs diffusers) when run from a source checkout.")
    b.add_argument("--suite", choices=("all", "solvers", "kernel"), default="all",
                   help="which tables (default all)")
    b.add_argument("--solvers", default="", help="comma-separated solver names (default all)")
    b.add_argument("--shape", default="4,4,64,64",
                   help="state shape of the solver table (default 4,4,64,64)")
    b.add_argument("--steps", type=_positive_int, default=10,
                   help="steps of each timed plan (default 10)")
    b.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    b.add_argument("--backend", default=None, help=_BACKEND_HELP)
    b.add_argument("--min-seconds", type=_positive_float, default=0.2,
                   help="time spent per measurement (default 0.2)")
    b.add_argument("--full", action="store_true",
                   help="the kernel benchmark's every shape (default: its --quick mode)")
    b.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    b.add_argument("--output", "-o", default=None, help="write the tables to a markdown file")
    b.add_argument("--plot", default=None, help="write a bar chart PNG (needs matplotlib)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, backends, native module and solvers")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("solvers", help="the solver registry as a table")
    s.add_argument("--markdown", action="store_true", help="print a markdown table")
    s.add_argument("--full", action="store_true",
                   help="describe each solver by its whole update formula")
    s.set_defaults(func=cmd_solvers)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help (0) or a usage error (2, message printed)
        return int(e.code or 0)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"pyengine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyengine {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:           # the model's or a library's error: say what, exit 1
        if os.environ.get("PYENGINE_DEBUG"):
            raise
        kind = "" if isinstance(e, (ValueError, RuntimeError, OSError)) else \
            f"{type(e).__name__}: "
        print(f"pyengine {args.command}: error: {kind}{e} (PYENGINE_DEBUG=1 shows the "
              f"traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
