"""Writing samples to a file: the target is checked before any sampling, and the file is
written to a temporary file in the same folder and renamed over the target, so an
interrupted write (SIGTERM, Ctrl-C, a full disk) never leaves a partial file nor destroys a
good existing one."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
from pathlib import Path

from .errors import UsageError

__all__ = ["KINDS", "check_output", "check_writable", "atomic_write", "save_samples"]

KINDS = (".pt", ".npy", ".png")


def check_output(path: str | None, option: str = "--output") -> str | None:
    """The kind ('.pt', '.npy', '.png') of an output path, or None for no path; UsageError
    naming ``option`` when the suffix is unknown, the folder is missing, or a file cannot be
    created there (tried, so permissions, read-only mounts and ACLs all count)."""
    if path is None:
        return None
    kind = Path(path).suffix.lower()
    if kind not in KINDS:
        raise UsageError(f"{option} must end in .pt, .npy or .png, got {path!r}")
    check_writable(path, option)
    return kind


def check_writable(path, option: str = "--output") -> None:
    """UsageError naming ``option`` unless a file can be created in ``path``'s folder and
    ``path`` is not a folder."""
    target = Path(path).expanduser()
    parent = target.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{option} folder {str(parent)!r} does not exist")
    if target.is_dir():
        raise UsageError(f"{option} {path!r} is a folder, not a file")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".check")
    except OSError as e:
        raise UsageError(f"{option} folder {str(parent)!r} is not writable: "
                         f"{e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises SystemExit(143) in the block (main thread only), so the temporary file
    is removed rather than left behind by the default action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def atomic_write(path, write) -> Path:
    """Call ``write(f)`` on a binary file object of a temporary file next to ``path``, then
    rename it to ``path`` (atomic on POSIX and Windows). On any error or interruption the
    temporary file is removed and ``path`` is unchanged."""
    target = Path(path).expanduser()
    parent = target.resolve().parent
    with _sigterm_raises():
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)         # what open() would have given
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return target


def save_samples(x, path, kind: str, images=None) -> Path:
    """Write samples ``x`` (a CPU tensor) as .pt (torch.save of the tensor), .npy or .png (a
    grid of ``images(x)``), atomically (:func:`atomic_write`)."""
    import numpy as np
    import torch

    if kind == ".pt":
        def write(f):
            torch.save(x, f)
    elif kind == ".npy":
        def write(f):
            np.save(f, x.numpy())
    elif kind == ".png":
        from .plots import image_grid, png_bytes
        if images is None:
            raise UsageError("a .png grid needs image samples")
        imgs = images(x)
        nrow = max(1, math.ceil(math.sqrt(imgs.shape[0])))
        width = nrow * (imgs.shape[-1] + 1)
        data = png_bytes(image_grid(imgs, nrow=nrow, scale=max(1, min(8, 320 // width))))

        def write(f):
            f.write(data)
    else:
        raise UsageError(f"output kind must be one of {KINDS}, got {kind!r}")
    return atomic_write(path, write)
