"""The tuned-plan file: a plan's float64 tables and where they came from, in a small JSON file.

    save_plan(plan, "digits-nfe5.json", provenance={"process": process,
                                                    "prediction": "sample", ...})
    f = load_plan("digits-nfe5.json")          # f.plan (a pyengine Plan), f.provenance (dict)
    sampler = pe.Sampler.from_tuned(f, process)

The file holds every op of the plan with every field: ``Eval`` (src, dst, sigma, t, s, step,
guidance) and ``Update`` (dst, bufs, coefs, noise, noise_index, aux_dst, aux_coefs, step,
kind, sigma, scale, mask_coefs), the grid, and the provenance (the process described by
:func:`describe_process`, the prediction kind, and whatever the tuner records: NFE, base
solver, model fingerprint, teacher, losses, seed, date). Numbers are written as Python's
shortest round-trip repr, so every float64 reads back bit for bit (``-0.0`` included);
non-finite values, which standard JSON has no literal for, are the strings ``"inf"``,
``"-inf"`` and ``"nan"``. Plans with custom ops are refused on save: a custom op's numbers
depend on the data and it has no table to write.

Loading validates the structure (types, lengths, K <= K_MAX, draw numbers, that every buffer
is written before it is read) and refuses a malformed file with a ValueError naming the path
and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..plan import K_MAX, Custom, Eval, Plan, Update

__all__ = ["FORMAT", "VERSION", "TunedPlanFile", "describe_process", "load_plan",
           "model_fingerprint", "plan_from_dict", "plan_to_dict", "plans_equal",
           "process_mismatch", "save_plan"]

#: the file's format tag and version (a reader refuses other versions)
FORMAT = "pyengine.tuned_plan"
VERSION = 1

_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@dataclass
class TunedPlanFile:
    """A loaded tuned plan: ``plan`` (a :class:`pyengine.plan.Plan`), ``provenance`` (dict),
    ``path`` (where it was read from, or None) and the file's format ``version``."""

    plan: Plan
    provenance: dict = field(default_factory=dict)
    path: str | None = None
    version: int = VERSION

    @property
    def prediction(self) -> str:
        return self.provenance["prediction"]

    @property
    def process(self) -> dict:
        """The canonical description of the process the plan was tuned for."""
        return self.provenance["process"]


# ---------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------


def _num(v) -> float | str:
    """A float for JSON: itself when finite, else "inf" / "-inf" / "nan"."""
    f = float(v)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")


