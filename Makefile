# encfs gateway. `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup container-root bytecode test demo lint bench bench-rotation clean install uninstall

setup: $(STAMP) container-root

# tests/container's Debian 12 root and wheelhouse, cached in /var/cache/encfs-gw-test
# (made once; a no-op when they are there).
container-root: $(STAMP)
	bash scripts/container-root.sh

# Re-run setup when the dependency lists change; every step below is idempotent.
$(STAMP): pyproject.toml deps/apt.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

# encfs/ is an editable install: compile its bytecode as an installed package has it, or
# every daemon start compiles the sources again when PYTHONDONTWRITEBYTECODE is set.
bytecode: setup
	$(PY) -m compileall -q encfs >/dev/null

# After the whole suite, the fs and integration tiers again on pyfuse3's stock request
# loop (what -o request_loop=auto falls back to on an unvalidated trio or pyfuse3;
# encfs/daemon/request_loop.py): every mount the tests make inherits the mode. Tests of
# the accelerated loop's own helpers skip themselves in that pass.
STOCK_LOOP_TIERS := tests/fs tests/integration

test: setup bytecode
	$(PY) -m ruff check encfs tests scripts bench
	$(PY) -m pytest $(PYTEST_ARGS)
	ENCFS_GW_REQUEST_LOOP=stock $(PY) -m pytest $(PYTEST_ARGS) $(STOCK_LOOP_TIERS)

demo: setup bytecode
	bash scripts/demo.sh

bench: setup bytecode
	bash bench/install.sh
	$(PY) bench/run.py $(if $(QUICK),--quick) $(if $(BASELINE),--baseline $(BASELINE))

# Issue 5's measure: a 4 GiB volume, the re-wrap pass against re-encrypting by copy.
bench-rotation: setup bytecode
	$(PY) bench/rotation.py $(if $(QUICK),--quick)

# As root: the package (its own venv), the unit, the mount(8) helper; see docs/systemd.md.
install:
	sh systemd/install.sh install

uninstall:
	sh systemd/install.sh uninstall

lint: setup
	$(PY) -m ruff check encfs tests scripts bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
