# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test proto system-deps clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e '.[dev,spark]'
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/flowpipe demo

system-deps:
	bash scripts/install-system-deps

test: $(VENV)/.dev system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# Regenerate the committed gRPC stubs in flowpipe/_proto from proto/ (a test checks they are current).
proto: $(VENV)/.dev
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache
