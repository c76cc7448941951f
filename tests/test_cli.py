"""The command line: exit codes and output, in process (main(argv)) and as `python -m pyengine`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyengine as pe
from pyengine import benchmark, cli, demo, render

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
                         "--dim", "8", "--batch", "2", "--samples", "64", "--no-digits",
                         "--no-plots", "--no-tuning")
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
    (["sample", "gmm", "--solver", "no_such_solver"], "unknown solver 'no_such_solver'"),
    (["sample", "gmm", "--schedule", "no_such_schedule"], "unknown schedule 'no_such_schedule'"),
    (["sample", "gmm", "--steps", "0"], "positive integer"),
    (["sample", "gmm", "--seed", str(2 ** 32)], "seed in [0, 2^32)"),
    (["sample", "gmm", "--process", "nope"], "invalid choice"),
    (["sample", "gmm", "--prediction", "nope"], "prediction must be one of"),
    (["sample", "gmm", "--backend", "no_such_backend"], "no_such_backend"),
    (["sample", "gmm", "-o", "x.png"], "a .png grid needs image samples"),
    (["sample", "gmm", "-o", "x.jpg"], "must end in .pt, .npy or .png"),
    (["sample", "gmm", "-o", "/no/such/folder/x.pt"], "does not exist"),
    (["sample", "gmm", "--solver", "ddim_inverse"], "inverts data to noise"),
    (["sample", "gmm", "--schedule", "leading", "--process", "edm"], "discrete VP"),
    (["sample", "digits", "--process", "vp"], "trained on the EDM process"),
    (["sample", "no_such_module_xyz:model"], "cannot import module 'no_such_module_xyz'"),
    (["sample", "pyengine.models:NoSuchThing"], "has no attribute 'NoSuchThing'"),
    (["sample", "nonsense"], "'digits', 'gmm' or an import path"),
    (["sample", "pyengine.noise:sample_seed"], "give --shape"),
    (["bench", "--solvers", "euler,nope"], "unknown solver 'nope'"),
    (["bench", "--shape", "0,3"], "--shape must be positive integers"),
    (["bench", "--suite", "solvers", "-o", "/no/such/folder/b.md"], "does not exist"),
])
def test_usage_errors_exit_2(capsys, argv, msg):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert msg in err
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(c in out for c in ("sample", "demo", "bench", "info", "solvers"))
    code, out, _ = run(capsys, "sample", "--help")
    assert code == 0 and "module:attr" in out


def test_readme_shows_the_help(capsys, monkeypatch):
    """README's command-line section carries `pyengine --help` as it prints."""
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run(capsys, "--help")
    assert code == 0
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ pyengine --help\n", 1)[1].split("```", 1)[0]
    assert block.strip() == out.strip()


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


# ---------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------

USER_MODULE = '''
import torch
import pyengine as pe
from pyengine.models import GaussianMixture

GMM = GaussianMixture.random(d=3, M=2, seed=1)


def make():
    """A factory: (process, model, prediction)."""
    proc = pe.processes.EDM()
    return proc, GMM.as_model(proc, "sample"), "sample"


def eps_model(x, t):
    """A plain model(x, t): elementwise, so batch-invariant."""
    return x / (1.0 + x * x) + 1e-4 * t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def broken(x, t):
    raise TypeError("this model is broken on purpose")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"pyengine_cli_user_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _reference(process, model, prediction, shape, n, *, solver, steps, seed, batch,
               dtype=torch.float32):
    from pyengine.distributed import sample_indices
    s = pe.Sampler(process, solver=solver, steps=steps, schedule="karras", prediction=prediction)
    return sample_indices(s, model, range(n), shape, seed, batch_size=batch, dtype=dtype)


def test_sample_gmm_pt_and_npy_round_trip(capsys, tmp_path):
    pt, npy = tmp_path / "x.pt", tmp_path / "x.npy"
    args = ["sample", "gmm", "--dim", "4", "--num", "7", "--batch", "3", "--solver",
            "euler_ancestral", "--steps", "6", "--seed", "5", "--dtype", "float64"]
    code, out, err = run(capsys, *args, "-o", str(pt))
    assert code == 0, err
    assert "7 samples of shape (4,)" in out and f"wrote {pt}" in out
    code, _, err = run(capsys, *args, "-o", str(npy), "--batch", "7", "--quiet")
    assert code == 0, err
    x, y = torch.load(pt), torch.from_numpy(np.load(npy))
    assert x.shape == (7, 4) and x.dtype == torch.float64
    # sample i depends on (seed, i) only, not on the batch it ran in
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    proc = pe.processes.VP.discrete("linear")
    gmm = pe.models.GaussianMixture.random(d=4, M=4, seed=0)
    ref = _reference(proc, gmm.as_model(proc, "epsilon"), "epsilon", (4,), 7,
                     solver="euler_ancestral", steps=6, seed=5, batch=3, dtype=torch.float64)
    assert torch.equal(x, ref)


def test_sample_quiet_prints_nothing(capsys, tmp_path):
    code, out, err = run(capsys, "sample", "gmm", "--num", "3", "--steps", "3", "--quiet",
                         "-o", str(tmp_path / "x.pt"))
    assert code == 0 and out == "" and err == ""


def test_sample_user_factory_by_import_path(capsys, tmp_path, user_module):
    path = tmp_path / "u.pt"
    code, out, err = run(capsys, "sample", f"{user_module}:make", "--shape", "3", "--num", "5",
                         "--solver", "heun", "--steps", "4", "-o", str(path))
    assert code == 0, err
    mod = sys.modules[user_module]
    proc, model, pred = mod.make()
    ref = _reference(proc, model, pred, (3,), 5, solver="heun", steps=4, seed=0, batch=64)
    assert torch.equal(torch.load(path), ref)


def test_sample_user_model_function(capsys, tmp_path, user_module):
    path = tmp_path / "u.npy"
    code, out, err = run(capsys, "sample", f"{user_module}:eps_model", "--shape", "1,4,4",
                         "--process", "vp_cosine", "--num", "3", "--steps", "5", "-o",
                         str(path))
    assert code == 0, err
    x = np.load(path)
    assert x.shape == (3, 1, 4, 4) and np.isfinite(x).all()
    # an image-shaped user model can be written as a PNG grid
    code, _, err = run(capsys, "sample", f"{user_module}:eps_model", "--shape", "1,4,4",
                       "--num", "3", "--steps", "2", "-o", str(tmp_path / "u.png"))
    assert code == 0, err
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_model_error_exits_1(capsys, user_module):
    code, out, err = run(capsys, "sample", f"{user_module}:broken", "--shape", "2",
                         "--steps", "2")
    assert code == 1
    assert "TypeError: this model is broken on purpose" in err and "Traceback" not in err


def test_sample_digits_png_and_text_preview(capsys, tmp_path):
    png = tmp_path / "digits.png"
    code, out, err = run(capsys, "sample", "digits", "--num", "8", "--steps", "4", "-o",
                         str(png))
    assert code == 0, err
    assert "from digits" in out and "digit classifier: mean confidence" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w >= 3 * 9 and h >= 3 * 9                      # 3x3 tiles of 8x8 digits
    code, out, err = run(capsys, "sample", "digits", "--num", "2", "--steps", "3")
    assert code == 0, err
    assert "@" in out or "#" in out                       # the ASCII preview


def test_sample_distributed_single_process_equals_plain(capsys, tmp_path, monkeypatch):
    """Without torchrun's environment --distributed runs as one process, with the same
    samples (sample_sharded with the same batch size is bitwise sample_indices)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    common = ["sample", "gmm", "--num", "5", "--batch", "2", "--steps", "4", "--quiet"]
    assert run(capsys, *common, "-o", str(a))[0] == 0
    assert run(capsys, *common, "--distributed", "-o", str(b))[0] == 0
    assert torch.equal(torch.load(a), torch.load(b))


def test_python_dash_m_sample_subprocess(tmp_path):
    """`python -m pyengine sample` as a real process (torch's import makes each one cost
    seconds, so one; test_python_dash_m_info checks exit code 2 out of process)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "s.npy"
    ok = subprocess.run([sys.executable, "-m", "pyengine", "sample", "gmm", "--num", "4",
                         "--steps", "3", "-o", str(out)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert np.load(out).shape == (4, 2) and "wrote" in ok.stdout


# ---------------------------------------------------------------------------------------
# bench and demo
# ---------------------------------------------------------------------------------------


def test_bench_solver_table(capsys, tmp_path):
    md = tmp_path / "bench.md"
    code, out, err = run(capsys, "bench", "--suite", "solvers", "--solvers", "euler,ddpm",
                         "--shape", "2,64", "--steps", "3", "--min-seconds", "0.01", "-o",
                         str(md))
    assert code == 0, err
    assert "| solver | NFE |" in out and "| euler | 3 |" in out and "| ddpm | 3 |" in out
    assert "| euler | 3 |" in md.read_text()


def test_kernel_bench_script_is_found_in_a_checkout():
    script = benchmark.kernel_bench_script()
    if (ROOT / "bench" / "bench_fused_update.py").exists():
        assert script == ROOT / "bench" / "bench_fused_update.py"
    else:
        assert script is None


def test_demo_digits_and_plots(capsys, tmp_path):
    code, out, err = run(capsys, "demo", "--nfe", "4", "--solvers", "euler,heun", "--dim", "4",
                         "--batch", "2", "--samples", "16", "--digits-nfe", "3",
                         "--digits-samples", "16", "--scatter-nfe", "4", "--tuning-nfe", "4",
                         "--out", str(tmp_path))
    assert code == 0, err
    assert "Digits model" in out and "| heun | fd " in out
    # the GITS and tuned rows, the fixed vs tuned table on the mixture
    assert "| dpmpp_2m + GITS | fd " in out and "| ipndm + GITS | fd " in out
    base = pe.load_plan(demo.TUNED_DIGITS).provenance["base_solver"]
    assert f"| tuned {base} | fd " in out and "@5" in out
    rows = {}
    for line in out.split("Tuned plans on an exact Gaussian mixture", 1)[1].splitlines():
        if line.startswith("| ") and not line.startswith("| plan |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = float(cells[1])
        elif rows:
            break
    assert set(rows) >= {"unipc", "unipc + GITS", "ipndm + GITS", "tuned unipc"}, rows
    assert rows["tuned unipc"] < 0.5 * rows["unipc"], rows
    assert (tmp_path / "digits_grid.png").stat().st_size > 1000
    assert f"wrote {tmp_path / 'digits_grid.png'}" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in out
    else:
        for name in ("error_vs_nfe.png", "scatter_2d.png", "bench.png",
                     "tuning_error_vs_nfe.png"):
            assert (tmp_path / name).stat().st_size > 1000
            assert f"wrote {tmp_path / name}" in out
        assert "| heun | 19 |" in (tmp_path / "bench.md").read_text()


def test_sample_distributed_under_torchrun(tmp_path):
    """`pyengine sample --distributed` on two gloo ranks: rank 0 writes bitwise the samples of
    one process (the sharding itself is tested in test_distributed.py)."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = ["sample", "gmm", "-n", "11", "--batch", "4", "--solver", "euler_ancestral",
            "--steps", "5", "--seed", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "pyengine", *args,
           "--distributed", "-o", str(tmp_path / "dist.pt")]
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)        # torchrun and the two ranks it started
        out, _ = p.communicate()
        pytest.fail(f"torchrun did not finish in 120 s:\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]
    assert out.count("wrote ") == 1 and "on 2 ranks" in out      # rank 0 alone reports
    assert cli.main([*args, "--quiet", "-o", str(tmp_path / "one.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "dist.pt"), torch.load(tmp_path / "one.pt"))


def test_demo_without_matplotlib_says_how_to_install(capsys, tmp_path, monkeypatch):
    from pyengine import plots
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    code, out, err = run(capsys, "demo", "--nfe", "3", "--solvers", "euler", "--dim", "4",
                         "--batch", "2", "--digits-nfe", "2", "3", "--digits-samples", "8",
                         "--no-tuning", "--out", str(tmp_path / "new"))
    assert code == 0, err
    assert "plots skipped: matplotlib is not installed; pip install 'pyengine-sampling[plots]'" \
        in out
    # the digits grid is a plain PNG mosaic then: 1 row of 2 cells x 8 samples of 8x8 pixels
    data = (tmp_path / "new" / "digits_grid.png").read_bytes()
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (w, h) == (4 * (16 * 9 + 1), 4 * (9 + 1))
    assert not (tmp_path / "new" / "error_vs_nfe.png").exists()


def test_progress_bars_are_silenced_by_quiet():
    assert isinstance(render.progress(10, "x", quiet=True), render.NoBar)
    tqdm = pytest.importorskip("tqdm")
    bar = render.progress(10, "x")
    assert isinstance(bar, tqdm.tqdm)
    bar.close()


# ---------------------------------------------------------------------------------------
# the output file: checked before sampling, written atomically (issue 13 #7)
# ---------------------------------------------------------------------------------------


def _counting_model(calls):
    def model(x, t):
        calls.append(1)
        return x / (1.0 + x * x)
    model.sample_shape = (3,)
    return model


def test_unwritable_output_exits_2_before_sampling(capsys, tmp_path, monkeypatch, user_module):
    import importlib
    mod = importlib.import_module(user_module)
    calls = []
    mod.counted = _counting_model(calls)
    # a folder where the file should be, a file where the folder should be
    (tmp_path / "x.pt").mkdir()
    code, _, err = run(capsys, "sample", f"{user_module}:counted", "-o", str(tmp_path / "x.pt"))
    assert code == 2 and "is a folder, not a file" in err
    (tmp_path / "f").write_text("a file")
    code, _, err = run(capsys, "sample", f"{user_module}:counted", "-o",
                       str(tmp_path / "f" / "x.pt"))
    assert code == 2 and "does not exist" in err
    # a folder the user cannot write to (root may write anywhere: simulate the refusal)
    from pyengine import output

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(output.tempfile, "mkstemp", refuse)
    code, _, err = run(capsys, "sample", f"{user_module}:counted", "-o", str(tmp_path / "y.npy"))
    assert code == 2 and "is not writable: Permission denied" in err and "Traceback" not in err
    assert calls == [], "the target must be checked before any sampling"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_folder_exits_2(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(capsys, "sample", "gmm", "--steps", "2", "-o", str(ro / "x.pt"))
    finally:
        ro.chmod(0o700)
    assert code == 2 and "is not writable" in err


def test_failed_write_keeps_the_old_file(capsys, tmp_path, monkeypatch):
    """An error half-way through the write leaves the existing file as it was, and no
    temporary file behind."""
    path = tmp_path / "x.pt"
    assert run(capsys, "sample", "gmm", "--steps", "2", "--quiet", "-o", str(path))[0] == 0
    good = path.read_bytes()

    def broken_save(obj, f, *a, **kw):
        f.write(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    code, _, err = run(capsys, "sample", "gmm", "--steps", "2", "--seed", "1", "-o", str(path))
    assert code == 1 and "No space left on device" in err
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


SLOW_SAVE = '''
import sys, time, torch
def slow_save(obj, f, *a, **kw):
    f.write(b"half a file")
    f.flush()
    print("WRITING", flush=True)
    time.sleep(60)
torch.save = slow_save
from pyengine import cli
sys.exit(cli.main(["sample", "gmm", "--steps", "2", "--quiet", "-o", sys.argv[1]]))
'''


def test_sigterm_during_the_write_keeps_the_old_file(tmp_path):
    """SIGTERM while the samples are written: the existing file is intact (it was truncated
    to a partial file by an in-place write) and the temporary file is removed."""
    import signal
    path = tmp_path / "x.pt"
    torch.save(torch.arange(5.0), path)
    good = path.read_bytes()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "WRITING", p.stderr.read()[-2000:]
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert path.read_bytes() == good
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.pt"]


def test_solver_bench_runs_every_registry_solver():
    """`make demo`'s per-step table walks every sampling solver of the registry, custom ops
    (clip_x0, pc_langevin) included."""
    from pyengine.benchmark import solver_bench
    names = [i.name for i in pe.list_solvers() if i.family != "inversion"]
    _, rows = solver_bench(names, (1, 2, 4, 4), 3, torch.float32, "torch", 0.0)
    assert [r["solver"].rstrip(" *") for r in rows] == names
    assert all(r["per"][0] > 0 for r in rows)


# -- tuned plans: pyengine tune, pyengine sample --plan ------------------------------------


@pytest.fixture(scope="module")
def gmm_plan(tmp_path_factory):
    """A plan tuned by the command line on a 3-d mixture (a few iterations: the file and the
    commands are under test here, the fit in test_tuning_*)."""
    path = tmp_path_factory.mktemp("tune") / "gmm-nfe3.json"
    code = cli.main(["tune", "gmm", "--dim", "3", "--nfe", "3", "-n", "16", "--iters", "5",
                     "-o", str(path), "-q"])
    assert code == 0
    return path


def test_tune_writes_a_plan_file(gmm_plan):
    f = pe.load_plan(gmm_plan)
    assert f.plan.nfe == 3 and f.provenance["nfe"] == 3
    assert f.provenance["base_solver"] == "dpmpp_2m" and f.provenance["prediction"] == "epsilon"
    assert f.provenance["process"]["class"] == "VPDiscrete"


def test_sample_plan_equals_the_api(capsys, tmp_path, gmm_plan):
    from pyengine import distributed
    from pyengine.models.load import load_model

    out = tmp_path / "x.npy"
    code, stdout, err = run(capsys, "sample", "gmm", "--dim", "3", "--plan", str(gmm_plan),
                            "-n", "7", "--seed", "4", "-o", str(out))
    assert code == 0, err
    assert f"tuned ({gmm_plan})" in stdout and "3 NFE" in stdout
    spec = load_model("gmm", dim=3)
    smp = pe.Sampler.from_tuned(gmm_plan, spec.process)
    ref = distributed.sample_indices(smp, spec.model, range(7), spec.shape, 4, batch_size=64)
    assert np.array_equal(np.load(out), ref.numpy())
    fixed = pe.Sampler(spec.process, "dpmpp_2m", steps=3)
    other = distributed.sample_indices(fixed, spec.model, range(7), spec.shape, 4, batch_size=64)
    assert not np.array_equal(np.load(out), other.numpy())


def test_sample_plan_errors_exit_2(capsys, tmp_path, gmm_plan):
    code, _, err = run(capsys, "sample", "gmm", "--dim", "3", "--process", "edm", "--plan",
                       str(gmm_plan))
    assert code == 2 and "refused" in err and "VPDiscrete" in err and "EDM" in err
    assert str(gmm_plan) in err
    code, _, err = run(capsys, "sample", "gmm", "--dim", "3", "--prediction", "v", "--plan",
                       str(gmm_plan))
    assert code == 2 and "prediction='epsilon'" in err and "'v'" in err
    code, _, err = run(capsys, "sample", "gmm", "--plan", str(tmp_path / "none.json"))
    assert code == 2 and "no such file" in err and "none.json" in err
    code, _, err = run(capsys, "sample", "gmm", "--plan", str(gmm_plan), "--solver", "euler")
    assert code == 2 and "drop --solver" in err
    bad = tmp_path / "bad.json"
    bad.write_text(gmm_plan.read_text().replace('"coefs"', '"coefficients"', 1))
    code, _, err = run(capsys, "sample", "gmm", "--dim", "3", "--plan", str(bad))
    assert code == 2 and "coefs" in err and str(bad) in err and "Traceback" not in err


@pytest.mark.parametrize("argv,msg", [
    (["tune", "gmm", "--nfe", "3", "-o", "/no/such/folder/p.json"], "does not exist"),
    (["tune", "gmm", "--nfe", "3", "-o", "p.json", "--solver", "euler_ancestral"],
     "not a deterministic sampling solver"),
    (["tune", "gmm", "--nfe", "3", "-o", "p.json", "--loss", "features"], "only for the digits"),
    (["tune", "gmm", "--nfe", "3", "-o", "p.json", "--solver", "nope"], "unknown solver 'nope'"),
    (["tune", "gmm", "-o", "p.json"], "--nfe"),
])
def test_tune_usage_errors_exit_2(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2 and msg in err and "Traceback" not in err


def test_sample_digits_with_the_bundled_plan(capsys, tmp_path):
    from pyengine.demo import TUNED_DIGITS

    code, out, err = run(capsys, "sample", "digits", "--plan", str(TUNED_DIGITS), "-n", "8")
    assert code == 0, err
    assert "5 NFE" in out and "digit classifier" in out
    assert "fingerprint" not in err                     # fitted to the bundled weights


def test_tune_method_gits_writes_the_base_solver_plan(capsys, tmp_path):
    out = tmp_path / "gits.json"
    code, stdout, err = run(capsys, "tune", "gmm", "--dim", "3", "--nfe", "4", "-n", "12",
                            "--method", "gits", "--solver", "ipndm", "-o", str(out))
    assert code == 0, err
    assert "GITS grid 157.4" in stdout
    f = pe.load_plan(out)
    assert f.provenance["method"] == "gits" and f.plan.nfe == 4
    spec_proc = pe.processes.named("vp")
    again = pe.Sampler(spec_proc, "ipndm", sigmas=f.plan.sigmas).plan
    assert pe.tuning.artifact.plans_equal(again, f.plan)
    karras = pe.Sampler(spec_proc, "ipndm", steps=4).sigmas
    assert f.plan.sigmas.shape == karras.shape and not np.array_equal(f.plan.sigmas, karras)
    code, _, err = run(capsys, "tune", "gmm", "--nfe", "4", "--method", "gits", "--loss",
                       "features", "-o", str(out))
    assert code == 2
