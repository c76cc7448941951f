"""Plots of solvers on exact ground truth, digits samples and benchmark tables.

The measurements (``gmm_error_vs_nfe``, ``gmm_scatter``, ``digits_grid``) need only torch;
the drawing functions (``plot_*``) need matplotlib, the optional extra ``plots``
(``pip install 'pyengine-sampling[plots]'``). ``save_image_grid`` writes a PNG without matplotlib.

    results = gmm_error_vs_nfe()          # every deterministic solver of the registry
    plot_error_vs_nfe(results, "error_vs_nfe.png")
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["have_matplotlib", "MATPLOTLIB_HINT", "fit_order", "gmm_error_vs_nfe", "gmm_scatter",
           "digits_grid", "image_grid", "png_bytes", "save_png", "save_image_grid",
           "parse_markdown_tables", "plot_error_vs_nfe", "plot_scatter", "plot_digits_grid",
           "plot_bench", "tuning_error_vs_nfe", "plot_tuning_error_vs_nfe"]

MATPLOTLIB_HINT = "pip install 'pyengine-sampling[plots]' (or: pip install matplotlib)"

# The order measurement follows tests/test_order.py: EDM, a grid uniform in log sigma from
# 2.0 to 0.2 without the final step to 0 (pure discretization), so a solver's error falls as
# NFE^-order; from sigma 2 the mixture's denoiser is already nonlinear.
ORDER_SIGMA_MAX, ORDER_SIGMA_MIN = 2.0, 0.2


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(f"plots need matplotlib: {MATPLOTLIB_HINT}") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


# ---------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------


def fit_order(nfes, errors, last: int = 3) -> float:
    """Empirical order: minus the least-squares slope of log(error) on log(NFE) over the
    ``last`` points (the asymptotic end); nan with fewer than two finite positive points."""
    pts = [(n, e) for n, e in zip(nfes, errors) if e > 0 and math.isfinite(e)][-last:]
    if len(pts) < 2:
        return math.nan
    n, e = np.log(np.array(pts, dtype=np.float64)).T
    return float(-np.polyfit(n, e, 1)[0])


def _deterministic(names):
    from .solvers import get, list_solvers
    infos = [get(n) for n in names] if names else list_solvers()
    return [i for i in infos if not i.stochastic and i.family != "inversion"]


def gmm_error_vs_nfe(solvers=None, nfes=(8, 16, 32, 64, 128), *, d: int = 16, batch: int = 4,
                     seed: int = 0, progress=None) -> dict:
    """{solver: [(nfe, max |x - x_exact|), ...]} for every deterministic solver (or the
    given names) on a Gaussian mixture with an exact PF-ODE endpoint.

    EDM process, denoiser model, a grid uniform in log sigma from 2 to 0.2 (no final step to
    0), float64: the pure discretization error, whose slope against NFE is the solver's order.
    The step count is NFE / (model calls per step), at least 1. ``progress(n)`` is called
    after each run.
    """
    from . import processes, schedules
    from .models import GaussianMixture
    from .sampler import Sampler

    gmm = GaussianMixture.random(d=d, M=4, seed=seed, scale=0.5)
    proc = processes.EDM()
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(batch, d, generator=g, dtype=torch.float64) * ORDER_SIGMA_MAX
    exact = gmm.ode_endpoint(start, ORDER_SIGMA_MAX, ORDER_SIGMA_MIN, rtol=1e-12, atol=1e-14)
    model = gmm.as_model(proc, "sample")
    out = {}
    for info in _deterministic(solvers):
        pts = []
        for nfe in nfes:
            steps = max(1, round(nfe / info.nfe_per_step))
            sig = schedules.exponential(steps + 1, ORDER_SIGMA_MIN, ORDER_SIGMA_MAX,
                                        append_zero=False)
            s = Sampler(proc, solver=info.name, sigmas=sig, prediction="sample",
                        init_noise_scale=1.0)
            x = s.sample(model, start)
            pts.append((s.nfe, float((x - exact).abs().max())))
            if progress is not None:
                progress(1)
        out[info.name] = pts
    return out


def tuning_error_vs_nfe(nfes=(3, 4, 5, 6, 8), solvers=("dpmpp_2m", "unipc", "ipndm"), *,
                        tuned_base: str | None = "unipc", d: int = 16, n_train: int = 48,
                        n_test: int = 64, seed: int = 0, iters: int = 100,
                        fine_steps: int = 150, progress=None) -> dict:
    """{label: [(nfe, median error, 90th-percentile error), ...]} of fixed, schedule-tuned and
    fully tuned plans on an exact Gaussian mixture, on held-out noise.

    EDM process, denoiser model, Karras grid from 80 to 0.002 (no final step to 0), float64;
    the error of a sample is its RMS distance to the exact PF-ODE endpoint of its noise.
    Labels: ``"<solver>"`` (the Karras grid), ``"<solver> + GITS"`` (the grid of
    :func:`pyengine.tuning.gits.gits_schedule` fitted on ``n_train`` other noises, one
    teacher run for every NFE) and ``"tuned <tuned_base>"`` (:func:`pyengine.tuning.tune`:
    schedule, evaluation times and coefficients, ``iters`` gradient iterations; skipped when
    ``tuned_base`` is None). ``progress(n)`` is called after each fit or run."""
    from . import processes
    from .models import GaussianMixture
    from .sampler import Sampler
    from .tuning.gits import dp_path, step_costs, teacher_trajectory

    proc = processes.EDM()
    gmm = GaussianMixture.random(d=d, M=4, seed=seed)
    model = gmm.as_model(proc, "sample")
    g = torch.Generator().manual_seed(seed + 1)
    train = torch.randn(n_train, d, generator=g, dtype=torch.float64)
    test = torch.randn(n_test, d, generator=g, dtype=torch.float64)
    exact = gmm.ode_endpoint(test * proc.sigma_max, proc.sigma_max, proc.sigma_min)

    def score(x):
        e = ((x - exact).pow(2).mean(dim=1)).sqrt()
        return float(e.median()), float(e.quantile(0.9))

    def tick():
        if progress is not None:
            progress(1)

    out: dict = {}
    ref = Sampler(proc, solvers[0], steps=nfes[0], prediction="sample", to_zero=False)
    traj = teacher_trajectory(ref, model, train, fine_steps=fine_steps)
    costs = step_costs(traj)
    for name in solvers:
        for nfe in nfes:
            karras = Sampler(proc, name, steps=nfe, prediction="sample", to_zero=False)
            out.setdefault(name, []).append((karras.nfe, *score(karras.sample(model, test))))
            grid = traj.sigmas[dp_path(costs, nfe)[0]]
            gits = Sampler(proc, name, sigmas=grid, prediction="sample")
            out.setdefault(f"{name} + GITS", []).append((gits.nfe, *score(gits.sample(model,
                                                                                      test))))
            tick()
    if tuned_base is not None:
        from .tuning.fit import tune
        from .tuning.mixture import mixture_model
        differentiable = mixture_model(gmm, proc, "sample")
        for nfe in nfes:
            base = Sampler(proc, tuned_base, steps=nfe, prediction="sample", to_zero=False)
            fit = tune(base, differentiable, train, iters=iters, progress=False, seed=seed,
                       teacher=("dpmpp_3m_corrected", 128))
            tuned = Sampler.from_tuned(fit, proc)
            out.setdefault(f"tuned {tuned_base}", []).append(
                (tuned.nfe, *score(tuned.sample(model, test))))
            tick()
    return out


def gmm_scatter(solvers=None, nfe: int = 10, n: int = 1000, *, seed: int = 0,
                progress=None):
    """(data samples [n, 2], {solver: samples [n, 2]}) on a 2-D mixture of 6 components:
    VP discrete process, epsilon model, Karras schedule to 0, the step count whose NFE is
    closest to ``nfe``; every registered solver except inversion by default."""
    from . import processes
    from .models import GaussianMixture
    from .sampler import Sampler
    from .solvers import get, list_solvers

    infos = [get(s) for s in solvers] if solvers else list_solvers()
    infos = [i for i in infos if i.family != "inversion"]
    gmm = GaussianMixture.random(d=2, M=6, seed=seed, scale=1.5)
    proc = processes.named("vp")
    model = gmm.as_model(proc, "epsilon")
    g = torch.Generator().manual_seed(seed)
    data = gmm.sample(n, generator=g)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = {}
    for info in infos:
        steps = max(1, round(nfe / info.nfe_per_step))
        s = Sampler(proc, solver=info.name, steps=steps, prediction="epsilon")
        out[f"{info.name} (NFE {s.nfe})"] = s.sample(model, noise, seed=seed)
        if progress is not None:
            progress(1)
    return data, out


def digits_grid(solvers=None, nfes=(5, 10, 20, 50), n: int = 16, *, seed: int = 0,
                progress=None) -> dict:
    """{(solver, nfe): images [n, 8, 8] in [0, 1]} from the built-in digits model, the same
    noise and seeds in every cell, so a column shows what more steps buy; the registry's
    featured solvers by default."""
    from .models.digits import load_digits_model, to_pixels
    from .sampler import Sampler
    from .solvers import get, registry

    if solvers is None:
        solvers = [i.name for i in registry.featured()]

    process, model, prediction = load_digits_model()
    noise = torch.randn(n, *model.sample_shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for name in solvers:
        info = get(name)
        for nfe in nfes:
            steps = max(1, round(nfe / info.nfe_per_step))
            s = Sampler(process, solver=name, steps=steps, prediction=prediction)
            out[(name, s.nfe)] = to_pixels(s.sample(model, noise, seed=seed))
            if progress is not None:
                progress(1)
    return out


# ---------------------------------------------------------------------------------------
# PNG without matplotlib
# ---------------------------------------------------------------------------------------


def image_grid(images, nrow: int | None = None, pad: int = 1, scale: int = 1,
               pad_value: float = 0.25) -> np.ndarray:
    """Tile images [N, H, W] or [N, C, H, W] (values in [0, 1], C = 1 or 3) into one uint8
    array [rows*(H+pad)+pad, ...] (H x W, or H x W x 3), each pixel repeated ``scale`` times."""
    a = images.detach().cpu().to(torch.float32).numpy() if isinstance(images, torch.Tensor) \
        else np.asarray(images, dtype=np.float32)
    if a.ndim == 4:
        if a.shape[1] not in (1, 3):
            raise ValueError(f"images [N, C, H, W] need C = 1 or 3, got shape {a.shape}")
        a = a[:, 0] if a.shape[1] == 1 else a.transpose(0, 2, 3, 1)
    if a.ndim not in (3, 4):
        raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {a.shape}")
    n, h, w = a.shape[:3]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad) + a.shape[3:],
                     pad_value, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h,
               pad + c * (w + pad):pad + c * (w + pad) + w] = a[i]
    canvas = np.clip(np.nan_to_num(canvas), 0.0, 1.0)
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return (canvas * 255.0 + 0.5).astype(np.uint8)


def save_png(pixels: np.ndarray, path) -> Path:
    """Write a uint8 [H, W] (gray) or [H, W, 3] (RGB) array as a PNG (zlib, no dependencies)."""
    path = Path(path)
    path.write_bytes(png_bytes(pixels))
    return path


def png_bytes(pixels: np.ndarray) -> bytes:
    """The PNG file of a uint8 [H, W] (gray) or [H, W, 3] (RGB) array."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"PNG pixels must be [H, W] or [H, W, 3] uint8, got shape {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))   # filter 0 on every row

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def save_image_grid(images, path, nrow: int | None = None, scale: int = 4) -> Path:
    """Tile images (see :func:`image_grid`) and write them as a PNG."""
    return save_png(image_grid(images, nrow=nrow, scale=scale), path)


