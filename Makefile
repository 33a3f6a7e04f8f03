# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install the project on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These torch wheels lie on our machines' disk; override TORCH_SPEC elsewhere (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# The suite on both cores (pytest-xdist); a test file is the unit, so its module fixtures
# (servers, indexes) are built once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

.PHONY: install test test-slow test-all lint demo clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[all,dev,demo]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# make test: every test but the few marked slow (2M vectors, the demo, torchrun and SIGKILL
# runs in fresh processes); make test-slow: those; CI (.ci/run) runs both.
test: install lint
	$(PYTEST) -m 'not slow'

test-slow: install
	$(PYTEST) -m slow

test-all: install lint
	$(PYTEST)

demo: install
	$(VENV)/bin/mocoserve demo --out demo-output

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
