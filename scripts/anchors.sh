#!/usr/bin/env bash
# The SIP anchors of BENCHMARKS.md, measured in one sitting beside the engine, so that the
# engine's figure can be read as a ratio on a shared, noisy machine:
#   1. sipp UAC against sipp UAS: the box's SIP ceiling;
#   2. sipp UAC against Kamailio, stateless (sl_send_reply): the fastest SIP server's cost;
#   3. `sautikit loadtest inbound` against a release `sautikit serve` (SQLite, dev mode): the
#      whole flow (call rows, voice callback, events, paced RTP while the call is held);
#   4. `sautikit loadtest register` against Kamailio's registrar (auth_db on db_text, usrloc in
#      memory, SHA-256 challenges with qop=auth and nonce counts checked) and against ours, with
#      CREDENTIALS softphones registering REG_RATE times a second (each a whole round: REGISTER,
#      401, REGISTER answering the challenge, 200).
# Each runs RATE calls (REG_RATE registrations) a second for SECONDS, each call held HOLD ms,
# and prints the server's CPU in cores.
# Usage: scripts/anchors.sh [RATE] [SECONDS] [HOLD_MS] [REG_RATE] [CREDENTIALS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_rust
apt_install_missing sipp:sip-tester kamailio:kamailio jq:jq bc:bc

rate=${1:-1000}
seconds=${2:-30}
hold_ms=${3:-1000}
reg_rate=${4:-1000}
credentials=${5:-1000}
calls=$((rate * seconds))
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# CPU seconds (user + system) of the given processes.
cpu_of() {
    local total=0 pid
    for pid in "$@"; do
        total=$(echo "$total + $(awk '{print ($14 + $15) / 100}' "/proc/$pid/stat")" | bc -l)
    done
    echo "$total"
}

# Run sipp's UAC against $1 and print "<server> <cores> <successful> <failed>" for pids $3….
measure_sipp() {
    local target=$1 name=$2
    shift 2
    local before start end after
    before=$(cpu_of "$@")
    start=$(date +%s.%N)
    sipp -sn uac "$target" -i 127.0.0.1 -r "$rate" -m "$calls" -d "$hold_ms" -l $((rate * 4)) \
        -nostdin -timeout $((seconds + 60)) >"$work/$name.out" 2>&1 || true
    end=$(date +%s.%N)
    after=$(cpu_of "$@")
    local ok failed
    ok=$(grep -E "^ +Successful call" "$work/$name.out" | tail -n1 | awk -F'|' '{print $3+0}')
    failed=$(grep -E "^ +Failed call" "$work/$name.out" | tail -n1 | awk -F'|' '{print $3+0}')
    printf '%-34s %6.3f cores   %s of %s calls completed, %s failed\n' "$name" \
        "$(echo "($after - $before) / ($end - $start)" | bc -l)" "$ok" "$calls" "$failed"
}

echo "anchors at $rate calls/s for $seconds s, held $hold_ms ms ($(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"

sipp -sn uas -i 127.0.0.1 -p 25070 -nostdin >/dev/null 2>&1 &
uas=$!
sleep 1
measure_sipp 127.0.0.1:25070 "sipp UAS" "$uas"
kill "$uas"

cat >"$work/kamailio.cfg" <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
children=2
listen=udp:127.0.0.1:25072
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "sl.so"
request_route {
    if (method == "ACK") { exit; }
    sl_send_reply("200", "OK");
    exit;
}
EOF
kamailio -f "$work/kamailio.cfg" -P "$work/kamailio.pid" -w "$work" -DD -E >"$work/kamailio.log" 2>&1 &
sleep 2
mapfile -t kam < <(pgrep -f "kamailio -f $work/kamailio.cfg")
measure_sipp 127.0.0.1:25072 "Kamailio stateless" "${kam[@]}"
kill "${kam[@]}" 2>/dev/null || true

# SAUTIKIT_BIN: a release binary built elsewhere (a worktree of the commit measured).
bin=${SAUTIKIT_BIN:-target/release/sautikit}
[ -n "${SAUTIKIT_BIN:-}" ] || cargo build --release --quiet --bin sautikit
data="$work/sautikit-data"
SAUTIKIT_MODE=dev SAUTIKIT_DATA_DIR="$data" SAUTIKIT_HTTP_LISTEN=127.0.0.1:25080 \
    SAUTIKIT_SIP_LISTEN=127.0.0.1:25060 SAUTIKIT_LOG=warn \
    "$bin" serve >"$work/serve.out" 2>"$work/serve.err" &
serve=$!
for _ in $(seq 1 100); do port_open 127.0.0.1 25080 && break; sleep 0.1; done
SAUTIKIT_API_KEY=$(jq -r .api_key "$data/dev-credentials.json") \
    SAUTIKIT_API_URL=http://127.0.0.1:25080 SAUTIKIT_SIP_SERVER=127.0.0.1:25060 \
    "$bin" loadtest inbound --rate "$rate" --duration "$seconds" \
    --hold "$(echo "$hold_ms / 1000" | bc -l)" --numbers 100 --max-failed "$calls" \
    --json "$work/loadtest.json" >"$work/loadtest.out" 2>&1 || true
