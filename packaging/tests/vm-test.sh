#!/usr/bin/env bash
# The packages under a real systemd, where a guest can boot it: tests/vm/run boots Debian's stock
# kernel with the host's root (tmpfs overlay) and the host's systemd as PID 1, and
# packaging/tests/vm-guest.sh runs there as `systemd.run=`: dpkg -i, systemctl start of both
# units (Type=notify: ready when synced), their user and capabilities as systemd applied them,
# ARP learning, the journal, a watchdog restart, a clean stop.
#
#   packaging/tests/vm-test.sh [DEBS_DIR]      (default target/packaging/debs)
#
# Prints the guest's PASS/FAIL lines and `N passed, M failed`. Exit 0 all passed; 77 with
# `SKIPPED: <reason>` when no guest can boot here (tests/vm/run's own reasons: no QEMU, no
# kernel) or systemd cannot be installed; 1 otherwise. Logs: target/vm/runs/packaging/ (console.log, guest.log, journal.txt).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=packaging/lib.sh
. "$here/../lib.sh"
debs=$(cd "${1:-$repo/target/packaging/debs}" && pwd) || exit 1
vm=$repo/tests/vm

# The guest boots the host's root: systemd and the tools vm-guest.sh uses must be installed here.
pk_need systemctl curl jq capsh python3 ip || exit
[[ -x /lib/systemd/systemd ]] || pk_skip "the packages under systemd: the host root has no /lib/systemd/systemd for the guest to boot" || exit
bash "$vm/install.sh" >/dev/null 2>&1 || pk_skip "the packages under systemd: QEMU cannot be installed (tests/vm/install.sh)" || exit
out=$repo/target/vm/runs/packaging
rm -rf "$out" && mkdir -p "$out"
printf 'DEBS=%q\nHERE=%q\n' "$debs" "$here" >"$out/params"
# The host image enables services the guest would otherwise start too (README of tests/vm).
masks=""
for unit in etcd postgresql bird avahi-daemon; do masks+=" systemd.mask=$unit.service"; done
bash "$vm/run" --out "$out" --timeout 600 --init /lib/systemd/systemd \
    --append "systemd.run=$here/vm-guest.sh$masks" >"$out/run.log" 2>&1
status=$?
if [[ $status -eq 77 ]]; then
    grep -h '^SKIPPED' "$out/run.log" | sed 's/^SKIPPED: /SKIPPED: the packages under systemd: /'
    exit 77
fi
grep -h '^vm: ' "$out/run.log" | head -n 2
if [[ ! -s $out/results.txt ]]; then
    echo "vm-test: the guest left no results (QEMU status $status); console tail:" >&2
    tail -n 30 "$out/console.log" >&2
    [[ -f $out/guest.log ]] && tail -n 30 "$out/guest.log" >&2
    exit 1
fi
sed 's/^/  /' "$out/results.txt"
passed=$(grep -c '^PASS' "$out/results.txt")
failed=$(grep -c '^FAIL' "$out/results.txt")
echo "vm-test: guest: $(grep -h '^systemd=\|^dataplane=\|^uptime' "$out/guest.env" | paste -sd' ')"
echo "vm-test: $passed passed, $failed failed (logs in $out)"
if [[ $failed -gt 0 ]]; then
    tail -n 40 "$out/journal.txt"
    exit 1
fi
