#!/usr/bin/env bash
# The soak: RATE calls a second of the full inbound flow for MINUTES against a release
# `sautikit serve` (dev mode, SQLite), driven by `sautikit loadtest inbound`. Prints the engine's
# RSS, anonymous memory and SQLite's own memory (from /metrics) every 30 s, and checks the pass
# line: RSS growth after the first 60 s at most GROWTH_MIB (default 5).
# Usage: scripts/soak.sh [MINUTES] [RATE] [GROWTH_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_rust
apt_install_missing jq:jq curl:curl bc:bc

minutes=${1:-30}
rate=${2:-300}
line=${3:-5}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# SAUTIKIT_BIN: a release binary built elsewhere (a worktree of the commit measured).
bin=${SAUTIKIT_BIN:-target/release/sautikit}
[ -n "${SAUTIKIT_BIN:-}" ] || cargo build --release --quiet --bin sautikit
data="$work/sautikit-data"
SAUTIKIT_MODE=dev SAUTIKIT_DATA_DIR="$data" SAUTIKIT_HTTP_LISTEN=127.0.0.1:25180 \
    SAUTIKIT_SIP_LISTEN=127.0.0.1:25160 SAUTIKIT_LOG=warn \
    "$bin" serve >"$work/serve.out" 2>"$work/serve.err" &
server=$!
for _ in $(seq 1 100); do port_open 127.0.0.1 25180 && break; sleep 0.1; done