# The engine's CPU while calls were offered, from the load test's samples of its process.
printf '%-34s %6.3f cores   %s of %s calls completed, %s failed; INVITE→200 p99 %.1f ms; load test %.3f cores\n' \
    "Sautikit (whole inbound flow)" \
    "$(jq '[.timeline[] | select(.offered > 0) | .target_cores] | add / length' "$work/loadtest.json")" \
    "$(jq .calls.completed "$work/loadtest.json")" "$calls" "$(jq .calls.failed "$work/loadtest.json")" \
    "$(jq .setup_ms.p99 "$work/loadtest.json")" "$(jq .harness_cores "$work/loadtest.json")"

# Registrations: Kamailio's registrar first, then ours, the same softphones.
mkdir -p "$work/kamdb"
printf 'table_name(str) table_version(int)\nsubscriber:7\nlocation:9\n' >"$work/kamdb/version"
{
    echo 'id(int,auto) username(str) domain(str) password(str) ha1(str,null) ha1b(str,null)'
    for i in $(seq 1 "$credentials"); do echo "$i:anchor$i:127.0.0.1:secret$i:::"; done
} >"$work/kamdb/subscriber"
for i in $(seq 1 "$credentials"); do echo "anchor$i:secret$i"; done >"$work/credentials.txt"
cat >"$work/registrar.cfg" <<EOF
#!KAMAILIO
debug=1
log_stderror=yes
children=2
listen=udp:127.0.0.1:25074
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "db_text.so"
loadmodule "auth.so"
loadmodule "auth_db.so"
modparam("usrloc", "db_mode", 0)
modparam("auth", "algorithm", "SHA-256")
modparam("auth", "secret", "anchor-secret")
modparam("auth", "nonce_count", 1)
modparam("auth_db", "db_url", "text://$work/kamdb")
modparam("auth_db", "calculate_ha1", yes)
modparam("auth_db", "password_column", "password")
modparam("auth_db", "load_credentials", "")
request_route {
    if (method == "REGISTER") {
        if (!auth_check("\$fd", "subscriber", "1")) {
            auth_challenge("\$fd", "1");
            exit;
        }
        consume_credentials();
        if (!save("location")) { sl_reply_error(); }
        exit;
    }
    sl_send_reply("404", "Not here");
}
EOF
kamailio -f "$work/registrar.cfg" -P "$work/registrar.pid" -w "$work" -DD -E >"$work/registrar.log" 2>&1 &
for _ in $(seq 1 50); do [ -s "$work/registrar.pid" ] && break; sleep 0.1; done
sleep 1
mapfile -t kam < <(pgrep -f "kamailio -f $work/registrar.cfg")
before=$(cpu_of "${kam[@]}")
start=$(date +%s.%N)
SAUTIKIT_SIP_SERVER=127.0.0.1:25074 "$bin" loadtest register --credentials-file "$work/credentials.txt" \
    --domain 127.0.0.1 --rate "$reg_rate" --duration "$seconds" --max-failed $((reg_rate * seconds)) \
    --json "$work/kamailio-register.json" >"$work/kamailio-register.out" 2>&1 || true
end=$(date +%s.%N)
after=$(cpu_of "${kam[@]}")
kill "${kam[@]}" 2>/dev/null || true
printf '%-34s %6.3f cores   %s of %s registrations completed, %s failed; REGISTER→200 p99 %.2f ms\n' \
    "Kamailio registrar (auth_db)" "$(echo "($after - $before) / ($end - $start)" | bc -l)" \
    "$(jq .registrations.completed "$work/kamailio-register.json")" $((reg_rate * seconds)) \
    "$(jq .registrations.failed "$work/kamailio-register.json")" "$(jq .register_ms.p99 "$work/kamailio-register.json")"

SAUTIKIT_API_KEY=$(jq -r .api_key "$data/dev-credentials.json") \
    SAUTIKIT_API_URL=http://127.0.0.1:25080 SAUTIKIT_SIP_SERVER=127.0.0.1:25060 \
    "$bin" loadtest register --credentials "$credentials" --rate "$reg_rate" --duration "$seconds" \
    --max-failed $((reg_rate * seconds)) --json "$work/register.json" >"$work/register.out" 2>&1 || true
printf '%-34s %6.3f cores   %s of %s registrations completed, %s failed; REGISTER→200 p99 %.2f ms\n' \
    "Sautikit registrar" \
    "$(jq '[.timeline[] | select(.offered > 0) | .target_cores] | add / length' "$work/register.json")" \
    "$(jq .registrations.completed "$work/register.json")" $((reg_rate * seconds)) \
    "$(jq .registrations.failed "$work/register.json")" "$(jq .register_ms.p99 "$work/register.json")"
kill "$serve"
