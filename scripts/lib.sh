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
