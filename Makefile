# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Every file under csrc/ (headers, CUDA, the C++ tests): any change rebuilds the extension.
CSRC := $(shell find csrc -type f)

.PHONY: demo test venv install lint clean bench sanitize

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch is pinned to the CPU build that lies on this machine's disk; installing
# it first keeps pip from resolving a multi-GB CUDA build for `torch>=...`. The extension
# builds with two compile jobs (the CI machine has 2 cores); its CUDA kernel compiles too
# wherever nvcc is found.
$(STAMP): $(PY) Makefile pyproject.toml CMakeLists.txt $(CSRC)
	$(PIP) install torch==2.13.0
	$(PIP) install scikit-build-core pybind11 cmake ninja numpy scipy
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install --no-build-isolation -e '.[test]'
	# k-diffusion is a parity reference only. Its declared dependencies pull torchvision and
	# with it a CUDA torch, so it and the Brownian-tree noise it uses come without them.
	$(PIP) install --no-deps k-diffusion==0.1.1.post1 torchsde==0.2.6 trampoline==0.1.2
	$(PY) -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" \
		|| (echo "error: a CUDA build of torch was pulled in; expected the CPU build" && exit 1)
	touch $(STAMP)

venv: $(STAMP)
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pyengine demo

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (pyflakes + pycodestyle rules, pyproject.toml [tool.ruff]) over the package, tests and
# benchmarks; ruff comes with the test extra.
lint: $(STAMP)
	$(PY) -m ruff check pyengine tests bench

# The C++ kernel's unit tests under AddressSanitizer + UndefinedBehaviorSanitizer (also in `test`).
sanitize: $(STAMP)
	$(PY) -m pytest -q tests/test_native_sanitizers.py

# The fused-update benchmark on this CPU; the markdown table goes to bench/results/.
bench: $(STAMP)
	$(PY) bench/bench_fused_update.py --out bench/results

clean:
	rm -rf build $(VENV) *.egg-info
