# vmha developer entry points. The two a newcomer needs:
#   make demo   the whole system on this machine (control plane, operator, two node agents,
#               three QEMU guests) and a guided tour
#   make test   lint, type-check and run every test tier (unit, integration, end-to-end)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: dev system-deps toolchain lint test unit demo bench clean

$(VENV)/.installed: requirements-dev.txt */pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

dev: $(VENV)/.installed

system-deps:
	hack/install-system-deps.sh

# kube-apiserver, kubectl and helm from the Go module proxy, cached in ~/.cache/vmha.
toolchain:
	hack/build-toolchain.sh

lint: dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy protocol/src guest/src guest/examples node-agent/src operator/src testbed/src tests bench
	shellcheck hack/*.sh .ci/run

unit: dev
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test: system-deps lint toolchain
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: system-deps dev toolchain
	$(PY) -m vmha_testbed.demo

bench: system-deps dev
	$(PY) -m bench.heartbeat
	$(PY) -m bench.heartbeat.floor
	$(PY) -m bench.cluster
	$(PY) -m bench.messaging

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
