#!/usr/bin/env bash
# Runs every fuzz target for a while (default 30 s each) from the committed corpus, as CI does.
# Needs cargo-fuzz (installed when missing). cargo-fuzz uses unstable rustc flags for coverage
# instrumentation; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them (no nightly needed).
# New inputs the fuzzer finds go to a scratch corpus, not into the committed one; a crash fails
# the run and leaves the reproducer in fuzz/artifacts/<target>/ (add it to the corpus and fix the
# bug: every crash becomes a regression test).
# Build: by default a dev build without sanitizer (`--dev -s none`): debug assertions and integer
# overflow checks on (a release build has neither), and it builds in about half the time of an
# AddressSanitizer release build, which matters in CI (the fuzzed parsers have no `unsafe`, so
# ASan finds nothing there that Rust does not). It executes ~2.5x fewer inputs per second. For
# long local runs, VICTOR_FUZZ_BUILD=release gives the optimised ASan build.
# Usage: fuzz/run.sh [seconds-per-target] [target...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
seconds=${1:-30}
shift || true
targets=("$@")
# Every target in fuzz_targets/ unless named.
if [[ ${#targets[@]} -eq 0 ]]; then
    for f in fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
case ${VICTOR_FUZZ_BUILD:-dev} in
    dev) build=(--dev -s none) ;;
    release) build=(-O) ;;
    *) echo "VICTOR_FUZZ_BUILD must be dev or release" >&2; exit 2 ;;
esac
for t in "${targets[@]}"; do
    cargo fuzz build "${build[@]}" "$t" >/dev/null 2>&1 || cargo fuzz build "${build[@]}" "$t"
done
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    echo "fuzz: $t for ${seconds}s"
    log="$scratch/$t.log"
    if ! cargo fuzz run "${build[@]}" "$t" "$scratch/$t" "corpus/$t" -- -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz target $t failed; reproducer in fuzz/artifacts/$t" >&2
        exit 1
    fi
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$log" | tr '\n' ' '
    echo
done
echo "fuzz: all targets ran clean"
