"""diffusers' own scheduler tests, run on pyengine's drop-in (issue 11, item 4).

diffusers' ``tests/schedulers/`` are not in the PyPI package. Point
``PYENGINE_DIFFUSERS_TESTS`` at a folder holding them (the repository root of a diffusers
checkout, or any folder with its ``tests/__init__.py``, ``tests/testing_utils.py``,
``tests/others/`` and ``tests/schedulers/``); without it every test here skips.

Each supported class's test module runs in a subprocess (diffusers' tests are a package named
``tests``, as the project's are) with the class replaced, in every module of that package, by
``pyengine.integrations.diffusers.fused_class(cls)``: a class whose constructor,
``from_config`` and ``from_pretrained`` return the drop-in (:class:`FusedScheduler`) wrapping
an instance of ``cls`` built from the same arguments. The identity checks of diffusers' tests
(``scheduler_class == EDMEulerScheduler``) therefore see the drop-in class where they saw the
original.

Per class, the run's outcomes are compared with :data:`EXPECTED_FAILURES` (each with its
reason: diffusers returns NaN there, the test reads private internals, ...): any other
failure fails the test. ``python tests/test_diffusers_conformance.py --table`` prints the
per-class table of docs/diffusers_conformance.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

#: diffusers' test module of each class the drop-in supports (FlowMatchEuler / FlowMatchHeun
#: have no module among diffusers' scheduler tests).
MODULES = {
    "DDIMScheduler": "test_scheduler_ddim",
    "DDPMScheduler": "test_scheduler_ddpm",
    "EulerDiscreteScheduler": "test_scheduler_euler",
    "EulerAncestralDiscreteScheduler": "test_scheduler_euler_ancestral",
    "HeunDiscreteScheduler": "test_scheduler_heun",
    "DPMSolverMultistepScheduler": "test_scheduler_dpm_multi",
    "DPMSolverSinglestepScheduler": "test_scheduler_dpm_single",
    "UniPCMultistepScheduler": "test_scheduler_unipc",
    "EDMEulerScheduler": "test_scheduler_edm_euler",
    "EDMDPMSolverMultistepScheduler": "test_scheduler_edm_dpmsolver_multistep",
    "LCMScheduler": "test_scheduler_lcm",
    "TCDScheduler": "test_scheduler_tcd",
    "PNDMScheduler": "test_scheduler_pndm",
    "LMSDiscreteScheduler": "test_scheduler_lms",
    "KDPM2DiscreteScheduler": "test_scheduler_kdpm2_discrete",
    "KDPM2AncestralDiscreteScheduler": "test_scheduler_kdpm2_ancestral",
    "DEISMultistepScheduler": "test_scheduler_deis",
    "DPMSolverSDEScheduler": "test_scheduler_dpm_sde",
}

_NAN_BETAS = ("nan", "beta_end=2 makes betas > 1 and alpha_bar < 0 at the visited timesteps: "
              "diffusers' own full loop is nan from the first step (its test steps only at "
              "t = 0); the drop-in refuses the schedule at set_timesteps")
_EDM_ZERO_STEP = ("nan", "the test's configuration loop reaches final_sigmas_type='sigma_min' "
                  "with the order-2 heun update, whose last step has length 0: diffusers "
                  "divides by h = 0 there (nan); the drop-in refuses that grid at "
                  "set_timesteps")
#: Tests that pass with their steps run by the wrapped class, each with the reason (counted
#: in their own column of the table): {class: {"TestClass::test": reason}}. PNDM's tests
#: write the multistep history (``scheduler.ets = four dummy past residuals``) and call step_prk /
#: step_plms with it at timesteps outside a run; writing ``ets`` hands the run to the wrapped
#: scheduler (``FusedScheduler.ets``), as the drop-in's own history is its plan's buffers,
#: filled by its model calls. The full-loop tests run the drop-in's own steps.
_PNDM_ETS = ("the test writes PNDMScheduler's multistep history (ets) and steps with it at "
             "timesteps outside a run: the drop-in hands those steps to the wrapped class")
HANDED_OVER: dict[str, dict[str, str]] = {
    "PNDMScheduler": {"PNDMSchedulerTest::" + t: _PNDM_ETS for t in (
        "test_betas", "test_inference_steps", "test_prediction_type", "test_schedules",
        "test_step_shape", "test_steps_offset", "test_time_indices", "test_timesteps")},
}

#: Tests that fail on the drop-in, each with its category and reason:
#: {class: {test name: (category, reason)}}. Categories: "nan" (diffusers itself returns
#: nan there), "refused" (a configuration pyengine refuses with a reason), "float32" (a
#: hard-coded expected value missed at float32 rounding), "private" (the test writes or reads
#: the wrapped scheduler's private internals).
EXPECTED_FAILURES: dict[str, dict[str, tuple]] = {
    "DDIMScheduler": {"test_betas": _NAN_BETAS},
    "LCMScheduler": {"test_betas": _NAN_BETAS},
    "TCDScheduler": {"test_betas": _NAN_BETAS},
    "EDMDPMSolverMultistepScheduler": {"test_thresholding": _EDM_ZERO_STEP},
}


def _root() -> str | None:
    path = os.environ.get("PYENGINE_DIFFUSERS_TESTS")
    if not path:
        return None
    path = os.path.abspath(path)
    for cand in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.isfile(os.path.join(cand, "tests", "schedulers", "test_schedulers.py")):
            return cand
    return None


def run_class(root: str, name: str) -> dict:
    """Run diffusers' test module of ``name`` on the drop-in in a subprocess; returns
    {"outcomes": {test: (outcome, message)}} or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ)
        env.setdefault("PYENGINE_RANKING_FILE", os.devnull)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", root, name,
                               out], cwd=root, env=env, capture_output=True, text=True,
                              timeout=1800)
        if not os.path.exists(out):
            return {"error": (proc.stdout + proc.stderr)[-4000:]}
        with open(out) as f:
            return json.load(f)


