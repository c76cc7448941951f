"""The dispatcher: which backend runs a fused update, and why the others do not (STYLE 10).

Every backend answers ``reasons_unsupported(call) -> list[str]`` for a concrete :class:`Call`
(device, dtypes, number of buffers, size); an empty list means it can run it. Backends that
predate this interface (torch, cpp, cuda) are asked through ``unavailable_reason`` plus the
contract's dtype and K limits. The choice, best first:

1. ``backend=`` (a name) or ``$PYENGINE_BACKEND`` forces one; if it cannot run the call, a
   ValueError says why (no silent fallback from a forced choice);
2. else the device's priority -- CUDA: cuda, triton, torch; CPU: cpp, numba, torch -- or, where
   :func:`rank` has measured this device before (``PYENGINE_RANK=1 pyengine info``), that
   measured order (cached per device name in a small JSON file, ``$PYENGINE_RANKING_FILE``
   or ``~/.cache/pyengine/ranking.json``; nothing is measured implicitly, so neither import
   nor selection pays for timing);
3. the first backend with no reasons wins; when none fits, the ValueError lists every backend
   with its reasons.

numba and triton are imported only when asked about a concrete call or used (their imports
take 0.3 s and 1 s), so ``import pyengine`` stays as fast as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
import warnings
from dataclasses import dataclass

import torch

from ..errors import as_device
from ..fused_update.contract import FLOAT_DTYPES as CONTRACT_DTYPES
from ..fused_update.contract import K_MAX, validate
from . import cpp, cuda, torch_ref

PRIORITY = {"cpu": ("cpp", "numba", "torch"), "cuda": ("cuda", "triton", "torch")}


@dataclass(frozen=True)
class Call:
    """What the dispatcher needs to know about one fused update."""

    device: torch.device
    dtypes: tuple            # of the buffers, then out (then aux_out)
    K: int
    numel: int

    @property
    def device_type(self) -> str:
        return self.device.type

    @classmethod
    def of(cls, out, bufs, aux_out=None) -> Call:
        ts = [*bufs, out] + ([aux_out] if aux_out is not None else [])
        return cls(bufs[0].device, tuple(t.dtype for t in ts), len(bufs), bufs[0].numel())

    @classmethod
    def typical(cls, device=None, dtype=torch.float32, K=3, shape=(4, 4, 64, 64)) -> Call:
        """A typical solver step: 3 buffers (state, model output, history) of a 4x4x64x64
        latent batch, written to a state of the same dtype."""
        n = 1
        for s in shape:
            n *= s
        return cls(as_device(device), (dtype,) * (K + 1), K, n)


class LazyBackend:
    """A registry entry whose module (and its heavy package) is imported on first real use;
    availability is answered from ``importlib.util.find_spec`` without importing."""

    def __init__(self, name, module, requires, device_types, interpret_env=None):
        self.name, self._module_name, self.requires = name, module, requires
        self.device_types, self._interpret_env = device_types, interpret_env
        self._module = None

    def module(self):
        if self._module is None:
            self._module = importlib.import_module(self._module_name)
        return self._module

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        device_type = device_type or self.device_types[0]
        if importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} is not installed (pip install {self.requires})"
        return self.module().unavailable_reason(device_type)

    def reasons_unsupported(self, call: Call) -> list[str]:
        if importlib.util.find_spec(self.requires) is None:
            return [f"{self.requires} is not installed (pip install {self.requires})"]
        return self.module().reasons_unsupported(call)

    def __getattr__(self, attr):           # fused_update and the rest: the real module's
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.module(), attr)


REGISTRY = {
    "torch": torch_ref,
    "cpp": cpp,
    "cuda": cuda,
    "numba": LazyBackend("numba", "pyengine.backends.numba_backend", "numba", ("cpu",)),
    "triton": LazyBackend("triton", "pyengine.backends.triton_backend", "triton", ("cuda",)),
}


def resolve(be):
    """The module behind a registry entry (imports a lazy one)."""
    return be.module() if isinstance(be, LazyBackend) else be


def reasons(name: str, call: Call) -> list[str]:
    """Why backend ``name`` cannot run ``call`` ([] when it can)."""
    be = REGISTRY[name]
    if hasattr(be, "reasons_unsupported"):
        return list(be.reasons_unsupported(call))
    why = []
    if hasattr(be, "unavailable_reason"):
        r = be.unavailable_reason(call.device_type)
        if r is not None:
            why.append(r)
    elif call.device_type not in ("cpu", "cuda"):
        why.append(f"runs on cpu and cuda tensors, not {call.device_type}")
    elif call.device_type == "cuda" and not torch.cuda.is_available():
        why.append("no CUDA device (torch.cuda.is_available() is False)")
    bad = sorted({str(d).replace("torch.", "") for d in call.dtypes if d not in CONTRACT_DTYPES})
    if bad:
        why.append(f"unsupported dtype {', '.join(bad)}")
    limit = getattr(be, "max_buffers", K_MAX)
    if limit is not None and call.K > limit:
        why.append(f"reads at most {limit} buffers, got {call.K}")
    return why


def names() -> tuple[str, ...]:
    """Every registered backend's name."""
    return tuple(REGISTRY)


