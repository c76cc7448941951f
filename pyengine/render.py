"""Terminal output: progress bars, the solver registry as a table, digits as ASCII art, the
install report of ``pyengine info``."""

from __future__ import annotations

import sys

__all__ = ["NoBar", "progress", "counting", "solvers_table", "ascii_digits", "print_info"]


class NoBar:
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
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar()
    # disable=None: no bar when stderr is not a terminal (logs and pipes stay clean)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, delay=0.5, leave=False,
                dynamic_ncols=True, disable=None)


def counting(model, bar):
    """The model, with ``bar.update(1)`` after each call (the progress of a sampling run)."""
    from .parameterization import Denoiser

    def counted(*a, **kw):
        out = model(*a, **kw)
        bar.update(1)
        return out
    return Denoiser(counted) if isinstance(model, Denoiser) else counted


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


def print_info() -> int:
    """``pyengine info``: versions, the native module, each backend's reasons per device, the
    default backend and the solver table; 1 when the default backend is unusable."""
    import os

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
        for name, why in backends.explain(dev).items():
            print(f"  {name:7s} {'runs' if why is None else 'no: ' + why}")
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
