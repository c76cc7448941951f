"""The end-to-end benchmark's smoke run and like-with-like check; the GPU check script.

bench/bench_sampling.py runs in CI at its smoke size (``--device cpu --quick``, no timing
asserted): it must exit 0 and write its three sections with numbers in their time columns.
The fused step it times must compute diffusers' ``scheduler.step`` on the same state, history
and model output, to float32 rounding (1e-5 relative), for every configuration it
benchmarks, and keep doing so when the timing loop repeats it. bench/gpu_check.sh runs only
on a GPU machine; here it is parsed (bash -n, shellcheck where installed), dry-run, and shown
to stop before building anything when there is no GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_sampling as bs  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.sh"
NUMBER = re.compile(r"^\d+(\.\d+)?([eE][-+]?\d+)?\b")
BARE_ENV = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True,
                          **kw)


def tables(md: str) -> dict[int, tuple[list[str], list[list[str]]]]:
    """{section number: (column names, rows of cells)} of the benchmark's markdown."""
    out, key = {}, None
    for line in md.splitlines():
        m = re.match(r"^## (\d+)\. ", line)
        if m:
            key = int(m.group(1))
            out[key] = ([], [])
        elif key is not None and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            cols, rows = out[key]
            if cols:
                rows.append(cells)
            else:
                cols.extend(cells)
    return out


def test_quick_cpu_run_writes_three_sections(tmp_path):
    proc = run([sys.executable, ROOT / "bench" / "bench_sampling.py", "--device", "cpu",
                "--quick", "--out", tmp_path], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(tmp_path.glob("sampling_*_*.md"))
    assert len(files) == 1, files
    md = files[0].read_text()
    assert "- command: `python bench/bench_sampling.py --device cpu --quick" in md
    assert f"torch {torch.__version__}" in md
    secs = tables(md)
    assert sorted(secs) == [1, 2, 3], md
    timed = {1: ["pyengine us (p10-p90)", "diffusers us (p10-p90)"],
             2: ["floor us/step", "diffusers us/step", "pyengine eager us/step",
                 "pyengine graph us/step"],
             3: ["(a) diffusers eager ms", "(c) pyengine graph ms", "(d) pyengine eager ms"]}
    for key, names in timed.items():
        cols, rows = secs[key]
        assert rows, f"section {key} has no rows:\n{md}"
        for row in rows:
            assert len(row) == len(cols), row
            for name in names:
                cell = row[cols.index(name)]
                assert NUMBER.match(cell), f"section {key}, {name}: {cell!r} is not a number"
    # the benchmark's own like-with-like check, as it reports it
    cols, rows = secs[1]
    for row in rows:
        if row[cols.index("dtype")] == "float32":
            assert float(row[cols.index("rel. diff")]) <= bs.STEP_TOL, row


@pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")
@pytest.mark.filterwarnings("ignore::FutureWarning:diffusers")
@pytest.mark.parametrize("case", bs.STEP_CASES, ids=[c[0] for c in bs.STEP_CASES])
def test_fused_step_is_diffusers_step(case):
    diffusers, why = bs.load_diffusers(False)
    if diffusers is None:
        pytest.skip(why)
    sc = bs.StepCase(diffusers, case, (2, 4, 8, 9), torch.float32, "cpu")
    err = sc.compare()
    assert err <= bs.STEP_TOL, f"{case[0]}: {err:.2e}"
    # the timing loop calls both sides again and again: each call is the same step
    first = sc.pyengine().clone()
    for _ in range(2):
        sc.rewind()
        sc.diffusers()
        again = sc.pyengine()
    assert torch.equal(first, again)
    assert sc.compare() == err


def test_gpu_check_parses():
    proc = run(["bash", "-n", SCRIPT])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_shellcheck():
    proc = run(["shellcheck", SCRIPT])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    proc = run([SCRIPT, "--dry-run", tmp_path], cwd=ROOT, timeout=60, env=BARE_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = list(tmp_path.glob("gpu_check_dry-run_*.md"))
    assert len(summary) == 1
    text = summary[0].read_text()
    for step in ("build (pip -e)", "pytest tests/test_cuda_fused_update.py",
                 "pytest tests/test_backends_e2e.py", "compute-sanitizer memcheck",
                 "bench_fused_update.py", "bench_sampling.py"):
        assert f"| {step} |" in text, step
    assert not (tmp_path / "sampling").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
def test_gpu_check_stops_without_gpu(tmp_path):
    proc = run([SCRIPT, tmp_path], cwd=ROOT, timeout=120, env=BARE_ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no usable GPU" in proc.stdout
    assert not (tmp_path / "build.log").exists()        # stopped before building


def test_loop_benchmark_quick_run(tmp_path):
    """bench/bench_loop.py's smoke run: exits 0 and writes one row per solver with numbers
    in every time column (no timing asserted)."""
    import bench_loop
    assert bench_loop.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = [line for line in (tmp_path / "loop_cpu.md").read_text().splitlines()
            if line.startswith("| ") and line[2:3].isalpha() and not line.startswith("| solver")]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(NUMBER.match(c.rstrip("%").lstrip("-")) for c in cells[4:]), row
