# `make serve` and `make test` each do all set-up on a fresh machine, then run.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
SUDO    = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# pytest's worker processes (pytest-xdist); PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= auto
PYTEST_XDIST    = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

# Two stamps: serving needs gpufleet's runtime dependencies only (numpy runs the demo model);
# the tests add the dev and bench extras (torch, transformers, onnx, mypy, the benchmarks'
# peers). The dev install also stamps the runtime one, so `make serve` after `make test`
# installs nothing, and `make test` after `make serve` adds only the extras.
SERVE_STAMP = $(VENV)/.installed-serve
DEV_STAMP   = $(VENV)/.installed-dev

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $@ $(SERVE_STAMP)

.PHONY: install install-dev system-deps serve test test-fast lint typecheck pytest bench clean

install: $(SERVE_STAMP)

install-dev: $(DEV_STAMP)

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

lint: install-dev
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: install-dev
	$(BIN)/mypy src

pytest: install-dev system-deps
	$(BIN)/pytest $(PYTEST_XDIST)

# Lint first (a second), then the type check beside the tests rather than before them: on a
# clean clone (a cold cache) mypy works one core for about 90 s, which before the tests left
# the other core idle that long. Output is not synced (make's -O holds a command's output
# until it ends, pytest's too): mypy's one line may land among pytest's progress dots.
test: lint
	$(MAKE) --no-print-directory -j2 typecheck pytest

# The edit loop: lint, then the tests not marked slow (no benchmark smokes, no `gpufleet serve`
# end to end, no crash tests), in parallel. `make test` before a commit.
test-fast: lint install-dev system-deps
	$(BIN)/pytest $(PYTEST_XDIST) -q -m "not slow"

bench: install-dev system-deps
	$(BIN)/python bench/queue_bench.py --json bench/results/queue_bench.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
