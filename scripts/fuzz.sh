#!/usr/bin/env bash
# Fuzzes everything that reads bytes from the network or from customers, with cargo-fuzz
# (libFuzzer + AddressSanitizer): scripts/fuzz.sh [seconds per target] [target ...]
#
# Each target starts from its committed seeds (fuzz/seeds/<target>, the RFC 4475 torture
# messages, sipp's messages) and the inputs of earlier crashes (fuzz/regressions/<target>), and
# keeps what it learns in fuzz/corpus/<target>. A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the run; copy it to fuzz/regressions/<target>/ and write the
# test in the crate that owns the code (sip/tests/robustness.rs, or the module's own tests).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

seconds=${1:-60}
shift || true
all=(sip_message tcp_framer sdp digest voice_action rtp audio)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

apt_install_missing cc:gcc c++:g++
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
# libFuzzer's instrumentation and the sanitizer flags are nightly options: use a nightly
# toolchain when rustup has one, otherwise let the stable compiler accept them.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

cd fuzz
# Seed corpora that are derived rather than committed: the RFC 4475 messages are SIP messages
# as they are; each SIP seed is also a TCP stream (the first byte says where reads are cut).
mkdir -p corpus/sip_message corpus/tcp_framer
cp -f ../tests/conformance/rfc4475/*.dat corpus/sip_message/
for f in seeds/sip_message/* ../tests/conformance/rfc4475/*.dat; do
    { printf '\x25'; cat "$f" "$f"; } >"corpus/tcp_framer/$(basename "$f").stream"
done

# sip-tester's RTP captures (RFC 4733 keys and G.711 audio) as streams for the rtp target: each
# packet after a length byte, as the target reads them.
mkdir -p corpus/rtp
python3 - corpus/rtp /usr/share/sip-tester/*.pcap <<'PY' || true
import struct, sys, os
out = sys.argv[1]
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    if len(data) < 24:
        continue
    endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    pos, packets = 24, []
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8:pos + 12])[0]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        # Ethernet + IPv4 + UDP, as sipp's captures are.
        if len(frame) > 42 and frame[12:14] == b"\x08\x00" and frame[23] == 17:
            ihl = (frame[14] & 0x0F) * 4
            payload = frame[14 + ihl + 8:]
            if 12 <= len(payload) <= 255:
                packets.append(payload)
    name = os.path.basename(path)
    for i in range(0, min(len(packets), 400), 40):
        with open(os.path.join(out, f"{name}.{i}"), "wb") as f:
            for p in packets[i:i + 40]:
                f.write(bytes([len(p)]) + p)
PY

"${fuzz[@]}" build
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "regressions/$t"
    dirs=("corpus/$t" "regressions/$t")
    [ -d "seeds/$t" ] && dirs+=("seeds/$t")
    [ "$t" = tcp_framer ] && dirs+=(seeds/sip_message)
    echo "fuzzing $t for ${seconds}s" >&2
    if ! "${fuzz[@]}" run "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65600 \
        -print_final_stats=1 2>"/tmp/fuzz-$t.log"; then
        failed+=("$t")
        tail -n 60 "/tmp/fuzz-$t.log" >&2
    else
        grep -E '^stat::number_of_executed_units|^Done' "/tmp/fuzz-$t.log" >&2 || true
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzzing: no crash in ${targets[*]} (${seconds}s each)" >&2
