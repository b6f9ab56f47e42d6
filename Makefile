# Two entry points: `make demo` (the whole recipe on the bundled model) and `make test`.
# Everything installs into .venv from this repo's files. TORCH picks the torch build: the default
# is the CPU wheel CI uses; on a GPU machine run e.g. `make test TORCH='torch>=2.11'`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test assets clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -r requirements.txt
	touch $@

assets: $(VENV)/installed
	$(PY) data/fetch_offline.py

test: assets
	$(PY) -m pytest -q tests

demo: assets
	$(PY) demo.py

clean:
	rm -rf $(VENV) output
