# dicomfleet: `make demo` and `make test` work as root on a fresh Debian bookworm
# machine; they install the Debian packages and the virtual environment they need.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INVENTORY ?= inventory/lab.yml
# The 2 GB transfer test (marked slow) runs with `make test PYTEST_ARGS=`; make bench
# measures the same.
PYTEST_ARGS ?= -m "not slow"

# Debian packages the control machine needs: Orthanc and DCMTK for tests and
# benchmarks, systemd-nspawn and debootstrap for the lab hosts, ssh for deploys,
# chromium for the dashboard's browser tests and prometheus for promtool, which
# checks the rendered alert rules; nft checks the rendered firewall rules and
# postgresql-common's unit files let the tests score the PostgreSQL sandbox.
APT_PACKAGES := orthanc dcmtk systemd-container debootstrap openssh-client sqlite3 curl chromium prometheus openssl nftables postgresql-common

.PHONY: help deps venv lab-up lab-down deploy demo test bench clean

help:
	@echo "make demo      build the lab, deploy it with pyinfra, send real images, show where they landed"
	@echo "make test      run the test suite (installs what it needs)"
	@echo "make bench     run the benchmarks (QUICK=1 for a short run)"
	@echo "make lab-up    boot the lab hosts of INVENTORY (default $(INVENTORY))"
	@echo "make lab-down  stop the lab hosts of INVENTORY"
	@echo "make deploy    deploy INVENTORY with pyinfra"

$(VENV)/.apt-done:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(BIN)/dicomfleet: pyproject.toml $(VENV)/.apt-done
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[control,test]'
	@touch $@

deps: $(BIN)/dicomfleet

venv: deps

lab-up: deps
	$(BIN)/dicomfleet lab up $(INVENTORY)

lab-down: deps
	$(BIN)/dicomfleet lab down $(INVENTORY)

deploy: deps
	$(BIN)/dicomfleet deploy $(INVENTORY)

demo: lab-up
	$(BIN)/dicomfleet deploy $(INVENTORY)
	$(BIN)/dicomfleet demo $(INVENTORY)

# pytest exits 5 when it collected no test; that is a failure here too, but
# with a message that says so.
test: deps
	@$(BIN)/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no test: nothing was checked." >&2; exit 1; fi; \
	exit $$status

bench: deps
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

clean:
	rm -rf build test-artifacts
