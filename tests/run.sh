#!/usr/bin/env bash
# VICTOR's whole test suite: the one command the README gives and CI runs (`.ci/run`).
#
# Run as root on a fresh Debian machine that has only the Rust toolchain: it installs what is
# missing (etcd, BIRD 2, iperf3, iproute2, Chromium for the status page test, Python venv for the
# Helm chart tests), then checks
# formatting and lints, builds everything and runs every test — unit, property, store
# conformance against real 1- and 3-member etcd, controller replication, network-namespace labs
# with real TUN/raw sockets/BIRD, the Helm chart rendered by the real Helm engine, a short
# run of every fuzz target (cargo-fuzz) from its committed corpus, and the Debian packages and the
# container image as operators install and run them.
#
# Options: --quick skips the Helm chart tests and fuzzing; extra arguments after `--` go to cargo nextest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

quick=0
nextest_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --) shift; nextest_args=("$@"); break ;;
        *) echo "usage: tests/run.sh [--quick] [-- nextest args]" >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n=== %s (%s)\n' "$1" "$(date +%H:%M:%S)"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "tests/run.sh: the suite builds network namespaces and raw sockets; run it as root (in a root shell: bash tests/run.sh; with sudo: sudo bash tests/run.sh)" >&2
    exit 1
fi

step "system packages"
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v bird >/dev/null || need+=(bird2)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [[ ${#need[@]} -gt 0 ]]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
    echo "all present"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    step "cargo-nextest"
    cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "import cycles between modules (tests/tools/import-cycles.py)"
python3 tests/tools/import-cycles.py .

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "build"
cargo build --workspace --bins

# QEMU and the stock kernel before the tests: the lab's live migration of a real VM
# (tests/tests/lab_qemu.rs) runs inside nextest and says SKIPPED without them. Not fatal: the
# kernel suite's step below reports what is missing.
step "QEMU and the stock kernel for the VM tests (tests/vm/install.sh, tests/vm/lab-guest)"
if bash tests/vm/install.sh >/dev/null && bash tests/vm/lab-guest >/dev/null; then
    echo "ready"
else
    echo "not available: the tests that need a VM will say SKIPPED"
fi

namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | sort; }
ns_before=$(namespaces)

step "tests (cargo nextest)"
cargo nextest run --workspace --no-fail-fast "${nextest_args[@]}"

if [[ $quick -eq 0 ]]; then
    step "Helm chart tests"
    bash helm/tests/run.sh
    step "fuzzing (20 s per target, from the committed corpus)"
    bash fuzz/run.sh 20
fi

# >>> VM kernel suite (tests/vm/ci.sh): tests that need a stock distribution kernel, in a QEMU guest.
# Status 77 means it printed `SKIPPED: <reason>` (no QEMU or no kernel here); anything else fails.
step "kernel suite in a VM (tests/vm/ci.sh)"
bash tests/vm/ci.sh || [[ $? -eq 77 ]]
# <<< VM kernel suite

# >>> packaging (packaging/ci.sh): the Debian packages and their systemd units on a clean root and
# under systemd in a VM, the container image built from the Dockerfile and run as the Helm chart
# runs it. Status 77 means a part could not run here and said `SKIPPED: <reason>` (a tool apt
# cannot install, no QEMU, Debian's archive unreachable with nothing cached); a failure fails.
step "packages, systemd units and the container image (packaging/ci.sh)"
bash packaging/ci.sh || [[ $? -eq 77 ]]
# <<< packaging

step "leak check"
leaked=$(comm -13 <(echo "$ns_before") <(namespaces) | tr '\n' ' ')
if [[ -n "${leaked// /}" ]]; then
    echo "network namespaces left behind by tests: $leaked" >&2
    exit 1
fi
echo "no namespaces left behind"
step "all tests passed"
