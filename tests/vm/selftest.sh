#!/usr/bin/env bash
# Self-test of the VM runner: a failing test in the guest fails the runner with the test binary's
# exit status (libtest: 101) and its output is shown; a host without QEMU gets `SKIPPED: <reason>`
# and status 77, never a pass. Compiles tests/vm/selftest.rs with rustc into target/vm/selftest/.
# Exit status 0 when the runner behaves, 77 when the VM cannot run here, 1 otherwise.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
dir=$repo/target/vm/selftest
mkdir -p "$dir"
fail() { echo "vm selftest: FAILED: $*" >&2; exit 1; }

# 1. Without QEMU: a loud skip with status 77.
out=$(VICTOR_VM_QEMU=/nonexistent/qemu-system-x86_64 "$here/run" --cmd true 2>&1)
status=$?
[[ $status -eq 77 ]] || fail "without QEMU the runner exited $status, expected 77: $out"
grep -q '^SKIPPED: /nonexistent/qemu-system-x86_64 is not installed' <<<"$out" || fail "no SKIPPED line without QEMU: $out"
echo "vm selftest: without QEMU: status 77 and '$(grep '^SKIPPED' <<<"$out")'"

# 2. A test binary with one passing and one deliberately failing test, run in the guest.
rustc --edition 2021 --test -o "$dir/selftest" "$here/selftest.rs" || fail "rustc could not build selftest.rs"
out=$("$here/run" --out "$dir/run" "$dir/selftest" 2>&1)
status=$?
echo "${out//$'\n'/$'\n'  | }"
[[ $status -eq 77 ]] && { echo "SKIPPED: the VM runner cannot boot a guest here"; exit 77; }
[[ $status -eq 101 ]] || fail "the runner exited $status with a failing test in the guest, expected 101 (libtest's)"
grep -q 'FAIL \[' <<<"$out" || fail "the summary has no FAIL line"
grep -q 'deliberate failure' <<<"$out" || fail "the failing test's output is not shown"
grep -q 'test passes_in_the_guest ... ok' "$dir/run/logs/1.log" || fail "the guest-only test did not pass in the guest"
echo "vm selftest: a failing test in the guest fails the runner with status $status; the guest-only test passed there"