def _jsonable(v):
    """Provenance values as JSON: numpy and torch scalars and arrays to numbers and lists,
    non-finite floats to strings, tuples to lists; anything else must already be JSON."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _num(v)
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if v is None or isinstance(v, str):
        return v
    if hasattr(v, "detach") and hasattr(v, "tolist"):          # a torch tensor
        return _jsonable(v.detach().cpu().tolist())
    from ..processes import Process
    if isinstance(v, Process):
        return describe_process(v)
    raise TypeError(f"provenance value {v!r} ({type(v).__name__}) is not JSON data")


# ---------------------------------------------------------------------------------------
# the process: a canonical description and the mismatch check
# ---------------------------------------------------------------------------------------


def describe_process(process) -> dict:
    """The canonical description of a process: its class and the parameters that define it.

    ============== ==========================================================================
    VPDiscrete     beta_schedule, num_train_timesteps, betas (first, middle, last, sum)
    VPContinuous   beta_min, beta_max, t_min (SubVP likewise, its own class)
    VE             sigma_min, sigma_max
    EDM            sigma_min, sigma_max, sigma_data
    RectifiedFlow  shift, time_scale, t_min, t_max
    other          every int, float, str and bool attribute of the instance
    ============== ==========================================================================

    A user's subclass of a built-in process adds its own scalar attributes to its base's.

    :func:`process_mismatch` compares a description with a process."""
    from .. import processes as P

    if not isinstance(process, P.Process):
        raise TypeError(f"process must be a pyengine process (pe.processes.*), got "
                        f"{type(process).__name__}")
    d: dict = {"class": type(process).__name__, "name": getattr(process, "name", None)}
    if isinstance(process, P.VPDiscrete):
        b = process.betas
        d.update(beta_schedule=process.beta_schedule,
                 num_train_timesteps=int(process.num_train_timesteps),
                 betas=[float(b[0]), float(b[b.size // 2]), float(b[-1]), float(b.sum())])
    elif isinstance(process, P.VPContinuous):
        d.update(beta_min=process.beta_min, beta_max=process.beta_max, t_min=process.t_min)
    elif isinstance(process, P.EDM):
        d.update(sigma_min=process.sigma_min, sigma_max=process.sigma_max,
                 sigma_data=process.sigma_data)
    elif isinstance(process, P.VE):
        d.update(sigma_min=process.sigma_min, sigma_max=process.sigma_max)
    elif isinstance(process, P.RectifiedFlow):
        d.update(shift=process.shift, time_scale=process.time_scale, t_min=process.t_min,
                 t_max=process.t_max)
    builtin = (P.VPDiscrete, P.VPContinuous, P.SubVP, P.VE, P.EDM, P.RectifiedFlow)
    if type(process) not in builtin:
        # a user's process (or a user's subclass of a built-in one): its own scalars too
        for k, v in sorted(vars(process).items()):
            if not k.startswith("_") and k not in d and isinstance(v, (bool, int, float, str)):
                d[k] = v
    return _jsonable(d)


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        # relative 1e-9: the table digests of a VP process may differ in the last bits
        # between platforms (libm), parameters given by the user are exact
        return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b


def process_mismatch(description: dict, process) -> str | None:
    """None when ``process`` is the process ``description`` (from :func:`describe_process`)
    describes, else a sentence saying which fields differ (the plan's value, then the given
    one)."""
    given = describe_process(process)
    if not isinstance(description, dict) or "class" not in description:
        return f"the plan's process description {description!r} has no class"
    if description["class"] != given["class"]:
        return (f"the plan was tuned for the process {description['class']}, the given "
                f"process is {given['class']} ({process!r})")
    diffs = [f"{k} {description.get(k)!r} (plan) vs {given.get(k)!r} (given)"
             for k in sorted(set(description) | set(given))
             if not _same(description.get(k), given.get(k))]
    if diffs:
        return (f"the plan's {description['class']} process differs from the given "
                f"{process!r}: " + "; ".join(diffs))
    return None


# ---------------------------------------------------------------------------------------
# the model fingerprint
# ---------------------------------------------------------------------------------------


def model_fingerprint(model) -> str | None:
    """"sha256:<hex>" of a torch module's state (every parameter and buffer: name, dtype,
    shape and bytes, in name order), or None for a model that is not a torch module (a plain
    function has no state to fingerprint). A wrapper with a ``fingerprint`` attribute (a
    string) gives it instead."""
    fp = getattr(model, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return None
    import torch
    h = hashlib.sha256()
    for name, t in sorted(state().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------
# plan <-> dict
# ---------------------------------------------------------------------------------------


def _nums(a):
    return None if a is None else [_num(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def plan_to_dict(plan: Plan) -> dict:
    """The plan as JSON data (every op, every field). Raises ValueError for custom ops."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a pyengine.plan.Plan, got {type(plan).__name__}")
    ops = []
    for i, op in enumerate(plan.ops):
        if isinstance(op, Custom):
            raise ValueError(f"plan {plan.solver!r} op {i} is a custom op "
                             f"({type(op).__name__}): its numbers depend on the data, so it has "
                             f"no table a file could hold; only plans of Eval and Update ops "
                             f"are saved")
        if isinstance(op, Eval):
            ops.append({"op": "eval", "src": op.src, "dst": op.dst, "sigma": _num(op.sigma),
                        "t": _num(op.t), "s": _num(op.s), "step": int(op.step),
                        "guidance": None if op.guidance is None else _num(op.guidance)})
        elif isinstance(op, Update):
            ops.append({"op": "update", "dst": op.dst, "bufs": list(op.bufs),
                        "coefs": _nums(op.coefs), "noise": _num(op.noise),
                        "noise_index": int(op.noise_index), "aux_dst": op.aux_dst,
                        "aux_coefs": _nums(op.aux_coefs), "step": int(op.step),
                        "kind": op.kind, "sigma": _num(op.sigma), "scale": _num(op.scale),
                        "mask_coefs": _nums(op.mask_coefs)})
        else:
            raise ValueError(f"plan {plan.solver!r} op {i} is a {type(op).__name__}, neither "
                             f"Eval nor Update")
    return {"solver": plan.solver, "sigmas": _nums(plan.sigmas), "n_noise": int(plan.n_noise),
            "output": plan.output,
            "guidance_scale": None if plan.guidance_scale is None else _num(plan.guidance_scale),
            "ops": ops}


