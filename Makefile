# Two commands for a fresh machine (README.md): `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TEST_DB ?= gradhealth_test
PG_ADMIN_URL ?= postgresql://postgres@127.0.0.1:5432/postgres

# The browser tests drive Debian's Chromium (Playwright's own download needs a network at test
# time); root installs it directly, anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install serve test lint postgres chromium

$(BIN)/gradhealth: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (small); the project's `torch>=` range is then already satisfied.
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/gradhealth

chromium:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends chromium; }

install: $(BIN)/gradhealth chromium

serve: install
	$(BIN)/gradhealth serve

postgres:
	scripts/ensure-postgres.sh "$(PG_ADMIN_URL)" "$(TEST_DB)"

lint: install
	$(BIN)/ruff check service tests bench scripts
	$(BIN)/ruff format --check service tests bench scripts
	$(BIN)/mypy

test: install postgres
	GRADHEALTH_TEST_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/$(TEST_DB) \
		$(BIN)/pytest $(PYTEST_ARGS)
