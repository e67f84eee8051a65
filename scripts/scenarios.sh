#!/usr/bin/env bash
# Every `sautikit loadtest` scenario once against a release `sautikit serve` (dev mode, SQLite)
# on this machine, one line of figures each, from the scenarios' JSON. The server's outbound
# trunk is the load test's own (127.0.0.1:25090), and its limits on placed calls are raised
# above the load. Usage: scripts/scenarios.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_rust
apt_install_missing jq:jq

seconds=${1:-30}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# SAUTIKIT_BIN: a release binary built elsewhere (a worktree of the commit measured).
bin=${SAUTIKIT_BIN:-target/release/sautikit}
[ -n "${SAUTIKIT_BIN:-}" ] || cargo build --release --quiet --bin sautikit
ulimit -n 65536 2>/dev/null || true
data="$work/sautikit-data"
SAUTIKIT_MODE=dev SAUTIKIT_DATA_DIR="$data" SAUTIKIT_HTTP_LISTEN=127.0.0.1:25080 \
    SAUTIKIT_SIP_LISTEN=127.0.0.1:25060 SAUTIKIT_LOG=warn \
    SAUTIKIT_OUTBOUND_TRUNK=sip:127.0.0.1:25090 SAUTIKIT_CALLS_PER_SECOND=10000 \
    SAUTIKIT_MAX_LIVE_API_CALLS=100000 \
    "$bin" serve >"$work/serve.out" 2>"$work/serve.err" &
for _ in $(seq 1 100); do port_open 127.0.0.1 25080 && break; sleep 0.1; done
export SAUTIKIT_API_KEY
SAUTIKIT_API_KEY=$(jq -r .api_key "$data/dev-credentials.json")
export SAUTIKIT_API_URL=http://127.0.0.1:25080 SAUTIKIT_SIP_SERVER=127.0.0.1:25060

# Runs one scenario (its JSON in $work/<name>.json) and prints its line from the jq filter $2.
scenario() {
    local name=$1 filter=$2
    shift 2
    "$bin" loadtest "$@" --max-failed 1000000 --json "$work/$name.json" \
        >"$work/$name.out" 2>&1 || true
    printf '%-9s %s\n' "$name" "$(jq -r "$filter" "$work/$name.json")"
}
# The target's CPU while load was offered, from the scenario's samples of its process.
cores='([.timeline[] | select(.offered > 0) | .target_cores] | add / length)'

echo "scenarios for $seconds s each ($(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"
scenario inbound "\"\(.calls.completed) of \(.calls.attempted) completed, \(.calls.failed) failed; INVITE→200 p50 \(.setup_ms.p50 * 100 | floor / 100) ms p99 \(.setup_ms.p99 * 100 | floor / 100) ms; target \($cores * 1000 | floor / 1000) cores; load test \(.harness_cores * 1000 | floor / 1000) cores\"" \
    inbound --rate 500 --duration "$seconds" --hold 1 --numbers 100
scenario hold "\"\(.calls.answered) calls held \(.rtp.window_seconds | floor) s: \(.rtp.packets_in_window) of \(.rtp.packets_expected) packets, lost \(.rtp.lost), header errors \(.rtp.timestamp_errors + .rtp.ssrc_changes + .rtp.payload_type_errors + .rtp.payload_size_errors + .rtp.malformed); |Δt−20 ms| p99 \(.spacing_ms.deviation_p99 * 1000 | floor / 1000) ms; target \(.target_cores * 1000 | floor / 1000) cores, \(.target_rss_mib | floor) MiB\"" \
    hold --calls 1000 --duration "$seconds" --ramp 200 --numbers 100
scenario register "\"\(.registrations.completed) of \(.registrations.attempted) completed, \(.registrations.failed) failed; REGISTER→200 p50 \(.register_ms.p50 * 100 | floor / 100) ms p99 \(.register_ms.p99 * 100 | floor / 100) ms; \(.bindings_listed) bindings listed; target \($cores * 1000 | floor / 1000) cores\"" \
    register --credentials 1000 --rate 1000 --duration "$seconds"
scenario outbound "\"\(.calls.completed) of \(.calls.attempted) completed, \(.calls.failed) failed; API→INVITE p50 \(.api_to_invite_ms.p50 * 100 | floor / 100) ms p99 \(.api_to_invite_ms.p99 * 100 | floor / 100) ms; 200→RTP p99 \(.answer_to_rtp_ms.p99 * 100 | floor / 100) ms; target \($cores * 1000 | floor / 1000) cores\"" \
    outbound --trunk-listen 127.0.0.1:25090 --rate 200 --duration "$seconds" --hold 1
scenario webhooks "\"\(.events.delivered) of \(.events.expected) events delivered (\(.events.duplicates) twice, \(.events.calls_out_of_order) calls out of order); first \(.drain.first_delivery_after_up_s * 100 | floor / 100) s after the receiver came back, \(.drain.deliveries_per_second | floor) deliveries/s\"" \
    webhooks --calls $((seconds * 100)) --rate 300 --numbers 100