class _Reader:
    """Typed field access with errors naming the file and the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, what: str):
        raise ValueError(f"{self.where}: field {name!r}: {what}")

    def get(self, d: dict, key: str, name: str):
        if not isinstance(d, dict):
            self.fail(name, f"expected an object, got {type(d).__name__}")
        if key not in d:
            self.fail(f"{name}.{key}" if name else key, "missing")
        return d[key]

    def num(self, v, name: str) -> float:
        if isinstance(v, str) and v in _NONFINITE:
            return _NONFINITE[v]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(name, f"expected a number (or \"inf\", \"-inf\", \"nan\"), got {v!r}")
        return float(v)

    def finite(self, v, name: str) -> float:
        f = self.num(v, name)
        if not math.isfinite(f):
            self.fail(name, f"expected a finite number, got {v!r}")
        return f

    def int(self, v, name: str, lo: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(name, f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            self.fail(name, f"expected an integer >= {lo}, got {v}")
        return v

    def str(self, v, name: str, optional: bool = False):
        if optional and v is None:
            return None
        if not isinstance(v, str) or not v:
            self.fail(name, f"expected a non-empty string, got {v!r}")
        return v

    def array(self, v, name: str, n: int | None = None, optional: bool = False,
              finite: bool = True):
        if optional and v is None:
            return None
        if not isinstance(v, list):
            self.fail(name, f"expected a list of numbers, got {type(v).__name__}")
        if n is not None and len(v) != n:
            self.fail(name, f"expected {n} numbers (one per buffer), got {len(v)}")
        conv = self.finite if finite else self.num
        return np.array([conv(x, f"{name}[{j}]") for j, x in enumerate(v)], dtype=np.float64)


def plan_from_dict(d: dict, where: str = "plan") -> Plan:
    """The :class:`Plan` of :func:`plan_to_dict`'s data, validated (ValueError naming
    ``where`` and the field)."""
    r = _Reader(where)
    p = "plan"
    solver = r.str(r.get(d, "solver", p), "plan.solver")
    sig_raw = r.get(d, "sigmas", p)
    sigmas = r.array(sig_raw, "plan.sigmas", finite=False)
    if sigmas.size < 2 or np.isnan(sigmas).any() or (sigmas < 0).any():
        r.fail("plan.sigmas", "expected at least 2 noise levels, none negative or nan")
    diff = np.diff(sigmas)
    if not ((diff < 0).all() or (diff > 0).all()):
        r.fail("plan.sigmas", "expected a strictly monotone grid")
    n_noise = r.int(r.get(d, "n_noise", p), "plan.n_noise", lo=0)
    output = r.str(r.get(d, "output", p), "plan.output")
    gs = r.get(d, "guidance_scale", p)
    gs = None if gs is None else r.finite(gs, "plan.guidance_scale")
    raw_ops = r.get(d, "ops", p)
    if not isinstance(raw_ops, list) or not raw_ops:
        r.fail("plan.ops", "expected a non-empty list of ops")
    written = {"x"}
    ops = []
    draws = set()
    for i, o in enumerate(raw_ops):
        n = f"plan.ops[{i}]"
        kind = r.get(o, "op", n)
        if kind == "eval":
            g = r.get(o, "guidance", n)
            op = Eval(src=r.str(r.get(o, "src", n), n + ".src"),
                      dst=r.str(r.get(o, "dst", n), n + ".dst"),
                      sigma=r.num(r.get(o, "sigma", n), n + ".sigma"),
                      t=r.finite(r.get(o, "t", n), n + ".t"),
                      s=r.finite(r.get(o, "s", n), n + ".s"),
                      step=r.int(r.get(o, "step", n), n + ".step", lo=0),
                      guidance=None if g is None else r.finite(g, n + ".guidance"))
            if not op.sigma >= 0:
                r.fail(n + ".sigma", f"expected a noise level >= 0, got {op.sigma!r}")
            reads = [op.src]
            writes = [op.dst] if op.guidance is None else [op.dst + "/u", op.dst + "/c"]
        elif kind == "update":
            bufs = r.get(o, "bufs", n)
            if not isinstance(bufs, list) or not 1 <= len(bufs) <= K_MAX:
                r.fail(n + ".bufs", f"expected a list of 1 to K_MAX={K_MAX} buffer names, "
                                    f"got {bufs!r}")
            for j, b in enumerate(bufs):
                r.str(b, f"{n}.bufs[{j}]")
            if len(set(bufs)) != len(bufs):
                r.fail(n + ".bufs", f"a buffer is read twice: {bufs!r}")
            K = len(bufs)
            aux_dst = r.str(r.get(o, "aux_dst", n), n + ".aux_dst", optional=True)
            aux = r.array(r.get(o, "aux_coefs", n), n + ".aux_coefs", K, optional=True)
            if (aux_dst is None) != (aux is None):
                r.fail(n + ".aux_coefs", "aux_dst and aux_coefs are given together or not at "
                                         "all")
            op = Update(dst=r.str(r.get(o, "dst", n), n + ".dst"), bufs=list(bufs),
                        coefs=r.array(r.get(o, "coefs", n), n + ".coefs", K),
                        noise=r.finite(r.get(o, "noise", n), n + ".noise"),
                        noise_index=r.int(r.get(o, "noise_index", n), n + ".noise_index",
                                          lo=-1),
                        aux_dst=aux_dst, aux_coefs=aux,
                        step=r.int(r.get(o, "step", n), n + ".step", lo=0),
                        kind=r.str(r.get(o, "kind", n), n + ".kind"),
                        sigma=r.num(r.get(o, "sigma", n), n + ".sigma"),
                        scale=r.num(r.get(o, "scale", n), n + ".scale"),
                        mask_coefs=r.array(r.get(o, "mask_coefs", n), n + ".mask_coefs", K,
                                           optional=True))
            if op.aux_dst is not None and op.aux_dst == op.dst:
                r.fail(n + ".aux_dst", "the aux output aliases the main output")
            if op.noise_index >= n_noise:
                r.fail(n + ".noise_index", f"draw number {op.noise_index} is not below "
                                           f"plan.n_noise={n_noise}")
            if op.noise_index >= 0:
                if op.noise_index in draws:
                    r.fail(n + ".noise_index", f"draw number {op.noise_index} is used twice")
                draws.add(op.noise_index)
            reads = list(op.bufs)
            writes = [op.dst] + ([op.aux_dst] if op.aux_dst is not None else [])
        else:
            r.fail(n + ".op", f"expected \"eval\" or \"update\", got {kind!r}")
        for b in reads:
            if b not in written and not b.startswith("inpaint/"):
                r.fail(n, f"reads buffer {b!r} before any op writes it")
        written.update(writes)
        ops.append(op)
    if output not in written:
        r.fail("plan.output", f"buffer {output!r} is never written")
    steps = [op.step for op in ops]
    if steps != sorted(steps):
        r.fail("plan.ops", "the ops' step numbers must not decrease")
    if steps[-1] >= sigmas.size - 1:
        r.fail("plan.ops", f"step {steps[-1]} is past the grid's {sigmas.size - 1} steps")
    return Plan(solver=solver, sigmas=sigmas, ops=ops, n_noise=n_noise, output=output,
                guidance_scale=gs)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------


def save_plan(plan: Plan, path, *, provenance: dict) -> Path:
    """Write ``plan`` and its ``provenance`` to the JSON file ``path`` (atomically: a
    temporary file renamed). ``provenance`` must hold ``process`` (a pyengine process, or its
    :func:`describe_process` dict) and ``prediction``; ``nfe``, when given, must be the plan's.
    Everything else in it (base solver, model fingerprint, teacher, losses, seed, ...) is
    written as given (JSON data, numpy / torch values converted). Returns the path."""
    from ..output import atomic_write
    from ..parameterization import check_prediction

    if not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
    for key in ("process", "prediction"):
        if key not in provenance:
            raise ValueError(f"provenance needs {key!r} (what load_plan checks a plan against)")
    prov = dict(provenance)
    proc = prov["process"]
    if not isinstance(proc, dict):
        prov["process"] = describe_process(proc)
    elif "class" not in proc:
        raise ValueError(f"provenance['process'] must be a process or the dict of "
                         f"describe_process(process), got {proc!r}")
    prov["prediction"] = check_prediction(prov["prediction"])
    if prov.get("nfe") is not None and int(prov["nfe"]) != plan.nfe:
        raise ValueError(f"provenance nfe={prov['nfe']} disagrees with the plan's "
                         f"{plan.nfe} model evaluations")
    prov.setdefault("nfe", plan.nfe)
    body = {"format": FORMAT, "version": VERSION, "plan": plan_to_dict(plan),
            "provenance": _jsonable(prov)}
    text = json.dumps(body, indent=1, allow_nan=False) + "\n"
    plan_from_dict(json.loads(text)["plan"], f"plan {plan.solver!r}")   # what load will read
    path = Path(os.fspath(path)).expanduser()
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def load_plan(path) -> TunedPlanFile:
    """Read a tuned-plan file (see the module docstring). Raises FileNotFoundError when it is
    missing and ValueError naming the path and the field when it is malformed."""
    try:
        p = Path(os.fspath(path)).expanduser()
    except TypeError:
        raise TypeError(f"load_plan: path must be a file path (str or os.PathLike), got "
                        f"{path!r}") from None
    where = str(path)
    if p.is_dir():
        raise IsADirectoryError(f"tuned plan file {where!r} is a directory")
    if not p.is_file():
        raise FileNotFoundError(f"tuned plan file {where!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not a tuned plan file (not UTF-8 text: {e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a tuned plan file (invalid JSON: {e})") from None
    r = _Reader(where)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a tuned plan file (a JSON {type(data).__name__}, not "
                         f"an object)")
    if data.get("format") != FORMAT:
        r.fail("format", f"expected {FORMAT!r}, got {data.get('format')!r} (not a tuned plan "
                         f"file)")
    version = r.int(r.get(data, "version", ""), "version")
    if version != VERSION:
        r.fail("version", f"this pyengine reads version {VERSION}, the file is version "
                          f"{version}")
    prov = r.get(data, "provenance", "")
    if not isinstance(prov, dict):
        r.fail("provenance", f"expected an object, got {type(prov).__name__}")
    proc = r.get(prov, "process", "provenance")
    if not isinstance(proc, dict) or not isinstance(proc.get("class"), str):
        r.fail("provenance.process", f"expected a process description with a class, got "
                                     f"{proc!r}")
    from ..parameterization import check_prediction
    pred = r.get(prov, "prediction", "provenance")
    try:
        check_prediction(pred)
    except (ValueError, TypeError) as e:
        r.fail("provenance.prediction", str(e))
    if "init_noise_scale" in prov and prov["init_noise_scale"] is not None:
        v = r.finite(prov["init_noise_scale"], "provenance.init_noise_scale")
        if v <= 0:
            r.fail("provenance.init_noise_scale", f"expected a positive number, got {v}")
    plan = plan_from_dict(r.get(data, "plan", ""), where)
    if prov.get("nfe") is not None and prov["nfe"] != plan.nfe:
        r.fail("provenance.nfe", f"{prov['nfe']!r} disagrees with the plan's {plan.nfe} model "
                                 f"evaluations")
    return TunedPlanFile(plan=plan, provenance=prov, path=where, version=version)


def plans_equal(a: Plan, b: Plan) -> bool:
    """Whether two plans are the same op for op, every number bitwise (nan equal to nan)."""
    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        xa = np.asarray(x, dtype=np.float64).reshape(-1)
        ya = np.asarray(y, dtype=np.float64).reshape(-1)
        if xa.shape != ya.shape:
            return False
        return bool(((xa.view(np.int64) == ya.view(np.int64))
                     | (np.isnan(xa) & np.isnan(ya))).all())

    if (a.solver, a.n_noise, a.output, len(a.ops)) != (b.solver, b.n_noise, b.output, len(b.ops)):
        return False
    if not same(a.sigmas, b.sigmas) or not same(a.guidance_scale, b.guidance_scale):
        return False
    for x, y in zip(a.ops, b.ops):
        if type(x) is not type(y):
            return False
        if isinstance(x, Eval):
            if (x.src, x.dst, x.step) != (y.src, y.dst, y.step) or \
                    not all(same(getattr(x, f), getattr(y, f))
                            for f in ("sigma", "t", "s", "guidance")):
                return False
        elif isinstance(x, Update):
            if (x.dst, list(x.bufs), x.noise_index, x.aux_dst, x.step, x.kind) != \
                    (y.dst, list(y.bufs), y.noise_index, y.aux_dst, y.step, y.kind):
                return False
            if not all(same(getattr(x, f), getattr(y, f)) for f in
                       ("coefs", "noise", "aux_coefs", "sigma", "scale", "mask_coefs")):
                return False
        elif x is not y:
            return False
    return True
