# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
JAX_VERSION := 0.10.2
STAMP := $(VENV)/.installed

.PHONY: test test-heavy demo venv clean

$(STAMP): setup.py
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# libtpu: lets this CPU machine compile (not run) for TPU, for the ahead-of-time tests.
	$(BIN)/pip install -q "jax[tpu]==$(JAX_VERSION)"
	touch $(STAMP)

venv: $(STAMP)

# The suite runs on 8 forced CPU devices (tests/conftest.py sets XLA_FLAGS before JAX starts).
# `-m` is explicit in both targets (pytest.ini's addopts says the same for a bare `pytest`; a later -m wins).
# Two pytest workers (pytest-xdist), one test file each at a time: module fixtures stay in one process, and
# while one worker compiles (single-threaded) the other runs. PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not heavy" -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests

# The demo: a tiny hybrid DeepSeek-VL learns the embedded task suite on this CPU (see README, "The demo").
# Flags: make demo DEMO_ARGS="--steps 2000 --token-merge both" (python -m dsvl_jax.demo --help lists them).
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/python -m dsvl_jax.demo $(DEMO_ARGS)

# Exactly the tests marked heavy (real-width models, long soaks); `make test` runs shorter variants of them.
test-heavy: $(STAMP)
	$(BIN)/python -m pytest -q -m heavy -n $(PYTEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