# ---------------------------------------------------------------------------------------
# matplotlib figures
# ---------------------------------------------------------------------------------------


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def plot_error_vs_nfe(results: dict, path, *, declared: dict | None = None,
                      title: str | None = None) -> Path:
    """Log-log error vs NFE, one line per solver, the fitted order in the legend (and the
    declared one from the registry when ``declared`` maps names to orders)."""
    plt = _plt()
    if declared is None:
        from .solvers import REGISTRY
        declared = {k: v.order for k, v in REGISTRY.items()}
    fig, ax = plt.subplots(figsize=(8.5, 6))
    cmap = plt.get_cmap("tab20")
    styles = ("-", "--", "-.", ":")
    for i, (name, pts) in enumerate(sorted(results.items())):
        nfe = [p[0] for p in pts]
        err = [p[1] for p in pts]
        order = fit_order(nfe, err)
        label = f"{name}: {order:.2f}" if math.isfinite(order) else f"{name}: n/a"
        if name in declared:
            label += f" (declared {declared[name]})"
        ax.loglog(nfe, err, styles[i % 4], marker="o", ms=3.5, color=cmap(i % 20), label=label)
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("max |x - x_exact|")
    ax.set_title(title or f"Error vs NFE on the exact Gaussian mixture (PF-ODE from sigma "
                          f"{ORDER_SIGMA_MAX:g} to {ORDER_SIGMA_MIN:g}, float64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="solver: fitted order", fontsize=7.5, title_fontsize=8, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_tuning_error_vs_nfe(results: dict, path, *, title: str | None = None) -> Path:
    """Median error vs NFE (log scale) of :func:`tuning_error_vs_nfe`'s results: fixed solvers
    dashed, GITS grids dotted, fully tuned plans solid with their 90th percentile as a band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    bases = list(dict.fromkeys(k.replace(" + GITS", "") for k in results
                               if not k.startswith("tuned ")))
    for label, pts in results.items():
        nfe = [p[0] for p in pts]
        med = [p[1] for p in pts]
        q90 = [p[2] for p in pts]
        if label.startswith("tuned "):
            style, color, lw = "-", "k", 2.2
        else:
            base = label.replace(" + GITS", "")
            style = ":" if label.endswith("+ GITS") else "--"
            color, lw = f"C{bases.index(base) % 10}", 1.4
        ax.semilogy(nfe, med, style, marker="o", ms=4, color=color, lw=lw, label=label)
        if label.startswith("tuned "):
            ax.fill_between(nfe, med, q90, color=color, alpha=0.1, lw=0,
                            label=f"{label}: to the 90th percentile")
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("median RMS error vs the exact PF-ODE endpoint")
    ax.set_title(title or "Fixed, schedule-tuned (GITS) and fully tuned plans on an exact "
                          "Gaussian mixture\n(EDM, Karras 80 -> 0.002, held-out noise, float64)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_scatter(data, samples: dict, path, *, title: str | None = None) -> Path:
    """One panel per solver: its samples over the exact data samples (gray)."""
    plt = _plt()
    n = len(samples) + 1
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False,
                             sharex=True, sharey=True)
    d = data.numpy()
    lo, hi = d.min(0) - 0.5, d.max(0) + 0.5
    panels = [("data (exact)", None)] + list(samples.items())
    for ax, (name, x) in zip(axes.flat, panels):
        ax.scatter(d[:, 0], d[:, 1], s=2, color="0.75", lw=0)
        if x is not None:
            x = x.detach().numpy()
            ax.scatter(x[:, 0], x[:, 1], s=2, color="C0", lw=0)
        ax.set_title(name, fontsize=8)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or "2-D Gaussian mixture: samples per solver (blue) over data (gray)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_digits_grid(grid: dict, path, *, nrow: int = 4, title: str | None = None) -> Path:
    """Rows: solvers; columns: NFE; each cell the same seeds' digits as a mosaic."""
    plt = _plt()
    solvers = list(dict.fromkeys(k[0] for k in grid))
    nfes = {s: sorted(k[1] for k in grid if k[0] == s) for s in solvers}
    cols = max(len(v) for v in nfes.values())
    fig, axes = plt.subplots(len(solvers), cols, figsize=(1.9 * cols, 1.95 * len(solvers)),
                             squeeze=False)
    for r, s in enumerate(solvers):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(nfes[s]):
                ax.axis("off")
                continue
            nfe = nfes[s][c]
            ax.imshow(image_grid(grid[(s, nfe)], nrow=nrow), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_title(f"NFE {nfe}", fontsize=8)
            if c == 0:
                ax.set_ylabel(s, fontsize=9)
    fig.suptitle(title or "Digits model (EDM, 8x8): the same seeds per cell", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def parse_markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``text`` as (header, rows of cells), in order."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.startswith("|") and nxt.startswith("|") and set(nxt) <= set("|-: "):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(x|%)?$")


def _number(cell: str) -> float:
    """The leading number of a cell ('12.3 (11-14)' -> 12.3, '1.2x' -> 1.2, '80%' -> 80),
    nan for anything else ('16x4x128x128', 'DDIM')."""
    tok = cell.replace("`", "").split()
    if not tok or not _NUMBER.match(tok[0]):
        return math.nan
    return float(tok[0].rstrip("x%"))


def _fmt_value(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}"


def plot_bench(text: str, path, *, column: str | None = None, title: str | None = None) -> Path:
    """Bar charts of the benchmark tables in markdown ``text``: one panel per table, one group
    of bars per row (labelled by its non-numeric cells) with a bar per timing column (every
    column whose header says us or ms: fused vs unfused vs diffusers side by side), or the
    one ``column`` given; a log axis when the times span more than 20x."""
    plt = _plt()
    tables = parse_markdown_tables(text)
    if not tables:
        raise ValueError("no markdown table found in the benchmark text")
    nrows = sum(len(r) for _, r in tables)
    fig, axes = plt.subplots(len(tables), 1, squeeze=False, layout="constrained",
                             figsize=(9.5, 0.42 * nrows + 1.5 * len(tables)))
    for ax, (header, rows) in zip(axes[:, 0], tables):
        numeric = [j for j in range(len(header))
                   if rows and all(math.isfinite(_number(r[j])) for r in rows if j < len(r))]
        if column is not None:
            if column not in header:
                raise ValueError(f"no column {column!r} in the table with header {header}")
            cols = [header.index(column)]
        else:
            cols = [j for j in numeric if re.search(r"(^|[\s(])(us|ms)([\s/)]|$)", header[j])]
            cols = cols or numeric[:1]
            if not cols:
                raise ValueError(f"no numeric column in the table with header {header}")
        labels = [" ".join(r[k].replace("`", "") for k in range(min(len(r), len(header)))
                           if k not in numeric) for r in rows]
        y = np.arange(len(rows))
        h = 0.8 / len(cols)
        values = []
        for c, j in enumerate(cols):
            v = [_number(r[j]) if j < len(r) else math.nan for r in rows]
            values += [x for x in v if math.isfinite(x)]
            pos = y - 0.4 + h * (c + 0.5)
            ax.barh(pos, v, height=h, color=f"C{c}", label=header[j])
            for yy, x in zip(pos, v):
                if math.isfinite(x):
                    ax.text(x, yy, " " + _fmt_value(x), va="center", fontsize=6.5)
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_yticks(y, labels, fontsize=7.5)
        ax.invert_yaxis()
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=len(cols),
                  frameon=False)
        ax.set_xlabel("time (shorter is faster)")
    fig.suptitle(title or "benchmark", fontsize=10)
    return _save(fig, path)