def priority(device_type: str) -> tuple[str, ...]:
    """The default order of the backends tried on ``device_type`` ("cpu", "cuda"), best
    first (a measured ranking, :func:`order`, may reorder them)."""
    return PRIORITY.get(device_type, ("torch",))


def unavailable_reason(name: str, device_type: str | None = None) -> str | None:
    be = REGISTRY[name]
    if not hasattr(be, "unavailable_reason"):
        return None                                  # the torch reference runs anywhere
    if device_type is None:
        device_type = (getattr(be, "device_types", None) or ("cpu",))[0]
    return be.unavailable_reason(device_type)


# ---------------------------------------------------------------------------------------
# the measured ranking (optional, explicit, cached per device name)
# ---------------------------------------------------------------------------------------


def device_name(device) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        try:
            return f"cuda:{torch.cuda.get_device_name(d)}"
        except (AssertionError, RuntimeError):      # a CPU build or no device
            return "cuda:unavailable"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu:" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return "cpu:" + (platform.processor() or platform.machine())


_DEFAULT_RANKING: list = []


def ranking_file() -> str:
    """$PYENGINE_RANKING_FILE, else ~/.cache/pyengine/ranking.json (home resolved once)."""
    path = os.environ.get("PYENGINE_RANKING_FILE")
    if path:
        return path
    if not _DEFAULT_RANKING:
        _DEFAULT_RANKING.append(os.path.join(os.path.expanduser("~"), ".cache", "pyengine",
                                             "ranking.json"))
    return _DEFAULT_RANKING[0]


_WARNED: set = set()


def _malformed(path: str, what: str) -> None:
    """Warn once per file and problem that a ranking entry is ignored."""
    if (path, what) not in _WARNED:
        _WARNED.add((path, what))
        warnings.warn(f"ignoring the backend ranking file {path}: {what} (delete it or rerun "
                      f"`PYENGINE_RANK=1 pyengine info`)", RuntimeWarning, stacklevel=3)


def _read_rankings() -> dict:
    """The ranking file's content: {device name: {"order": [...], ...}}; {} when it is
    missing, unreadable or not a JSON object (warning once for the last two)."""
    path = ranking_file()
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        if path != os.devnull:
            _malformed(path, f"not readable JSON ({exc})")
        return {}
    if not isinstance(data, dict):
        _malformed(path, f"a JSON {type(data).__name__}, expected an object of device names")
        return {}
    return data


def ranking_for(device) -> dict | None:
    """The cached measurement for ``device``'s name ({"order": [...], "seconds": {...}}), or
    None; a malformed entry (not an object, "order" not a list of names) is ignored with a
    warning naming the file."""
    key = device_name(device)
    data = _read_rankings()
    if key not in data:
        return None
    entry = data[key]
    if not isinstance(entry, dict) or not isinstance(entry.get("order"), list) or \
            not all(isinstance(n, str) for n in entry["order"]):
        _malformed(ranking_file(), f"the entry for {key!r} is not "
                                   f"{{\"order\": [backend names, ...]}}")
        return None
    return entry


_ORDER_CACHE: dict = {}


def order(device) -> tuple[str, ...]:
    """The candidate order for ``device``: its measured ranking if one is cached, else the
    default priority. Backends missing from a ranking follow it in priority order."""
    dt = torch.device(device).type
    prio = PRIORITY.get(dt, ("torch",))
    key = (dt, ranking_file())
    if key not in _ORDER_CACHE:
        ranked = (ranking_for(device) or {}).get("order", [])
        ranked = [n for n in ranked if n in prio]
        _ORDER_CACHE[key] = tuple(ranked + [n for n in prio if n not in ranked])
    return _ORDER_CACHE[key]


