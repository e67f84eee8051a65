#!/usr/bin/env bash
# The whole suite: formatting, lints, and `cargo test --workspace` with every storage test on
# both SQLite and PostgreSQL. Installs and starts what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_rust

# sipp (Debian sip-tester) is the real SIP peer of the interop tests (tests/calls_sip.rs).
apt_install_missing cc:gcc node:nodejs npm:npm sipp:sip-tester espeak-ng:espeak-ng python3:python3 curl:curl jq:jq
# baresip (Debian) is the real softphone of the device tests (tests/devices.rs).
apt_install_missing baresip:baresip
export SAUTIKIT_REQUIRE_BARESIP=1
# Headless Chromium renders `sautikit loadtest --report`'s page offline (tests/loadtest.rs).
apt_install_missing chromium:chromium
export SAUTIKIT_REQUIRE_CHROMIUM=1

# The guide's Express handler runs under Node with express from npm (tests/express.rs).
if [ ! -d tests/node/node_modules/express ]; then
    (cd tests/node && npm ci --no-audit --no-fund --silent)
fi
export SAUTIKIT_REQUIRE_NODE=1

# The guide's FastAPI /voice handler runs under uvicorn in a virtual environment (tests/media.rs);
# the media-stream agent (tests/streams.rs) uses websockets there too, and schemathesis checks the
# server against its OpenAPI document (tests/openapi.rs); sipvicious scans it (tests/sipvicious.rs).
if ! tests/python/.venv/bin/python -c 'import uvicorn, fastapi, websockets, schemathesis, sipvicious' 2>/dev/null; then
    python3 -m venv tests/python/.venv 2>/dev/null || {
        # Debian's python3 needs its venv package.
        rm -rf tests/python/.venv
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv tests/python/.venv
    }
    tests/python/.venv/bin/pip install -q -r tests/python/requirements.txt
fi
export SAUTIKIT_REQUIRE_SCHEMATHESIS=1 SAUTIKIT_REQUIRE_SIPVICIOUS=1

# PostgreSQL: use the server on 127.0.0.1:5432 if one answers; otherwise start or install one.
if [ -z "${SAUTIKIT_TEST_POSTGRES_URL:-}" ]; then
    if ! port_open 127.0.0.1 5432; then
        if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
            apt_install_missing pg_ctlcluster:postgresql
        fi
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        for _ in $(seq 1 30); do port_open 127.0.0.1 5432 && break; sleep 1; done
        # A freshly installed cluster wants a password over TCP: give the test user one.
        su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
    fi
    export SAUTIKIT_TEST_POSTGRES_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
fi
# Every storage test must run on PostgreSQL too: a missing server fails the suite.
export SAUTIKIT_REQUIRE_POSTGRES=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The binary as scripts/run.sh builds it: without the test dependencies' features.
cargo check --quiet --bin sautikit
cargo test --workspace

# A bounded run of every fuzz target (scripts/fuzz.sh): the seeds, the inputs of past crashes,
# then a few seconds of new inputs each.
fuzz_seconds=${SAUTIKIT_FUZZ_SECONDS:-10}
if [ "$fuzz_seconds" != 0 ]; then
    bash scripts/fuzz.sh "$fuzz_seconds"
fi
