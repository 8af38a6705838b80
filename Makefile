# Two commands do all the set-up: `make demo` (the default sweep) and `make test`.
# Both create or reuse .venv and install the package and the offline assets first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dmvae-installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install demo test test-all clean-runs

$(STAMP): pyproject.toml scripts/install_assets.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	bash scripts/install_assets.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmark.grid $(ARGS)

# `make test` leaves out the tests marked `measurement` (they retrain a preset's dm teacher to
# its plateau, ~10 min); `make test-all` runs them too.
test: $(STAMP)
	$(PY) -m pytest -q -m "not measurement" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
