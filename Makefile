# Two commands for a fresh machine: `make demo` and `make test`.
# Each builds its own virtual environment. torch is installed first, pinned to
# the CPU wheel (2.13.0), so nothing later can pull a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint venv system-deps

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Real Prometheus and Alertmanager for the integration tests (Debian packages).
system-deps:
	@if ! command -v prometheus >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager; \
	fi
	@# HAProxy shards healthd by job in tests/integration/test_sharding.py (deploy/haproxy/haproxy.cfg).
	@if ! command -v haproxy >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends haproxy; \
	fi
	@# nginx checks the nginx equivalent of that config (tests/deploy/test_proxy_configs.py, nginx -t).
	@if ! command -v nginx >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light; \
	fi
	@# openssl makes the TLS test's self-signed certificate (tests/integration/test_tls.py).
	@if ! command -v openssl >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends openssl; \
	fi
	@# Headless Chromium for the status-page / report rendering tests (tests/integration/test_pages_in_browser.py).
	@if ! command -v chromium >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; \
	fi

demo: $(STAMP)
	$(BIN)/healthd demo --fault lr-too-high

lint: $(STAMP)
	$(BIN)/ruff check healthd client tests bench dashboards
	$(BIN)/mypy

test: $(STAMP) system-deps
	$(BIN)/ruff check healthd client tests bench dashboards
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider
