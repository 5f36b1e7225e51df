#!/usr/bin/env bash
# The Debian packages on a clean Debian root (mmdebstrap minbase + systemd, of the release the
# binaries were built on), as an operator would use them:
#
#  1. `dpkg -i` of victorctl, victor-fe-agent and victor-controller: the service user, the files,
#     the units, the conffiles;
#  2. `systemd-analyze verify` of the installed units (inside the root: binaries and all);
#  3. `--check-config` from the installed paths: the shipped configs parse (and say what is
#     missing), a filled-in config is accepted;
#  4. a real start from the installed paths in a network namespace: the controller (on etcd) as
#     the unit's user without any capability, the agent as the unit's user with exactly the unit's
#     AmbientCapabilities (read from the installed unit); the agent becomes ready (/readyz),
#     programs its TUN device and its sysctls, learns a VM from ARP on a VM port and the
#     controller binds it (victorctl from the installed package shows it);
#  5. the capability set is minimal: without either capability the agent fails to start.
#
#   packaging/tests/install-test.sh [DEBS_DIR]     (default target/packaging/debs)
#
# Prints PASS/FAIL per check and `N passed, M failed`; exit 0 when all passed, 77 with
# `SKIPPED: <reason>` when no clean root can be had or a tool cannot be installed, 1 otherwise. Needs root.
# shellcheck disable=SC2016 # single-quoted commands run in the clean root
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=packaging/lib.sh
. "$here/../lib.sh"
debs=$(cd "${1:-$repo/target/packaging/debs}" && pwd) || exit 1

pk_need mmdebstrap zstd curl jq setpriv capsh etcd ip python3 || exit
suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
tarball=$(pk_rootfs "$suite" minbase systemd) || exit $?

passed=0 failed=0
pass() { echo "  PASS $*"; passed=$((passed + 1)); }
fail() { echo "  FAIL $*"; failed=$((failed + 1)); }
check() { # description command...
    local what=$1
    shift
    if "$@"; then
        pass "$what"
    else
        fail "$what"
        return 1
    fi
}

mkdir -p "$repo/target/packaging"
work=$(mktemp -d -p "$repo/target/packaging" install-test.XXXXXX)
logs=$repo/target/packaging/logs/install-test
root=$work/root
tag=vpk$$
fe_ns=$tag-fe vm_ns=$tag-vm
pids=()
# Stops a background process: SIGTERM, up to 15 s, then SIGKILL. Returns its exit status
# (137 when it had to be killed).
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return; }
    for _ in $(seq 1 75); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
