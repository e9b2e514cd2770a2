# Set-up and tests on a fresh machine with Python 3.10+ (README, "Install"):
#   make demo        the whole DD pipeline on the bundled tiny teachers (scripts/demo.py)
#   make test        the default test suite (python -m pytest)
#   make test-slow   the long tests (python -m pytest -m slow)
# Each one creates the venv when missing and obtains Fashion-MNIST before it runs.
# VENV=<dir> uses another venv (CI keeps one per dependency hash under ~/.cache/dd); ARGS="..." goes to pytest or
# to the demo, e.g. make test ARGS="tests/test_data.py -x".

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PY := $(VENV)/bin/python
FMNIST_PACKAGE := dataset-fashion-mnist

.PHONY: test test-slow demo venv data

test: venv data
	$(PY) -m pytest $(ARGS)

test-slow: venv data
	$(PY) -m pytest -m slow $(ARGS)

demo: venv data
	$(PY) scripts/demo.py $(ARGS)

# The .complete stamp is written only once pip has succeeded, so an interrupted install is finished next time. A venv
# shared between clones (CI's) gets its editable install pointed at this clone (-I: the check must not see ./dd).
venv:
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv "$(VENV)"; fi
	@if [ ! -f "$(VENV)/.complete" ]; then \
	  "$(PY)" -m pip install -q --upgrade pip && \
	  "$(PY)" -m pip install -c constraints.txt -e ".[test]" && touch "$(VENV)/.complete"; \
	elif ! "$(PY)" -I -c 'import dd, pathlib, sys; sys.exit(pathlib.Path(dd.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())' "$(CURDIR)" 2>/dev/null; then \
	  echo "pointing the dd install of $(VENV) at $(CURDIR)"; \
	  "$(PY)" -m pip install -q --no-deps --no-build-isolation -e .; \
	fi

# Fashion-MNIST: the Debian package where apt-get can install it (as root), otherwise a download into
# ~/.cache/dd/fashion-mnist (DD_FMNIST_DIR, DD_FMNIST_MIRROR); with neither, one line says what to do.
data: venv
	@if ! "$(PY)" -m dd.data.get_fashion_mnist --check >/dev/null 2>&1 \
	    && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing the Debian package $(FMNIST_PACKAGE)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FMNIST_PACKAGE); } \
	    || echo "apt-get could not install $(FMNIST_PACKAGE); downloading instead"; \
	fi
	@"$(PY)" -m dd.data.get_fashion_mnist
