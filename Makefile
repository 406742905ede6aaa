# Two set-up commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench train-toy interop clean gpu-check

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 lies on these machines; pin it first so nothing pulls CUDA.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/editc compile recipes/van_gogh.yaml --out out/demo --force

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(VENV)/bin/editc bench

train-toy: $(VENV)/.installed
	$(PY) -m compiler.toy.train --workdir .toy-train --out compiler/toy/weights

# editc on the device it runs on (bench/gpu_check.py): `make gpu-check` on a GPU machine (full-size
# random SD-1.5, about 8 minutes, writes bench/results/gpu.{json,md}); `make gpu-check DEVICE=cpu`
# is its dry run on the tiny fixtures. A GPU machine needs no venv: its python3 has torch; wheels
# carried in .whl/ (diffusers, importlib_metadata: see bench/gpu_check.py) are installed first.
DEVICE ?= cuda
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	@if [ -d .whl ] && ! $(GPU_CHECK_PY) -c "import diffusers" 2>/dev/null; then \
		$(GPU_CHECK_PY) -m pip install -q --no-index --no-deps --no-compile --target /tmp/editc-site .whl/*.whl; fi
	PYTHONPATH=/tmp/editc-site:. $(GPU_CHECK_PY) bench/gpu_check.py --device $(DEVICE) $(GPU_CHECK_ARGS)

# The ONNX clients users deploy on, in a side venv: optimum's ORT pipelines need transformers < 5.
INTEROP_VENV := .venv-interop
$(INTEROP_VENV)/.installed: tools/interop/requirements.txt tools/interop/constraints.txt
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q --upgrade pip
	# The local CPU wheel of torch 2.13.0 first, then pinned by constraints.txt so nothing pulls another.
	$(INTEROP_VENV)/bin/pip install -q torch==2.13.0
	$(INTEROP_VENV)/bin/pip install -q -c tools/interop/constraints.txt -r tools/interop/requirements.txt
	touch $@

interop: $(VENV)/.installed $(INTEROP_VENV)/.installed
	$(PY) tools/interop/check.py --side-python $(INTEROP_VENV)/bin/python --out out/interop

clean:
	rm -rf $(VENV) $(INTEROP_VENV) out .pytest_cache
