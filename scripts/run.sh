#!/usr/bin/env bash
# Run Sautikit in dev mode on SQLite: installs what is missing, builds, and starts the server.
# A fresh data directory gets a seeded Kenyan inventory and a `dev` workspace with KES 1,000.00;
# the API key, webhook secret and the guide's first curl command are printed on start.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_rust

# curl and jq: the guide's commands use them.
# espeak-ng speaks `say`.
apt_install_missing curl:curl jq:jq cc:gcc espeak-ng:espeak-ng

export SAUTIKIT_MODE="${SAUTIKIT_MODE:-dev}"
[ -x target/release/sautikit ] || echo "building sautikit (release): the first build takes about 15 minutes on 2 cores" >&2
exec cargo run --release --bin sautikit -- serve "$@"
