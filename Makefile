# Two commands do everything: `make serve` and `make test`.  Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
ARGS   ?=

.PHONY: serve test setup lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pin torch first: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/realtime serve --host $(HOST) --port $(PORT) $(ARGS)

test: setup
	@sh tests/ensure_chromium.sh
	@sh tests/ensure_kubectl.sh $(VENV)
	@sh tests/ensure_nginx.sh
	$(VENV)/bin/python -m pytest $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts
