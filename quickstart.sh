#!/usr/bin/env bash
# The quick-start commands (run as root on Debian 12):
#   ./quickstart.sh demo   build the namespace lab, run uplinkd in it, show how connections shared
#   ./quickstart.sh test   ruff, mypy and the test suite (integration tests need root)
#   ./quickstart.sh bench  the benchmarks (tests/bench/): README tables + results/latest.json
# Each installs what it needs first: Debian packages (once) and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")"

DEBS=(nftables libnftables1 iproute2 conntrack iptables dbus procps python3-venv
      meson ninja-build groff-base
      libnetfilter-queue-dev build-essential python3-dev)
# libnetfilter-queue-dev, a compiler and the Python headers build NetfilterQueue (the lab's delay
# link: latency and loss without netem). The compiler also builds python-iptables' small C wrapper
# (the legacy iptables backend), which loads libip4tc, libip6tc and libxtables from `iptables`.
# network-manager is not installed here: on a router it would start managing interfaces. CI
# installs it (without starting it) for the NetworkManager test, which skips where it is absent.
# The benchmarks' fault suite also runs D-Bus callers as `nobody`, who cannot run the checkout's
# venv: the distribution's python3 with dbus-python.
BENCH_DEBS=(python3-dbus)
VENV=${UPLINKD_VENV:-.venv}

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "quickstart: run as root (the lab uses network namespaces and nftables)" >&2
        exit 1
    fi
}

install_debs() {
    local missing=()
    for pkg in "${DEBS[@]}" "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "quickstart: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

install_venv() {
    local python=${PYTHON:-python3}
    if [ ! -x "$VENV/bin/python" ]; then
        "$python" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c 'import uplinkd, uplinkd_lab, pytest, mypy' 2>/dev/null \
        || [ pyproject.toml -nt "$VENV/.installed" ] \
        || [ daemon/lab/pyproject.toml -nt "$VENV/.installed" ]; then
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e '.[test]' -e ./daemon/lab
        touch "$VENV/.installed"
    fi
}

case "${1:-}" in
    demo)
        need_root; install_debs; install_venv
        exec "$VENV/bin/python" -m uplinkd_lab.demo "${@:2}"
        ;;
    test)
        install_debs_if_root() { [ "$(id -u)" = 0 ] && install_debs || true; }
        install_debs_if_root; install_venv
        "$VENV/bin/ruff" check daemon tests
        "$VENV/bin/ruff" format --check daemon tests
        "$VENV/bin/mypy"
        exec "$VENV/bin/pytest" "${@:2}"
        ;;
    bench)
        need_root; install_debs "${BENCH_DEBS[@]}"; install_venv
        exec "$VENV/bin/python" -m tests.bench "${@:2}"
        ;;
    *)
        echo "usage: $0 demo|test|bench [args...]" >&2
        exit 2
        ;;
esac
