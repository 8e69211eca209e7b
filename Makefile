# Two commands on a fresh machine: `make demo` and `make test`. Everything goes into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch (on these machines it lies on local disk; elsewhere pip fetches it).
TORCH := torch==2.13.0
PYTEST := $(PY) -m pytest -q -p no:cacheprovider
# The default run's tests on this many processes (pytest-xdist): on 2 cores, 16.5 minutes for the
# three backends against 24-28 on one process each.
TEST_WORKERS ?= 2

.PHONY: demo test test-tensorflow test-jax test-torch bench docs figures lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.demo.stamp: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[tensorflow,demo]"
	touch $@

$(VENV)/.test.stamp: pyproject.toml | $(PY)
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[tensorflow,jax,torch,test]"
	touch $@ $(VENV)/.demo.stamp

demo: $(VENV)/.demo.stamp
	$(VENV)/bin/jacket demo

# The suite once per Keras backend, each in its own process (Keras fixes the backend per process).
test: $(VENV)/.test.stamp
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports --no-cache
	KERAS_BACKEND=tensorflow $(PYTEST) -m "not slow" -n $(TEST_WORKERS)
	KERAS_BACKEND=jax JAX_ENABLE_X64=1 $(PYTEST) -m "not slow" -n $(TEST_WORKERS)
	KERAS_BACKEND=torch $(PYTEST) -m "not slow" -n $(TEST_WORKERS)

test-tensorflow test-jax test-torch: test-%: $(VENV)/.test.stamp
	KERAS_BACKEND=$* $(PYTEST)

$(VENV)/.bench.stamp: pyproject.toml | $(VENV)/.test.stamp
	$(PIP) install --quiet -e ".[tensorflow,jax,torch,test,bench]"
	touch $@

bench: $(VENV)/.bench.stamp
	$(PY) benchmarks/run.py $(ARGS)

# The documentation site (mkdocs-material; the API reference from the docstrings) into site/.
$(VENV)/.docs.stamp: pyproject.toml | $(PY)
	$(PIP) install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs.stamp
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The figures of the documentation that jacket draws (docs/figures.py), written into docs/.
figures: $(VENV)/.demo.stamp
	$(PY) docs/figures.py

lint: $(VENV)/.test.stamp
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) jacket-demo .pytest_cache build *.egg-info src/*.egg-info