cleanup() {
    local i
    # The last started first: the daemons before their etcd.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[i]}"; done
    ip netns del "$fe_ns" 2>/dev/null
    ip netns del "$vm_ns" 2>/dev/null
    # The daemons' logs stay for a look: target/packaging/logs/install-test/.
    rm -rf "$logs" && mkdir -p "$logs" && cp "$work"/*.log "$work"/*.json "$logs/" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
pk_unpack "$tarball" "$root" || { echo "install-test: cannot unpack $tarball" >&2; exit 1; }
echo "install-test: clean $suite root from $(basename "$tarball") in $work"

# ---- 1. dpkg -i
mkdir -p "$root/var/cache/victor-debs"
cp "$debs"/*.deb "$root/var/cache/victor-debs/"
pk_chroot "$root" sh -c 'dpkg -i /var/cache/victor-debs/*.deb' >"$work/dpkg.log" 2>&1
status=$?
check "dpkg -i victorctl victor-fe-agent victor-controller (status $status)" test $status -eq 0 || cat "$work/dpkg.log"
check "dpkg says all three are installed" \
    pk_chroot "$root" sh -c 'for p in victorctl victor-fe-agent victor-controller; do dpkg-query -W -f="\${Status}\n" $p | grep -qx "install ok installed" || exit 1; done'
check "the postinst says what to do next" grep -q 'edit /etc/victor/fe-agent.toml, then: systemctl enable --now victor-fe-agent' "$work/dpkg.log"
check "the system user victor exists, without a login shell" \
    pk_chroot "$root" sh -c 'getent passwd victor | grep -q ":/usr/sbin/nologin$" && [ "$(id -u victor)" -lt 1000 ]'
for f in /usr/bin/victorctl /usr/bin/victor-fe-agent /usr/bin/victor-controller \
    /usr/lib/systemd/system/victor-fe-agent.service /usr/lib/systemd/system/victor-controller.service \
    /etc/victor/fe-agent.toml /etc/victor/controller.toml; do
    check "installed $f" test -e "$root$f"
done
check "the units are not enabled on a first install (the configs must be filled in first)" \
    test ! -e "$root/etc/systemd/system/multi-user.target.wants/victor-fe-agent.service" \
    -a ! -e "$root/etc/systemd/system/multi-user.target.wants/victor-controller.service"
check "the configs are conffiles" pk_chroot "$root" sh -c \
    'dpkg-query -W -f="\${Conffiles}\n" victor-fe-agent victor-controller | grep -c "^ /etc/victor/" | grep -qx 2'

# ---- 2. the units
pk_chroot "$root" systemd-analyze verify victor-fe-agent.service victor-controller.service >"$work/verify.log" 2>&1
status=$?
check "systemd-analyze verify of the installed units (status $status, no complaint)" \
    test $status -eq 0 -a ! -s "$work/verify.log" || cat "$work/verify.log"
unit=$root/usr/lib/systemd/system/victor-fe-agent.service
caps=$(sed -n 's/^AmbientCapabilities=//p' "$unit")
bounding=$(sed -n 's/^CapabilityBoundingSet=//p' "$unit")
user=$(sed -n 's/^User=//p' "$unit")
check "the agent's unit: ambient = bounding capabilities = '$caps', user $user" \
    test "$caps" = "$bounding" -a "$user" = victor -a -n "$caps"
echo "install-test: the agent unit's capabilities: $caps"

# ---- 3. --check-config from the installed paths
for daemon in fe-agent controller; do
    pk_chroot "$root" "victor-$daemon" --config "/etc/victor/$daemon.toml" --check-config >"$work/check.log" 2>&1
    status=$?
    check "the shipped /etc/victor/$daemon.toml parses and says what is required (status $status)" \
        grep -q "required arguments were not provided" "$work/check.log" || cat "$work/check.log"
    check "  ... exit status 2, the unit's RestartPreventExitStatus" test $status -eq 2
done
# The controller on etcd here (the VM test runs it on its embedded store).
cat >"$root/etc/victor/controller.toml" <<'EOF'
mobile-prefix = ["10.10.0.0/16"]
grpc-listen = "127.0.0.1:50051"
http-listen = "127.0.0.1:8080"
etcd-endpoints = ["http://127.0.0.1:2379"]
EOF
cat >"$root/etc/victor/fe-agent.toml" <<'EOF'
controller = ["http://127.0.0.1:50051"]
fe-id = "fe1"
underlay-addr = "198.51.100.1"
vm-port = ["vm*"]
mobile-prefix = ["10.10.0.0/16"]
gateway = ["10.10.0.1"]
dataplane = "tun"
EOF
pk_chroot "$root" victor-fe-agent --config /etc/victor/fe-agent.toml --check-config >"$work/agent.json" 2>&1
check "a filled-in fe-agent.toml is accepted (--check-config)" jq -e '.fe_id == "fe1"' "$work/agent.json" >/dev/null
pk_chroot "$root" victor-controller --config /etc/victor/controller.toml --check-config >"$work/controller.json" 2>&1
check "a filled-in controller.toml is accepted (--check-config)" \
    jq -e '.mobile_prefixes == ["10.10.0.0/16"]' "$work/controller.json" >/dev/null

# ---- 4. a real start with the unit's user and capabilities
ip netns add "$fe_ns" && ip netns add "$vm_ns" || exit 1
ip -n "$fe_ns" link set lo up
ip -n "$fe_ns" link add ul0 type veth peer name ul1
ip -n "$fe_ns" addr add 198.51.100.1/24 dev ul0
ip -n "$fe_ns" link set ul0 up
ip -n "$fe_ns" link set ul1 up
ip -n "$fe_ns" link add vma type veth peer name eth0 netns "$vm_ns"
ip -n "$fe_ns" link set vma up
ip -n "$vm_ns" link set lo up
ip -n "$vm_ns" addr add 10.10.0.11/16 dev eth0
ip -n "$vm_ns" link set eth0 up
ip -n "$vm_ns" route add default via 10.10.0.1
mkdir -p "$work/etcd"
ip netns exec "$fe_ns" etcd --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 >"$work/etcd.log" 2>&1 &
pids+=($!)

setpriv_caps() { # "CAP_A CAP_B" -> +a,+b
    local out="" c
    for c in $1; do out+=",+$(tr '[:upper:]' '[:lower:]' <<<"${c#CAP_}")"; done
    echo "${out#,}"
}
run_as_unit() { # log caps cmd... (in the background; its PID is appended to pids)
    local log=$1 set=-all${2:+,$2}
    shift 2
    PK_NETNS=$fe_ns pk_chroot_cmd "$root" setpriv --reuid=victor --regid=victor --init-groups --no-new-privs \
        --bounding-set="$set" --inh-caps="$set" --ambient-caps="$set" -- "$@"
    "${PK_CMD[@]}" >"$log" 2>&1 &
    pids+=($!)
}
run_as_unit "$work/controller.log" "" victor-controller --config /etc/victor/controller.toml
controller=${pids[-1]}
if pk_wait_http http://127.0.0.1:8080/readyz 60 "$fe_ns"; then
    pass "the controller runs from /usr/bin as victor without capabilities, on etcd, /readyz 200"
else
    fail "the controller did not become ready (log below)"
    tail -n 20 "$work/controller.log"
fi

agent_caps=$(setpriv_caps "$caps")
run_as_unit "$work/agent.log" "$agent_caps" victor-fe-agent --config /etc/victor/fe-agent.toml
agent=${pids[-1]}
if pk_wait_http http://127.0.0.1:9180/readyz 60 "$fe_ns"; then
    pass "the agent runs from /usr/bin as victor with $caps only, synced (/readyz 200)"
else
    fail "the agent did not become ready (log below)"
    tail -n 30 "$work/agent.log"
fi
victor_uid=$(pk_chroot "$root" id -u victor)
field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
names() { capsh --decode="$1" | cut -d= -f2; }
want_caps=$(tr '[:upper:] ' '[:lower:]\n' <<<"$caps" | grep . | sort | paste -sd,)
for set in CapEff CapPrm CapBnd CapAmb; do
    got=$(names "$(field "$agent" "$set")")
    check "the running agent's $set is exactly $want_caps (${got:-empty})" test "$got" = "$want_caps"
done
check "the running agent's uid is victor's ($victor_uid)" test "$(field "$agent" Uid)" = "$victor_uid"
check "the agent created its TUN device victor0 and set its rp_filter (a network sysctl) to 2" \
    test "$(ip netns exec "$fe_ns" cat /proc/sys/net/ipv4/conf/victor0/rp_filter 2>/dev/null)" = 2
check "no sysctl or permission warning in the agent's log" \
    sh -c "! grep -E -i 'could not set a sysctl|permission denied|operation not permitted' '$work/agent.log'"
# A VM on the VM port announces itself (gratuitous ARP, as after a move): the agent captures it
# (AF_PACKET) and the controller binds it.
learned=""
for _ in $(seq 1 50); do
    ip netns exec "$vm_ns" python3 "$here/garp.py" eth0 10.10.0.11
    learned=$(PK_NETNS=$fe_ns pk_chroot "$root" victorctl -o json binding get 10.10.0.11 2>/dev/null | jq -r .fe_id)
    [[ $learned == fe1 ]] && break
    sleep 0.2
done
check "a VM's ARP on the VM port was captured and bound to fe1 (victorctl binding get: ${learned:-none})" \
    test "$learned" = fe1
PK_NETNS=$fe_ns pk_chroot "$root" victorctl binding list >"$work/bindings.log" 2>&1
ip netns exec "$fe_ns" curl -s --max-time 2 http://127.0.0.1:9180/metrics >"$work/agent-metrics.log" 2>&1 || true
PK_NETNS=$fe_ns pk_chroot "$root" victorctl -o json status >"$work/status.json" 2>&1
check "the installed victorctl reaches the controller: store $(jq -r .store_kind "$work/status.json" 2>/dev/null), 1 FE" \
    jq -e '.store_kind == "etcd" and .fe_count == 1' "$work/status.json" >/dev/null
stop_pid "$agent"
check "the agent exits 0 on SIGTERM" test $? -eq 0

# ---- 5. minimal: each capability is needed
for c in $caps; do
    rest=$(setpriv_caps "${caps//$c/}")
    run_as_unit "$work/agent-without-$c.log" "$rest" victor-fe-agent --config /etc/victor/fe-agent.toml
    pid=${pids[-1]}
    status=timeout
    for _ in $(seq 1 150); do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null
            status=$?
            break
        fi
        sleep 0.2
    done
    why=$(grep -E -i 'denied|not permitted|needs CAP' "$work/agent-without-$c.log" | tail -n 1 | cut -c1-240)
    check "without $c the agent fails to start for want of it (status $status: ${why:-no such error in the log})" \
        test "$status" != timeout -a "$status" != 0 -a -n "$why"
    [[ $status == timeout ]] && kill "$pid"
done

stop_pid "$controller"
check "the controller exits 0 on SIGTERM" test $? -eq 0

# ---- purge leaves nothing of the packages but the user and /var/lib/victor
pk_chroot "$root" dpkg --purge victor-fe-agent victor-controller victorctl >"$work/purge.log" 2>&1
check "dpkg --purge of the three packages" test $? -eq 0
check "  ... binaries, units and configs are gone" sh -c "! ls '$root'/usr/bin/victor* '$root'/etc/victor/*.toml \
    '$root'/usr/lib/systemd/system/victor-* 2>/dev/null"

echo "install-test: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
