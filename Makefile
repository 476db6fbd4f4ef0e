# `make serve` and `make test` each do all set-up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps serve test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@

install: $(STAMP)

# The tests start real servers from Debian's packages: PostgreSQL, and an OCI registry
# (distribution's docker-registry) for model push/pull; openssl signs its test tokens.
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -x /usr/bin/docker-registry ] || missing="$$missing docker-registry"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		echo "installing from Debian's packages:$$missing"; \
		$(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# The API on 127.0.0.1:8080 (make serve PORT=9000 HOST=0.0.0.0; or GPUFLEET_PORT, GPUFLEET_HOST)
# and a worker serving the demo model, on SQLite under the data dir.
serve: install
	$(BIN)/gpufleet serve $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy src

pytest: install system-deps
	$(BIN)/pytest

test: lint typecheck pytest

bench: install system-deps
	$(BIN)/python bench/queue_bench.py --json bench/results/queue_bench.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
