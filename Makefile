# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,mindformers]"
	@touch $(STAMP)

demo: setup
	$(PY) scripts/demo.py

# pytest exits 5 when it collected no tests: a failure here, said plainly (make itself then exits 2)
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc; }

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) output build *.egg-info
