#!/usr/bin/env bash
# CI step of tests/run.sh: VICTOR as operators install it.
#
#  1. the Debian packages (build-debs.sh, from the debug binaries CI has just built);
#  2. on a clean Debian root (tests/install-test.sh): dpkg -i, systemd-analyze verify of the
#     units, --check-config from the installed paths, a real start as the units' user with exactly
#     their capabilities (and each capability shown to be needed), purge;
#  3. under systemd (tests/vm-test.sh, in the VM runner's guest, beside the rest): both units
#     started with systemctl (Type=notify, ready when synced), their user and capabilities,
#     ARP learning, the journal, a watchdog restart, an upgrade restart, a clean stop;
#  4. the container image the Helm chart runs, built from the Dockerfile without a Docker
#     engine (image/build-image.sh) and run as the chart runs it (image/run-test.sh);
#  5. the Dockerfile reader refuses what it does not reproduce.
#
# Prints each part's result and duration, then the step's. Installs the tools it needs with apt
# (dpkg-dev, mmdebstrap, umoci, runc, etcd-server, systemd, QEMU...). Exit status as
# tests/vm/ci.sh's: 0 every part passed; 77 nothing failed but a part could not run here (a tool
# apt cannot install, Debian's archive unreachable with nothing cached, no QEMU, no container
# runtime), each such part's `SKIPPED: <reason>` repeated at the end; 1 a part failed. Expects
# `cargo build --workspace --bins` to have run (tests/run.sh builds before). Needs root.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=packaging/lib.sh
. "$here/lib.sh"
cd "$repo" || exit 1
start=$SECONDS
logs=$repo/target/packaging/logs
mkdir -p "$logs"
failed=() skipped=()

# Runs a part with its output in $logs/<name>.log, then prints that output and the result.
part_report() { # name status seconds
    local name=$1 status=$2 secs=$3
    sed 's/^/    /' "$logs/$name.log"
    case $status in
        0) echo "packaging ci: $name passed (${secs} s)" ;;
        77)
            skipped+=("$name: $(grep -h -m1 '^SKIPPED: ' "$logs/$name.log" | sed 's/^SKIPPED: //')")
            echo "packaging ci: $name SKIPPED (${secs} s)"
            ;;
        *) echo "packaging ci: $name FAILED with status $status (${secs} s; log $logs/$name.log)"; failed+=("$name") ;;
    esac
}
part() { # name command...
    local name=$1 t0=$SECONDS status
    shift
    "$@" >"$logs/$name.log" 2>&1
    status=$?
    part_report "$name" "$status" $((SECONDS - t0))
    return "$status"
}
# The same in the background (its own duration in $logs/<name>.secs); join_part waits for it and
# reports.
declare -A part_pid
bg_part() { # name command...
    local name=$1
    shift
    (
        t0=$SECONDS
        "$@" >"$logs/$name.log" 2>&1
        status=$?
        echo $((SECONDS - t0)) >"$logs/$name.secs"
        exit "$status"
    ) &
    part_pid[$name]=$!
}
join_part() { # name
    local name=$1 status
    wait "${part_pid[$name]}"
    status=$?
    part_report "$name" "$status" "$(cat "$logs/$name.secs" 2>/dev/null)"
    return "$status"
}

pk_need dpkg-deb dpkg-shlibdeps strip zstd jq curl python3 || { echo "packaging ci: no packages can be built"; exit 77; }

# The other parts' tools, now and one apt at a time (the parts run concurrently); what cannot be
# installed makes its part say SKIPPED.
pk_need mmdebstrap umoci runc etcd setpriv capsh ip systemctl >/dev/null
bash tests/vm/install.sh >/dev/null 2>&1

part packages bash "$here/build-debs.sh" || { echo "packaging ci: FAILED: no packages (after $((SECONDS - start)) s)"; exit 1; }

# Three chains side by side: the VM (one vCPU under TCG, minutes), the image (its Debian root
# is fetched on a fresh machine) and the install test (the same for its root).
bg_part systemd-in-vm bash "$here/tests/vm-test.sh"
bg_part image-build bash "$here/image/build-image.sh"
part install-test bash "$here/tests/install-test.sh"
if join_part image-build; then
    part image-run bash "$here/image/run-test.sh"
fi
# The reader of the Dockerfile stops at an instruction it does not reproduce.
bad=$(mktemp)
sed 's/^USER /VOLUME \/data\nUSER /' Dockerfile >"$bad"
if python3 "$here/image/dockerfile.py" "$bad" >/dev/null 2>"$logs/dockerfile-reader.log"; then
    failed+=(dockerfile-reader)
    echo "packaging ci: dockerfile-reader FAILED: it accepted a VOLUME it does not reproduce"
elif grep -q "VOLUME in the runtime stage is not reproduced" "$logs/dockerfile-reader.log"; then
    echo "packaging ci: dockerfile-reader passed (refuses an instruction it does not reproduce)"
else
    failed+=(dockerfile-reader)
    echo "packaging ci: dockerfile-reader FAILED: $(cat "$logs/dockerfile-reader.log")"
fi
rm -f "$bad"

join_part systemd-in-vm

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "packaging ci: FAILED: ${failed[*]} (after $((SECONDS - start)) s)"
    exit 1
fi
if [[ ${#skipped[@]} -gt 0 ]]; then
    printf 'SKIPPED: %s\n' "${skipped[@]}"
    echo "packaging ci: passed what could run, ${#skipped[@]} part(s) SKIPPED, after $((SECONDS - start)) s"
    exit 77
fi
echo "packaging ci: passed after $((SECONDS - start)) s"
