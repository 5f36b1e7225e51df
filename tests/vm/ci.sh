#!/usr/bin/env bash
# CI step of tests/run.sh: the kernel suites that need a stock distribution kernel, run inside a
# QEMU guest by tests/vm/run. Installs QEMU and kmod when missing (tests/vm/install.sh), fetches
# the guest's assets (cached in ~/.cache/victor-vm), checks the runner itself (tests/vm/selftest.sh:
# a deliberately failing test must fail it), then runs the suite and prints its duration.
#
# The suite: every namespace suite's kernel-data-plane variant (`<test>::kernel`: move + proxy ARP
# + path MTU, the IPv6 move over sit (6in4) incl. a spoofed 6in4 sender, restart without flap +
# headless, kill -9 on the path, guards incl. a spoofed IP-in-IP sender, move hints, BGP health),
# `--dataplane kernel` with IPv6 prefixes (runs where sit loads), the kernel-only suite (fe-agent/tests/kernel.rs:
# auto loads ipip, adoption/drift/stale state, the switch to tun), the kernel forwarding CLI test,
# the lab's short migrate on the kernel data plane, and the ipip probe. On the host (no ipip) they
# print SKIPPED and their userspace variants run instead; in the guest they must not skip. The
# guest starts without ipip or sit loaded: the agents load them (`--dataplane auto|kernel`).
# The userspace variants do not run here (the host ran them): ~10x slower under TCG.
#
# Exit status: 0 passed; 77 SKIPPED (printed with the reason: no QEMU, no kernel); else failed.
# Expects the workspace's binaries to be built (tests/run.sh builds them before).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/../.." || exit 1
start=$(date +%s)
took() { echo "vm ci: $1 after $(($(date +%s) - start)) s"; }

# `--workspace` with the packages in the filter, not `-p`: a subset of packages unifies features
# differently, and cargo would rebuild the test binaries the nextest step has just built.
suite=(--workspace
    -E '(package(victor-dataplane) | package(victor-fe-agent) | package(victor-tests)) & (
        test(=kernel_ipip_probe_matches_the_kernel) | (package(victor-fe-agent) & (test(/::kernel$/) | binary(kernel)))
        | (binary(cli) & test(=kernel_dataplane)) | (binary(lab) & test(=migrate_on_the_kernel_data_plane))
        | (binary(move6) & test(=the_kernel_data_plane_carries_ipv6_prefixes_where_sit_loads)))')

if ! bash "$here/install.sh"; then
    echo "SKIPPED: the VM kernel suite: QEMU and kmod could not be installed (tests/vm/install.sh failed)"
    exit 77
fi
prepared=$(bash "$here/run" --prepare 2>&1)
status=$?
if [[ $status -eq 77 && $(id -u) -eq 0 && $prepared == *"apt cannot fetch"* ]]; then
    # Stale apt lists name a kernel the archive no longer has: refresh them once.
    apt-get update -qq && bash "$here/run" --prepare >/dev/null
    status=$?
fi
if [[ $status -ne 0 ]]; then
    bash "$here/run" --prepare # prints the SKIPPED reason
    took "SKIPPED"
    exit 77
fi

bash "$here/selftest.sh" >/dev/null || {
    status=$?
    [[ $status -eq 77 ]] && { echo "SKIPPED: the VM kernel suite: no guest boots here"; exit 77; }
    echo "vm ci: the runner's self-test failed (bash tests/vm/selftest.sh shows why)" >&2
    exit 1
}
echo "vm ci: runner self-test passed (a deliberately failing test in the guest fails the runner)"

out=target/vm/runs/ci
rm -rf "$out"
bash "$here/run" --out "$out" --timeout 300 --nextest "${suite[@]}"
status=$?
if [[ $status -eq 0 ]] && grep -l 'SKIPPED' "$out"/logs/*.log; then
    echo "vm ci: a kernel test skipped inside the guest, where the kernel has what it needs (logs above)" >&2
    status=1
fi
took "kernel suite $([[ $status -eq 0 ]] && echo passed || echo "FAILED (status $status)")"
exit "$status"