def _patch(name: str, module: str):
    """In the subprocess: import diffusers' tests, put the drop-in class in place of ``name``
    in every module of the ``tests`` package and in the test classes' ``scheduler_classes``."""
    import importlib

    import diffusers

    from pyengine.integrations.diffusers import fused_class
    orig = getattr(diffusers, name)
    fused = fused_class(orig)
    importlib.import_module(f"tests.schedulers.{module}")
    for mod_name, mod in list(sys.modules.items()):
        if not (mod_name == "tests" or mod_name.startswith("tests.")) or mod is None:
            continue
        if getattr(mod, name, None) is orig:
            setattr(mod, name, fused)
        for obj in list(vars(mod).values()):
            classes = getattr(obj, "scheduler_classes", None) if isinstance(obj, type) else None
            if classes and "scheduler_classes" in vars(obj):
                obj.scheduler_classes = tuple(fused if c is orig else c for c in classes)


def _main_run(root: str, name: str, out: str) -> int:
    sys.path.insert(0, root)
    import torch
    torch.set_num_threads(1)
    module = MODULES[name]
    _patch(name, module)

    import pytest as _pytest

    class Collect:
        def __init__(self):
            self.outcomes = {}

        def pytest_runtest_logreport(self, report):
            key = report.nodeid.split("::", 1)[1]
            if report.when == "call" or report.outcome != "passed":
                if report.skipped:
                    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
                    self.outcomes[key] = ("skipped", str(reason))
                elif report.failed:
                    msg = str(report.longrepr).strip().splitlines()
                    self.outcomes[key] = ("failed", "\n".join(msg[-25:]))
                else:
                    self.outcomes.setdefault(key, ("passed", ""))

    collect = Collect()
    path = os.path.join(root, "tests", "schedulers", module + ".py")
    _pytest.main([path, "-q", "-p", "no:cacheprovider", "-W", "ignore", "--rootdir", root,
                  "--tb=short", "-x" if os.environ.get("PYENGINE_CONFORMANCE_X") else "-q"],
                 plugins=[collect])
    with open(out, "w") as f:
        json.dump({"outcomes": collect.outcomes}, f)
    return 0


def _summary(name: str, res: dict) -> dict:
    oc = res.get("outcomes", {})
    expected = EXPECTED_FAILURES.get(name, {})
    handed = HANDED_OVER.get(name, {})
    s = {"run": len(oc), "passed": 0, "failed": [], "expected": [], "skipped": [],
         "handed": []}
    for test, (outcome, msg) in sorted(oc.items()):
        short = test.split("::")[-1]
        if outcome == "passed" and test in handed:
            s["handed"].append((short, handed[test]))
        elif outcome == "passed":
            s["passed"] += 1
        elif outcome == "skipped":
            s["skipped"].append((short, msg))
        elif short in expected:
            s["expected"].append((short, "%s: %s" % expected[short]))
        else:
            s["failed"].append((short, msg))
    return s


ROOT = _root()


@pytest.mark.skipif(ROOT is None, reason="diffusers' tests/schedulers not located: set "
                    "PYENGINE_DIFFUSERS_TESTS to a diffusers checkout (they are not in the "
                    "PyPI package)")
@pytest.mark.parametrize("name", sorted(MODULES))
def test_diffusers_scheduler_tests_on_drop_in(name):
    pytest.importorskip("diffusers")
    res = run_class(ROOT, name)
    assert "error" not in res, res.get("error")
    s = _summary(name, res)
    assert s["run"] > 0, f"no test of {MODULES[name]} ran"
    assert not s["failed"], "\n\n".join(f"{t}:\n{m}" for t, m in s["failed"])


def _table() -> int:
    root = ROOT
    if root is None:
        print("set PYENGINE_DIFFUSERS_TESTS", file=sys.stderr)
        return 2
    names = sys.argv[2:] or sorted(MODULES)
    print("| class | diffusers test module | run | pass | pass, steps by the wrapped class "
          "| fail (unexpected) | nan in diffusers | refused | float32 | private internals "
          "| skipped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    details = []
    for name in names:
        res = run_class(root, name)
        if "error" in res:
            print(f"| {name} | {MODULES[name]} | error | | | | | | | | |")
            details.append((name, "error", res["error"][-1500:]))
            continue
        s = _summary(name, res)
        cats = [m.split(":", 1)[0] for _, m in s["expected"]]
        print(f"| {name} | {MODULES[name]} | {s['run']} | {s['passed']} | {len(s['handed'])} "
              f"| {len(s['failed'])} "
              + "".join(f"| {cats.count(c)} " for c in ("nan", "refused", "float32", "private"))
              + f"| {len(s['skipped'])} |", flush=True)
        for kind in ("failed", "expected", "handed", "skipped"):
            for t, m in s[kind]:
                details.append((name, f"{kind} {t}", m))
    for name, what, msg in details:
        print(f"\n### {name}: {what}\n{msg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--run":
        sys.exit(_main_run(sys.argv[2], sys.argv[3], sys.argv[4]))
    if len(sys.argv) >= 2 and sys.argv[1] == "--table":
        sys.exit(_table())
    print(__doc__)
