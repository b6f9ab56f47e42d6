# Two entry points: `make demo` (the whole recipe on the bundled model) and `make test`.
# Everything installs into .venv from this repo's files. TORCH picks the torch build: the default
# is the CPU wheel CI uses; on a GPU machine run e.g. `make test TORCH='torch>=2.11'`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-full assets gpu-carry clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -r requirements.txt
	touch $@

assets: $(VENV)/installed
	$(PY) data/fetch_offline.py

test: assets
	$(PY) -m pytest -q -m "not full" tests

test-full: assets
	$(PY) -m pytest -q tests

demo: assets
	$(PY) demo.py

# What bench/gpu_check.sh needs on a GPU machine with no hub access: the bundled tokenizer (not the
# weights) and the langdetect wheel (built here: PyPI has only its source).
gpu-carry: assets
	mkdir -p .cache/gpu/wheels
	cp .cache/models/SmolLM2-135M-Instruct/tokenizer.json .cache/models/SmolLM2-135M-Instruct/tokenizer_config.json \
		.cache/models/SmolLM2-135M-Instruct/chat_template.jinja .cache/gpu/
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir .cache/gpu/wheels langdetect==1.0.9 six

clean:
	rm -rf $(VENV) output
