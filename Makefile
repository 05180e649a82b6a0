# One-command set-up on a fresh Debian machine: `make serve` and `make test` create the
# virtual environment (and, for tests, install the system tools the tests drive).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := nginx-light prometheus systemd wrk libb64-0d g++ python3-dev

.PHONY: serve test lint format system-deps bench clean proto

# Debian's python3 does not bring venv's ensurepip (package python3-venv, only suggested):
# without it `python3 -m venv` fails on a fresh machine, so install it first (as root).
$(STAMP): pyproject.toml
	@python3 -c 'import ensurepip' 2>/dev/null || { echo "installing: python3-venv"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends python3-venv; }
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ringserve serve

# Tools the tests use for real (nginx in front, promtool for alert rules,
# systemd-analyze for unit files, perf_analyzer for the v2 protocol, a C++ compiler and
# Python's headers for torch.compile's CPU kernels). In CI a missing tool is a failure,
# so install them rather than skip.
system-deps:
	@missing=""; \
	command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	dpkg -s libb64-0d >/dev/null 2>&1 || missing="$$missing libb64-0d"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	[ -f "$$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@[ -x .venv-perf/bin/pa ] || [ ! -f .ci/install_perf_analyzer.sh ] || bash .ci/install_perf_analyzer.sh

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# frontend/grpc_v2/descriptor.py from inference.proto (a test checks they agree)
proto: $(STAMP)
	$(PY) frontend/grpc_v2/gen.py

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .venv-perf