def rank(device="cpu", call: Call | None = None, reps: int = 20) -> list[tuple[str, float]]:
    """Time every backend that can run a typical call on ``device`` (median of ``reps``), store
    the fastest-first order for this device name, and return [(name, seconds)]."""
    call = call or Call.typical(device)
    dev = torch.device(device)
    shape = (4, call.numel // 4)
    g = torch.Generator().manual_seed(0)
    bufs = [torch.randn(shape, generator=g).to(dev, call.dtypes[0]) for _ in range(call.K)]
    out = torch.empty_like(bufs[0])
    seeds = torch.arange(shape[0], dtype=torch.int64, device=dev)
    coef = [0.5] * call.K
    import numpy as np
    coef = np.asarray(coef, np.float64)
    times = []
    for name in PRIORITY.get(dev.type, ("torch",)):
        if reasons(name, call):
            continue
        be = resolve(REGISTRY[name])
        ts = []
        for i in range(reps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t = time.perf_counter()
            be.fused_update(out, bufs, coef, 0.3, seeds, i)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            ts.append(time.perf_counter() - t)
        times.append((name, sorted(ts[2:])[len(ts[2:]) // 2]))
    times.sort(key=lambda nt: nt[1])
    data = _read_rankings()
    data[device_name(dev)] = {"order": [n for n, _ in times],
                              "seconds": {n: t for n, t in times}}
    path = ranking_file()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    _ORDER_CACHE.clear()
    _GET_CACHE.clear()
    return times


# ---------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------


def select(call: Call, name: str | None = None):
    """The backend module to run ``call``: ``name``, else $PYENGINE_BACKEND, else the first in
    :func:`order` that can run it. ValueError with every backend's reasons when none can."""
    name = name or os.environ.get("PYENGINE_BACKEND") or None
    if name:
        if name not in REGISTRY:
            raise ValueError(f"backend must be one of {sorted(REGISTRY)}, got {name!r}")
        why = reasons(name, call)
        if why:
            raise ValueError(f"backend {name!r} cannot run: {'; '.join(why)} (call: "
                             f"{_describe(call)})")
        return resolve(REGISTRY[name])
    for cand in order(call.device):
        if not reasons(cand, call):
            return resolve(REGISTRY[cand])
    lines = [f"  {n}: {'; '.join(reasons(n, call)) or 'not in the priority for this device'}"
             for n in REGISTRY]
    raise ValueError(f"no backend can run this call ({_describe(call)}):\n" + "\n".join(lines))


def _describe(call: Call) -> str:
    dts = ", ".join(sorted({str(d).replace("torch.", "") for d in call.dtypes}))
    return f"{call.device}, {dts}, K={call.K}, {call.numel} elements"


#: get()'s answers for a typical call: (name, ranking file, device, dtype) -> module (what
#: decides them -- installed packages, the device type, the ranking -- is fixed per process
#: unless rank() stores a new ranking, which clears this)
_GET_CACHE: dict = {}


def get(name: str | None = None, device=None, *, dtype=None, call: Call | None = None):
    """The backend for ``device`` (default cpu) and ``dtype`` (default float32), or for a
    concrete ``call``; see :func:`select`."""
    name = name or os.environ.get("PYENGINE_BACKEND") or None
    if call is None:
        key = (name, ranking_file(), str(device), dtype)
        hit = _GET_CACHE.get(key)
        # a cached answer stands while its backend can still run (an extension can be
        # unloaded, a test can take it away)
        if hit is not None and hit[1] is not None and hit[1](hit[2]) is not None:
            hit = None
        if hit is None:
            if device is None and name in REGISTRY:     # a forced backend, on its own device
                device = (getattr(REGISTRY[name], "device_types", None) or ("cpu",))[0]
            be = select(Call.typical(device, dtype or torch.float32), name)
            hit = _GET_CACHE[key] = (be, getattr(be, "unavailable_reason", None),
                                     torch.device(device if device is not None else "cpu").type)
        return hit[0]
    return select(call, name)


def available() -> list[str]:
    """The backends that can run here, on some device."""
    return [n for n in REGISTRY if unavailable_reason(n) is None]


def explain(device=None, dtype=None) -> dict[str, str | None]:
    """name -> None (can run a typical ``dtype`` call on ``device``, default cpu) or why not."""
    call = Call.typical(device, dtype or torch.float32)
    return {n: ("; ".join(w) if (w := reasons(n, call)) else None) for n in REGISTRY}


def fused_update(out, bufs, coef, noise_coef=0.0, seeds=None, step=-1, aux_out=None,
                 aux_coef=None, *, noise=None, compute_dtype=None, mask=None, mask_coef=None,
                 backend=None):
    """The contract through the backend :func:`select` picks for this concrete call."""
    if not isinstance(bufs, (list, tuple)) or not bufs or \
            not all(isinstance(b, torch.Tensor) for b in bufs) or not isinstance(out, torch.Tensor):
        # the validator names the argument (out, bufs, bufs[i])
        validate(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise=noise,
                 compute_dtype=compute_dtype, mask=mask, mask_coef=mask_coef)
        raise ValueError("fused_update takes an output tensor and a non-empty list of tensors")
    try:
        be = select(Call.of(out, bufs, aux_out), backend)
    except ValueError:
        if backend is None or backend in REGISTRY:
            # no backend can run it: say which argument is at fault where one is
            validate(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef, noise=noise,
                     compute_dtype=compute_dtype, mask=mask, mask_coef=mask_coef)
        raise
    return be.fused_update(out, bufs, coef, noise_coef, seeds, step, aux_out, aux_coef,
                           noise=noise, compute_dtype=compute_dtype, mask=mask,
                           mask_coef=mask_coef)
