# Two commands for a fresh machine (README.md): `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TEST_DB ?= gradhealth_test
PG_ADMIN_URL ?= postgresql://postgres@127.0.0.1:5432/postgres

# Tools the tests need beyond Python packages, from Debian: Chromium for the browser tests
# (Playwright's own download needs a network at test time) and docker-compose to validate
# docker-compose.yml where Docker has no compose plugin. Root installs them, anyone else sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve test lint postgres test-tools

$(BIN)/gradhealth: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (small); the project's `torch>=` range is then already satisfied.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# the engine's C++ loops (service/engine/native), compiled for this torch; without a C++
	# compiler the service still runs (the same loops in Python, slower) and its tests say why
	$(BIN)/gradhealth build-native || echo "warning: gradhealth build-native failed (see above): recurrent layers will run their Python loops" >&2
	touch $(BIN)/gradhealth

test-tools:
	@missing=""; \
	test -x /usr/bin/chromium || missing="chromium"; \
	command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
		|| missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends $$missing; fi

install: $(BIN)/gradhealth

serve: install
	$(BIN)/gradhealth serve

postgres:
	scripts/ensure-postgres.sh "$(PG_ADMIN_URL)" "$(TEST_DB)"

lint: install
	$(BIN)/ruff check service tests bench scripts
	$(BIN)/ruff format --check service tests bench scripts
	$(BIN)/mypy

test: install test-tools postgres
	GRADHEALTH_TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/$(TEST_DB) \
		$(BIN)/pytest $(PYTEST_ARGS)
