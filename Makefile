# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv/.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps demo test test-fast bench device-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,mindformers]"
	@touch $(STAMP)

# Debian packages the tests need and pip cannot install: chromium (the browser test of the chat page) and a
# CJK font (the page's Chinese). Installed quietly with apt-get when missing and when root; otherwise said.
system-deps:
	@missing=""; test -x /usr/bin/chromium || missing="chromium"; \
	if ! (command -v fc-list >/dev/null && fc-list :lang=zh | grep -q .); then missing="$$missing fonts-wqy-zenhei"; fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "make: installing$$missing (apt-get) for the browser test"; \
	    log=$$(mktemp); export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get -qq update && apt-get -qq install -y --no-install-recommends $$missing; } >$$log 2>&1 \
	      || { tail -20 $$log >&2; rm -f $$log; echo "make: apt-get install$$missing failed" >&2; exit 1; }; \
	    rm -f $$log; \
	  else echo "make: not installed:$$missing (needs root and apt-get); the browser test is skipped" >&2; fi; \
	fi

demo: setup
	$(PY) scripts/demo.py

# pytest exits 5 when it collected no tests: a failure here, said plainly (make itself then exits 2).
# TEST_WORKERS pytest processes (pytest-xdist), each test file on one of them (its module fixtures and
# compiled graphs built once); TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: setup system-deps
	@$(PY) -m pytest $(XDIST) $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc; }

test-fast: setup system-deps
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/run_all.py

# The accelerator check (README, "Device check"): DEVICE=cuda (default, one NVIDIA GPU) or DEVICE=ascend.
# Writes output/device_check/device_check.{json,md}; fails when any step fails or cannot run.
DEVICE ?= cuda
device-check: setup
	$(PY) scripts/device_check.py --device $(DEVICE) $(DEVICE_CHECK_ARGS)

clean:
	rm -rf $(VENV) output build *.egg-info
