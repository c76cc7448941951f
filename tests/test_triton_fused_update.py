"""The Triton fused update (pyengine/fused_update/triton_kernels.py, backend "triton"):
what only this backend has. The cases every backend shares run in tests/test_fused_update.py
(on CPU tensors under the interpreter there).

TRITON_INTERPRET must be set before triton is imported, and it must not leak into the other
test modules (the compiled-kernel tests in tests/test_triton_cuda.py need the real compiler).
So in a normal pytest run this module holds a test that re-runs this same file in a child
pytest with TRITON_INTERPRET=1; in that child the tests below run on small CPU tensors:
the Philox words bit for bit, steps and seeds read from memory, the Triton op, the reported
interpreter path and a few solvers end to end. Without the interpreter, the kernel is
compiled for sm_90 (no GPU needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if not INTERPRETED:
    def test_under_the_triton_interpreter():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "-x", str(Path(__file__))], env=env, capture_output=True, text=True,
                           cwd=Path(__file__).parent.parent, timeout=600, check=False)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout

    @pytest.mark.parametrize("f64,noise_mode,aux_mode,coef_table,mask_mode", [
        (False, 1, 1, False, 0), (True, 2, 2, True, 0), (False, 1, 1, False, 1)],
        ids=["f32-philox-aux", "f64-tables", "f32-philox-aux-mask"])
    def test_compiles_for_sm90_without_a_gpu(f64, noise_mode, aux_mode, coef_table, mask_mode):
        """The interpreter is lenient (it ran a kernel the compiler rejected: a global that was
        not a tl.constexpr); compiling to PTX and a cubin for sm_90 (Triton's bundled ptxas)
        needs no GPU. With 16-byte aligned pointers the loads and stores are 128-bit."""
        triton = pytest.importorskip("triton")
        tl = pytest.importorskip("triton.language")
        from triton.backends.compiler import GPUTarget

        from pyengine.fused_update.triton_kernels import fused_update_kernel as fn

        names = fn.arg_names
        sig = {}
        for n in names:
            if n in ("CT", "ACT", "MCT", "NCT"):
                sig[n] = "*fp64"
            elif n in ("SEEDS", "STEP"):
                sig[n] = "*i64"
            elif n == "MASK":
                sig[n] = "*bf16"                     # a mask in another dtype than the data
            elif n in ("OUT", "AUX", "NOISE") or (n[0] == "X" and n[1:].isdigit()):
                sig[n] = "*fp64" if f64 else "*bf16" if n == "X1" else "*fp32"
            elif n == "NC" or (n[0] in "CAM" and n[1:].isdigit()):
                sig[n] = "fp32"
            elif n in ("cs", "acs", "mcs", "ncs", "sts", "N", "SIZE_BUCKET"):
                sig[n] = "i64"
            else:
                sig[n] = "constexpr"
        const = {"K": 3, "COEF_TABLE": coef_table, "AUX_MODE": aux_mode,
                 "NOISE_MODE": noise_mode, "NC_TABLE": f64, "MASK_MODE": mask_mode,
                 "BLOCK_Q": 256, "CDT": tl.float64 if f64 else tl.float32}
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in names if sig[n].startswith("*") or n == "N"}
        src = triton.compiler.ASTSource(
            fn=fn, signature=sig, attrs=attrs,
            constexprs={(names.index(k),): v for k, v in const.items()})
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": 4, "enable_fp_fusion": True})
        except RuntimeError as e:               # no ptxas in this triton install
            if "ptxas" in str(e):
                pytest.skip(str(e))
            raise
        ptx = k.asm["ptx"]
        assert "cubin" in k.asm and ("st.global.v2.b64" if f64 else "st.global.v4") in ptx
        if noise_mode == 1:
            assert "mul.hi.u32" in ptx
else:
    pytest.importorskip("triton")
    import pyengine as pe
    from pyengine.backends import cpp
    from pyengine.backends import triton_backend as tb
    from pyengine.backends.dispatch import Call
    from pyengine.models import GaussianMixture
    from pyengine.noise import philox4x32, philox_normal, sample_seed, seeds_tensor

    def kernel_normals(seeds, step, shape):
        x = torch.zeros(shape)
        z = torch.empty(shape)
        tb.fused_update(z, [x], np.array([0.0]), 1.0, seeds, step)
        return z

    def test_step_and_seeds_are_read_from_memory():
        """A step given as a tensor (what a captured graph rewrites) gives that draw."""
        seeds = seeds_tensor(9, 2)
        step = torch.tensor([5], dtype=torch.int64)
        x = torch.zeros(2, 37)
        z = torch.empty_like(x)
        tb.fused_update(z, [x], np.array([0.0]), 1.0, seeds, step)
        assert torch.equal(z, kernel_normals(seeds, 5, (2, 37)))
        step.fill_(6)
        seeds.copy_(seeds_tensor(10, 2))
        tb.fused_update(z, [x], np.array([0.0]), 1.0, seeds, step)
        assert torch.equal(z, kernel_normals(seeds_tensor(10, 2), 6, (2, 37)))

    @pytest.mark.parametrize("seed,step,q0", [(0, 0, 0), (2 ** 64 - 1, 2 ** 32 - 1, 7),
                                              (sample_seed(5, 2), 9, 2 ** 32 - 70),
                                              (0xDEADBEEFCAFEF00D, 123456, 2 ** 40 + 3)])
    def test_philox_words_bit_exact(seed, step, q0):
        nq = 301
        got = tb.philox_words(seed, step, nq, q0=q0)
        q = torch.arange(q0, q0 + nq, dtype=torch.int64)
        want = philox4x32(q & 0xFFFFFFFF, q >> 32, torch.full_like(q, step),
                          torch.zeros_like(q), torch.tensor(seed & 0xFFFFFFFF),
                          torch.tensor(seed >> 32))
        assert torch.equal(got, torch.stack(want, dim=1))
        if cpp.unavailable_reason("cpu") is None:
            assert torch.equal(got, cpp.philox_words(seed, step, nq, q0=q0))

    def test_kernel_normals_match_torch_and_cpp():
        seeds = seeds_tensor([0, 1, 2 ** 64 - 1, sample_seed(77, 3)], 4)
        for step, numel in ((0, 1), (5, 3), (2 ** 32 - 1, 1031)):
            z = kernel_normals(seeds, step, (4, numel))
            torch.testing.assert_close(z, philox_normal(seeds, step, numel), rtol=0, atol=1e-6)
            if cpp.unavailable_reason("cpu") is None:
                torch.testing.assert_close(z, cpp.philox_normal(seeds, step, numel), rtol=0,
                                           atol=1e-6)

    def test_triton_op_matches_the_direct_call():
        """torch.ops.pyengine.triton_fused_update (the torch.compile boundary), eagerly."""
        g = torch.Generator().manual_seed(12)
        bufs = [torch.randn(4, 2, 33, generator=g) for _ in range(3)]
        coef = torch.randn(4, 3, generator=g, dtype=torch.float64)
        aux_coef = torch.randn(3, generator=g, dtype=torch.float64).numpy()
        want, want_aux, got, got_aux = (torch.empty(4, 2, 33) for _ in range(4))
        tb.fused_update(want, bufs, coef, 0.4, seeds_tensor(2, 4), 1, want_aux, aux_coef)
        tb.fused_update_op(got, bufs, coef, 0.4, seeds_tensor(2, 4), 1, got_aux, aux_coef)
        assert torch.equal(got, want) and torch.equal(got_aux, want_aux)

    def test_interpreter_path_is_reported():
        assert tb.unavailable_reason("cpu") is None
        x = torch.zeros(2, 3, dtype=torch.bfloat16)
        why = tb.reasons_unsupported(Call.of(x, [x]))
        assert any("bfloat16" in w and "interpreter" in w for w in why)

    @pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddpm"])
    def test_solvers_end_to_end(name):
        """A few solvers through the interpreted kernel match the torch backend (every
        solver runs through the compiled kernel in tests/test_triton_cuda.py)."""
        known = {i.name for i in pe.list_solvers()}
        if name not in known:
            pytest.skip(f"{name} is not registered")
        proc = pe.processes.VP.discrete("linear")
        gmm = GaussianMixture.random(d=16, M=4, seed=0)
        x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        model = gmm.as_model(proc, "epsilon")
        runs = [pe.Sampler(proc, solver=name, steps=6).sample(model, x, backend=be,
                                                              seed=[5, 2 ** 64 - 1, 9])
                for be in ("torch", "triton")]
        torch.testing.assert_close(runs[1], runs[0], rtol=0,
                                   atol=1e-5 * max(1.0, runs[0].abs().max().item()))
