# Shared helpers for scripts/run.sh and scripts/test.sh (sourced, not run).

# Install Debian packages whose commands are missing: apt_install_missing CMD:PKG ...
apt_install_missing() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

port_open() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# Fail at once, naming the toolchain, when cargo is missing or older than the workspace needs.
require_rust() {
    local need
    need=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
    if ! command -v cargo >/dev/null 2>&1; then
        echo "sautikit needs Rust $need or newer (cargo was not found): install it from https://rustup.rs, e.g." >&2
        echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --default-toolchain stable" >&2
        exit 1
    fi
    local have
    have=$(cargo --version | awk '{print $2}')
    if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n1)" != "$need" ]; then
        echo "sautikit needs Rust $need or newer; cargo here is $have (rustup update stable)" >&2
        exit 1
    fi
}
