"""The command line: exit codes and output, in process (main(argv)) and as `python -m pyengine`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pyengine as pe
from pyengine import cli

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0, err
    assert f"pyengine {pe.__version__}" in out
    assert "backends available: " + ", ".join(pe.backends.available()) in out
    assert f"default backend: {pe.backends.get().name} " in out
    for info in pe.list_solvers():
        assert f"\n{info.name} " in out


def test_info_reports_a_bad_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("PYENGINE_BACKEND", "no_such_backend")
    code, out, _ = run(capsys, "info")
    assert code == 1
    assert "default backend: error" in out and "no_such_backend" in out


def test_solvers_markdown_is_the_registry(capsys):
    code, out, _ = run(capsys, "solvers", "--markdown")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("| solver | order | NFE/step | stochastic |")
    rows = [line for line in lines[2:] if line.startswith("| `")]
    assert len(rows) == len(pe.list_solvers())
    for row, info in zip(rows, pe.list_solvers()):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[:4] == [f"`{info.name}`", str(info.order), str(info.nfe_per_step),
                             "yes" if info.stochastic else "no"]


def test_demo_small(capsys):
    det = [i for i in pe.list_solvers() if not i.stochastic and i.family != "inversion"]
    sto = [i for i in pe.list_solvers() if i.stochastic]
    names = [det[0].name, sto[0].name] if sto else [det[0].name]
    code, out, err = run(capsys, "demo", "--nfe", "4", "8", "--solvers", ",".join(names),
                         "--dim", "8", "--batch", "2", "--samples", "64")
    assert code == 0, err
    assert "| solver | order | NFE 4 | NFE 8 | ms/step |" in out
    row = next(line for line in out.splitlines() if line.startswith(f"| {det[0].name} |"))
    errors = [float(c.split()[0]) for c in row.strip("|").split(" | ")[2:4]]
    assert all(e == e and e >= 0 for e in errors)          # numbers, not NaN
    assert errors[1] < errors[0], "more NFE must give a smaller error"
    if sto:
        assert f"| {sto[0].name} |" in out and "Monte-Carlo floor" in out


@pytest.mark.parametrize("argv,msg", [
    (["demo", "--solvers", "euler,no_such_solver"], "unknown solver 'no_such_solver'"),
    (["demo", "--nfe", "0"], "positive integer"),
    (["demo", "--process", "ddpm"], "invalid choice"),
    (["demo", "--backend", "no_such_backend"], "no_such_backend"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_usage_errors_exit_2(capsys, argv, msg):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert msg in err
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "demo" in out and "info" in out


def test_python_dash_m_info():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYENGINE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "pyengine", "info"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("pyengine ")
    assert "backends available:" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pyengine", "nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_readme_solver_table_lists_the_registry():
    """README's solver table is pasted from `pyengine solvers --markdown`: regenerate it when
    a solver is added."""
    readme = (ROOT / "README.md").read_text()
    missing = [i.name for i in pe.list_solvers() if f"| `{i.name}` |" not in readme]
    assert not missing, f"README solver table lacks {missing}; paste `pyengine solvers --markdown`"
