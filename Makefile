# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test venv install lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# torch is pinned to the CPU build that lies on this machine's disk; installing
# it first keeps pip from resolving a multi-GB CUDA build for `torch>=...`.
$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(wildcard csrc/*) 
	$(PIP) install torch==2.13.0
	$(PIP) install scikit-build-core pybind11 cmake ninja numpy scipy
	$(PIP) install --no-build-isolation -e '.[test]'
	$(PY) -c "import torch, sys; sys.exit(0 if '+cpu' in torch.__version__ or not torch.version.cuda else 1)" \
		|| (echo "error: a CUDA build of torch was pulled in; expected the CPU build" && exit 1)
	touch $(STAMP)

venv: $(STAMP)
install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pyengine demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV) *.egg-info
