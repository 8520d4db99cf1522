# milter-wkd — the two commands a fresh Debian 12 machine needs, as root:
#   make test   install what is missing, then ruff, mypy --strict and the test suite
#   make demo   run the system on loopback and show it working
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The suite runs on Python 3.13 too (Debian 13's python3; these machines carry pyenv's).
PYTHON313 ?= $(firstword $(wildcard /root/.pyenv/versions/3.13*/bin/python3.13) \
                         $(shell command -v python3.13 2>/dev/null))
VENV313 := .venv-3.13
# Real peers the tests and the demo drive (see ../shared/RECIPES.md; headless Chromium and
# certutil for the browser tests), and the headers pymilter and python-ldap build against.
DEBS := slapd ldap-utils postfix dovecot-core dovecot-ldap dovecot-lmtpd dovecot-imapd \
        gnupg dirmngr gpg-wks-client gpg-wks-server sq libmilter-dev swaks nginx wrk gcc \
        libldap-dev libsasl2-dev opendkim opendkim-tools \
        chromium chromium-driver libnss3-tools
DEMO_ARGS ?=
# Seconds each fuzz target runs in `make fuzz` (the CI-sized run is part of the tests).
FUZZ_SECONDS ?= 60

.PHONY: test demo debs venv lint typecheck pytest pytest-3.13 clean bench fuzz translations \
        portal-assets

test: debs venv portal-assets lint typecheck pytest pytest-3.13

debs:
	@missing=$$(for p in $(DEBS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The stamp follows pyproject.toml, so a re-run with nothing new costs nothing.
venv: $(VENV)/.stamp portal-assets
$(VENV)/.stamp: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

lint: venv
	$(VENV)/bin/ruff check milter_wkd tests benchmarks fuzz

typecheck: venv
	$(VENV)/bin/mypy --strict milter_wkd

pytest: venv
	$(VENV)/bin/pytest -q

$(VENV313)/.stamp: pyproject.toml
	@test -x $(VENV313)/bin/python || $(PYTHON313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install -q --upgrade pip
	$(VENV313)/bin/python -m pip install -q -e '.[test]'
	@touch $@

# On CI a missing 3.13 is a failure; on a developer's machine the run is skipped, said so.
pytest-3.13:
	@if [ -z "$(PYTHON313)" ]; then \
	  if [ -n "$$CI" ]; then echo "no Python 3.13: CI must run the suite on it" >&2; exit 1; fi; \
	  echo "no Python 3.13 here (set PYTHON313=...): the 3.13 run is skipped"; \
	else \
	  $(MAKE) --no-print-directory $(VENV313)/.stamp && $(VENV313)/bin/pytest -q; \
	fi

# Coverage-guided fuzzing (atheris) of every parser of outside bytes, FUZZ_SECONDS per target:
# executions, exec/s, crashes, slow inputs and peak memory per target (fuzz/run.py).
fuzz: venv
	$(PY) -m fuzz.run --seconds $(FUZZ_SECONDS)

demo: debs venv
	$(PY) -m milter_wkd.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(VENV313) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# The self-service page's catalogues: new strings from the code and templates into each
# language's .po (translate them there), then the .mo files the page reads.
translations: venv
	$(VENV)/bin/pybabel extract -F milter_wkd/portal/babel.cfg -k _ -k gettext \
	    -o milter_wkd/portal/translations/messages.pot .
	$(VENV)/bin/pybabel update -i milter_wkd/portal/translations/messages.pot \
	    -d milter_wkd/portal/translations
	$(VENV)/bin/pybabel compile -d milter_wkd/portal/translations

# OpenPGP.js for the key-generation page (milter_wkd/portal/static/vendor/), pinned: the npm
# tarball's version and sha512 integrity (`npm view openpgp@6.3.2 dist.integrity`) and the
# sha256 of the two files taken from it. The files are committed (the wheel carries them);
# this target checks them, and fetches them again from the registry when missing or changed.
OPENPGPJS_VERSION := 6.3.2
OPENPGPJS_TARBALL := https://registry.npmjs.org/openpgp/-/openpgp-$(OPENPGPJS_VERSION).tgz
OPENPGPJS_INTEGRITY := sha512-wcZTzHz41LV8Y48zH/JlD1JT8YdNmpWOuMAjQ/podvvCwsjBEU37K3znJh4UQcj3hksE5z9TzvhbUbwzsGvlLQ==
OPENPGPJS_DIR := milter_wkd/portal/static/vendor
OPENPGPJS_SHA256 := e19bf4f04f34f24caded3ff3f3643099538b2674a0a94221e2faca75ac3e4aa1  $(OPENPGPJS_DIR)/openpgp-$(OPENPGPJS_VERSION).min.js
OPENPGPJS_LICENSE_SHA256 := e3a994d82e644b03a792a930f574002658412f62407f5fee083f2555c5f23118  $(OPENPGPJS_DIR)/openpgp-$(OPENPGPJS_VERSION).LICENSE.txt

portal-assets:
	@if printf '%s\n%s\n' "$(OPENPGPJS_SHA256)" "$(OPENPGPJS_LICENSE_SHA256)" \
	    | sha256sum --check --status 2>/dev/null; then exit 0; fi; \
	echo "fetching OpenPGP.js $(OPENPGPJS_VERSION) from $(OPENPGPJS_TARBALL)"; \
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	curl -fsSL --retry 3 -o "$$tmp/openpgp.tgz" "$(OPENPGPJS_TARBALL)" && \
	got="sha512-$$(openssl dgst -sha512 -binary "$$tmp/openpgp.tgz" | base64 -w0)" && \
	if [ "$$got" != "$(OPENPGPJS_INTEGRITY)" ]; then \
	  echo "openpgp-$(OPENPGPJS_VERSION).tgz: integrity $$got, pinned $(OPENPGPJS_INTEGRITY)" >&2; \
	  exit 1; fi && \
	tar -xzf "$$tmp/openpgp.tgz" -C "$$tmp" package/dist/openpgp.min.js package/LICENSE && \
	mkdir -p $(OPENPGPJS_DIR) && \
	cp "$$tmp/package/dist/openpgp.min.js" $(OPENPGPJS_DIR)/openpgp-$(OPENPGPJS_VERSION).min.js && \
	cp "$$tmp/package/LICENSE" $(OPENPGPJS_DIR)/openpgp-$(OPENPGPJS_VERSION).LICENSE.txt && \
	printf '%s\n%s\n' "$(OPENPGPJS_SHA256)" "$(OPENPGPJS_LICENSE_SHA256)" | sha256sum --check
