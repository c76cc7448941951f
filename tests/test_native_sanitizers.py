"""The C++ unit tests of the CPU kernel (csrc/tests/), built with AddressSanitizer and
UndefinedBehaviorSanitizer and run clean: no out-of-bounds access, no use of freed memory,
no leak, no undefined behaviour, on every instruction-set build the CPU runs.

The executable is built here, without CMake or torch (the kernel and launcher are torch-free),
from the same sources as pyengine._C, at -O2 so the vector loops that ship are the ones
checked; it is cached under build/csrc-tests/ by a hash of the sources and flags.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
TEST_SOURCE = CSRC / "tests" / "test_fused_update_cpu.cpp"
KERNEL_SOURCES = [CSRC / "fused_update" / "launcher.cpp",
                  CSRC / "fused_update" / "fused_update_cpu.cpp"]
AVX2_SOURCE = CSRC / "fused_update" / "fused_update_cpu_avx2.cpp"
FLAGS = ["-std=c++17", "-O2", "-g", "-fno-omit-frame-pointer", "-fno-math-errno",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", f"-I{CSRC}"]


def _compiler():
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _try(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sanitized_binary(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) on PATH")
    probe = tmp_path_factory.mktemp("probe")
    (probe / "p.cpp").write_text("int main() { return 0; }\n")
    if _try([cxx, *FLAGS, "p.cpp", "-o", "p"], probe).returncode != 0:
        pytest.skip(f"{cxx} cannot build with -fsanitize=address,undefined here "
                    f"(libasan / libubsan missing)")
    flags = list(FLAGS)
    if _try([cxx, "-fopenmp", "p.cpp", "-o", "p"], probe).returncode == 0:
        flags.append("-fopenmp")                 # the threaded path is checked too
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    sources = [(TEST_SOURCE, []), *[(s, []) for s in KERNEL_SOURCES]]
    if x86:
        flags.append("-DPYENGINE_HAVE_AVX2_KERNEL")
        sources.append((AVX2_SOURCE, ["-mavx2", "-mfma", "-mf16c", "-ffp-contract=off"]))

    version = _try([cxx, "--version"], probe).stdout
    h = hashlib.sha256((version + " ".join(flags)).encode())
    for path in sorted((CSRC / "fused_update").glob("*")) + [TEST_SOURCE]:
        h.update(path.name.encode() + path.read_bytes())
    out_dir = ROOT / "build" / "csrc-tests" / h.hexdigest()[:16]
    exe = out_dir / "test_fused_update_cpu"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    # two compiles at a time (the CI machine has 2 cores)
    objs, procs = [], []
    for src, extra in sources:
        obj = out_dir / (src.stem + ".o")
        objs.append(obj)
        procs.append(subprocess.Popen([cxx, *flags, *extra, "-c", str(src), "-o", str(obj)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        if len(procs) == 2:
            _wait(procs)
    _wait(procs)
    link = _try([cxx, *flags, *map(str, objs), "-o", str(exe) + ".tmp"], out_dir)
    assert link.returncode == 0, link.stdout + link.stderr
    os.replace(str(exe) + ".tmp", exe)
    for old in out_dir.parent.iterdir():         # builds of earlier sources
        if old != out_dir and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return exe


def _wait(procs):
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"compile failed: {' '.join(p.args)}\n{out}"
    procs.clear()


def test_cpu_kernel_clean_under_asan_and_ubsan(sanitized_binary):
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:strict_string_checks=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["OMP_NUM_THREADS"] = "2"
    proc = subprocess.run([str(sanitized_binary)], capture_output=True, text=True, env=env,
                          timeout=600)
    report = proc.stdout + proc.stderr
    if "LeakSanitizer does not work under ptrace" in report or \
            "LeakSanitizer has encountered a fatal error" in report:
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
        proc = subprocess.run([str(sanitized_binary)], capture_output=True, text=True, env=env,
                              timeout=600)
        report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in report and "runtime error:" not in report, report
    assert "checks passed" in proc.stdout
    # the noise's AVX2 loops too, on a machine whose CPU would take the AVX-512 ones
    env["PYENGINE_CPU_NO_AVX512"] = "1"
    proc = subprocess.run([str(sanitized_binary)], capture_output=True, text=True, env=env,
                          timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "ERROR: AddressSanitizer" not in report and "runtime error:" not in report, report
    assert "checks passed" in proc.stdout