# /metrics every 30 s: minutes since the start, RSS, anonymous memory, SQLite's memory, Rust's
# heap (mimalloc's committed memory), C's heap (glibc's malloc: held from the system / in use),
# in MiB; then the engine's threads, and its resident memory by kind of mapping (from
# /proc/<pid>/smaps): the main heap (brk), thread stacks, other anonymous mappings (mimalloc's
# segments, glibc's thread arenas, direct mmaps) and files, with how many anonymous mappings
# there are. SOAK_SMAPS=<dir>: keep each sample's smaps there, to diff two of them.
metric() { awk -v m="$1" '$1 == m { printf "%.1f", $2 / 1048576 }' "$work/metrics"; }
# Resident MiB of the mappings in /proc/<pid>/smaps, by kind.
smaps_kinds() {
    awk '
        /^[0-9a-f]+-[0-9a-f]+ / {
            name = $6
            kind = name == "[heap]" ? "heap" : name ~ /^\[stack/ ? "stacks" : name == "" ? "anon" : name ~ /^\[/ ? "other" : "files"
            if (kind == "anon") anon_maps++
            next
        }
        /^Rss:/ { rss[kind] += $2 }
        END {
            printf "heap %.1f  stacks %.1f  anon %.1f (%d maps)  files %.1f", rss["heap"] / 1024, rss["stacks"] / 1024, rss["anon"] / 1024, anon_maps, rss["files"] / 1024
        }' "$1"
}
(
    start=$(date +%s)
    while true; do
        sleep 30
        curl -s http://127.0.0.1:25180/metrics >"$work/metrics" || continue
        minutes=$(echo "($(date +%s) - $start) / 60" | bc -l)
        cp "/proc/$server/smaps" "$work/smaps" 2>/dev/null || continue
        [ -z "${SOAK_SMAPS:-}" ] || { mkdir -p "$SOAK_SMAPS"; cp "$work/smaps" "$SOAK_SMAPS/$(printf '%05.1f' "$minutes").smaps"; }
        printf '%5.1f min  RSS %s MiB  anonymous %s MiB  SQLite %s MiB  Rust heap %s MiB  C heap %s / %s MiB  threads %s  [%s]\n' \
            "$minutes" \
            "$(metric sautikit_process_resident_memory_bytes)" \
            "$(metric sautikit_process_anonymous_memory_bytes)" \
            "$(metric sautikit_sqlite_memory_bytes)" \
            "$(metric sautikit_rust_heap_committed_bytes)" \
            "$(metric sautikit_c_heap_held_bytes)" "$(metric sautikit_c_heap_used_bytes)" \
            "$(awk '/^Threads:/ { print $2 }' "/proc/$server/status" 2>/dev/null)" \
            "$(smaps_kinds "$work/smaps")"
    done
) &
scraper=$!

echo "soak: $rate calls/s for $minutes min ($(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg))"
SAUTIKIT_API_KEY=$(jq -r .api_key "$data/dev-credentials.json") \
    SAUTIKIT_API_URL=http://127.0.0.1:25180 SAUTIKIT_SIP_SERVER=127.0.0.1:25160 \
    "$bin" loadtest inbound --rate "$rate" --duration $((minutes * 60)) --hold 0 --numbers 100 \
    --max-failed $((rate * minutes * 60)) --json "$work/soak.json" >"$work/soak.out" 2>"$work/soak.err" || true
kill "$scraper" 2>/dev/null || true
# SOAK_JSON: where to keep the load test's JSON (a sample a second) after the run.
[ -z "${SOAK_JSON:-}" ] || cp "$work/soak.json" "$SOAK_JSON"

# RSS from the load test's samples of the engine, one a second.
jq -r --argjson line "$line" '
  [.timeline[] | select(.target_rss_mib != null)] as $s
  | ($s | map(select(.t >= 60)) | first | .target_rss_mib) as $at60
  | ($s | map(select(.t >= 60)) | map(.target_rss_mib) | max) as $peak
  | ($s | last | .target_rss_mib) as $final
  | "calls: \(.calls.completed) completed, \(.calls.failed) failed; INVITE→200 p50 \(.setup_ms.p50 * 100 | floor / 100) ms, p99 \(.setup_ms.p99 * 100 | floor / 100) ms",
    "RSS: \($at60 * 10 | floor / 10) MiB at 60 s, peak after it \($peak * 10 | floor / 10) MiB, \($final * 10 | floor / 10) MiB at the end (\(($final - $at60) * 10 | floor / 10) MiB more than at 60 s)",
    "growth after the first 60 s (its peak): \(($peak - $at60) * 10 | floor / 10) MiB (line \($line) MiB) → \(if $peak - $at60 <= $line then "PASS" else "FAIL" end)"
' "$work/soak.json" | tee "$work/verdict"
# Where the peak was, and how much of it was mapped files and shared memory (not the heap).
jq -r '
  [.timeline[] | select(.t >= 60 and .target_rss_mib != null)] as $s
  | ($s | first) as $a | ($s | max_by(.target_rss_mib)) as $p
  | "peak at t=\($p.t | floor) s; of RSS, files and shared memory: \($a.target_rss_file_mib // 0 | . * 10 | floor / 10) MiB at 60 s, \($p.target_rss_file_mib // 0 | . * 10 | floor / 10) MiB at the peak"
' "$work/soak.json"
# Stalls (a second with INVITE→200 p99 over 100 ms, or calls refused) and the RSS around each:
# what the engine held before, at the stall, and 60 s later.
jq -r '
  .timeline as $tl
  | [range(0; $tl | length) as $i | select(($tl[$i].p99_ms // 0) > 100 or ($tl[$i].failed // 0) > 0) | $i] as $slow
  | if ($slow | length) == 0 then "stalls: none" else
      "stalls (p99 over 100 ms or calls refused), RSS before / at / 60 s after:",
      ($slow[] as $i
        | ($tl[[$i - 1, 0] | max].target_rss_mib // 0) as $before
        | ($tl[$i].target_rss_mib // 0) as $at
        | ($tl[[$i + 60, ($tl | length) - 1] | min].target_rss_mib // 0) as $after
        | "  t=\($tl[$i].t | floor) s: p99 \($tl[$i].p99_ms | floor) ms, \($tl[$i].failed) refused; RSS \($before * 10 | floor / 10) / \($at * 10 | floor / 10) / \($after * 10 | floor / 10) MiB")
    end
' "$work/soak.json"
grep -q "PASS$" "$work/verdict"
