#!/bin/bash
# Runs inside the VM runner's guest (tests/vm/run --init /lib/systemd/systemd), started by systemd
# as `systemd.run=` (kernel-command-line.service): the packages under systemd, as on a router.
# Started by packaging/tests/vm-test.sh, which wrote `params` into the out share:
#   DEBS=<directory of the .deb files>  HERE=<packaging/tests>
#
# Installs the packages with dpkg -i (into the guest's tmpfs overlay: the host is not touched),
# sets up an underlay and a VM port, loads ipip as a border router would (the agent's `auto` data
# plane then takes the kernel's ipip driver), starts victor-controller and victor-fe-agent with
# `systemctl start` (Type=notify: it returns when READY=1 arrived) and checks what systemd and
# the kernel say about them: active, the unit's user and capabilities, the status line, ARP
# learning through the unit's capabilities, logs in the journal, a watchdog restart of a frozen
# agent, the restart an upgrade's postinst does, a clean stop. Writes `PASS|FAIL <check>` lines to results.txt in the out share, the
# journal of both units to journal.txt, then powers the VM off (isa-debug-exit: 0 passed, 1 not).
# shellcheck disable=SC2016 # single-quoted commands run by sh -c
out=/run/victor-vm/out
exec </dev/null >"$out/guest.log" 2>&1
set -u
# shellcheck source=/dev/null
. "$out/params"
results=$out/results.txt
: >"$results"
pass() { echo "PASS $*" >>"$results"; }
fail() { echo "FAIL $*" >>"$results"; }
check() { # description command...
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; return 1; fi
}
power_off() {
    journalctl --no-pager -o short-monotonic -u victor-controller -u victor-fe-agent >"$out/journal.txt" 2>&1
    grep -q '^FAIL' "$results" && code=1 || code=0
    echo "uptime_end=$(cut -d' ' -f1 /proc/uptime)" >>"$out/guest.env"
    sync
    # shellcheck disable=SC2059 # the format is the byte to write
    printf "\\$(printf '%03o' "$code")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    systemctl poweroff --force --force
}
trap power_off EXIT
echo "uptime_start=$(cut -d' ' -f1 /proc/uptime)" >"$out/guest.env"
echo "systemd=$(systemctl --version | head -n 1)" >>"$out/guest.env"
show() { systemctl show -P "$2" "$1"; }
field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# ---- install
check "dpkg -i the three packages under systemd (postinst: user, daemon-reload)" \
    dpkg -i "$DEBS"/victorctl_*.deb "$DEBS"/victor-fe-agent_*.deb "$DEBS"/victor-controller_*.deb || exit
check "the units are known to systemd, not enabled on a first install" \
    test "$(systemctl is-enabled victor-fe-agent.service victor-controller.service | sort -u)" = disabled

# ---- the FE's links: an underlay, a VM port with a VM behind it
ip link set lo up
ip link add ul0 type veth peer name ul1 && ip addr add 198.51.100.1/24 dev ul0 &&
    ip link set ul0 up && ip link set ul1 up
ip netns add vm && ip link add vma type veth peer name eth0 netns vm && ip link set vma up &&
    ip -n vm addr add 10.10.0.11/16 dev eth0 && ip -n vm link set eth0 up && ip -n vm link set lo up
modprobe ipip || echo "no ipip module: the agent takes the TUN data plane"
cat >/etc/victor/controller.toml <<'EOF'
mobile-prefix = ["10.10.0.0/16"]
EOF
cat >/etc/victor/fe-agent.toml <<'EOF'
controller = ["http://127.0.0.1:50051"]
fe-id = "fe1"
underlay-addr = "198.51.100.1"
vm-port = ["vm*"]
mobile-prefix = ["10.10.0.0/16"]
gateway = ["10.10.0.1"]
EOF

# ---- the controller (embedded store in its StateDirectory)
check "systemctl start victor-controller returned (after READY=1)" timeout 300 systemctl start victor-controller
check "victor-controller is active (running)" \
    test "$(show victor-controller ActiveState)/$(show victor-controller SubState)" = active/running
check "victor-controller: Type=notify, WatchdogUSec=30s" \
    test "$(show victor-controller Type) $(show victor-controller WatchdogUSec)" = "notify 30s"
pid=$(show victor-controller MainPID)
check "victor-controller runs as victor with no capability" \
    test "$(field "$pid" Uid) $(field "$pid" CapEff) $(field "$pid" CapBnd)" = "$(id -u victor) 0000000000000000 0000000000000000"
check "victor-controller's /readyz answers 200 once systemd says active" \
    test "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/readyz)" = 200
check "the embedded store is in the unit's StateDirectory" test -f /var/lib/victor/controller/victor.redb

# ---- the agent (with a shorter watchdog for the freeze test below, in a runtime drop-in)
check "the shipped agent unit has WatchdogSec=30s" grep -qx 'WatchdogSec=30s' /usr/lib/systemd/system/victor-fe-agent.service
mkdir -p /run/systemd/system/victor-fe-agent.service.d
printf '[Service]\nWatchdogSec=8s\nTimeoutAbortSec=2s\n' >/run/systemd/system/victor-fe-agent.service.d/test.conf
systemctl daemon-reload
check "systemctl start victor-fe-agent returned (after READY=1: synced)" timeout 300 systemctl start victor-fe-agent
check "victor-fe-agent is active (running)" \
    test "$(show victor-fe-agent ActiveState)/$(show victor-fe-agent SubState)" = active/running
pid=$(show victor-fe-agent MainPID)
caps=$(capsh --decode="$(field "$pid" CapEff)" | cut -d= -f2)
check "victor-fe-agent runs as victor with CapEff $caps" \
    test "$(field "$pid" Uid) $caps" = "$(id -u victor) cap_net_admin,cap_net_raw"
check "victor-fe-agent: CapBnd and CapAmb are the same two" \
    test "$(field "$pid" CapBnd) $(field "$pid" CapAmb)" = "$(field "$pid" CapEff) $(field "$pid" CapEff)"
check "the agent's /readyz answers 200 once systemd says active" \
    test "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9180/readyz)" = 200
status=$(show victor-fe-agent StatusText)
check "the agent's status line: '$status'" test "$status" = "synced, controller stream up"
dataplane=$(journalctl -u victor-fe-agent -o cat | sed -n 's/.*data plane chosen dataplane="\([a-z]*\)".*/\1/p' | tail -n 1)
check "the agent logs to the journal (data plane: ${dataplane:-?})" test -n "$dataplane"
echo "dataplane=$dataplane" >>"$out/guest.env"
learned=""
for _ in $(seq 1 50); do
    ip netns exec vm python3 "$HERE/garp.py" eth0 10.10.0.11
    learned=$(victorctl -o json binding get 10.10.0.11 2>/dev/null | jq -r .fe_id)
    [[ $learned == fe1 ]] && break
    sleep 0.2
done
check "a VM's gratuitous ARP was captured and bound to fe1 (${learned:-none})" test "$learned" = fe1

# ---- the watchdog: a frozen agent is restarted
frozen=$(show victor-fe-agent MainPID)
restarts=$(show victor-fe-agent NRestarts)
kill -STOP "$frozen"
for _ in $(seq 1 300); do
    [[ $(show victor-fe-agent NRestarts) -gt $restarts && $(show victor-fe-agent ActiveState) == active ]] && break
    sleep 0.2
done
check "a frozen agent (SIGSTOP) was killed by the watchdog and restarted, ready again" \
    test "$(show victor-fe-agent NRestarts)" -gt "$restarts" -a "$(show victor-fe-agent ActiveState)" = active \
    -a "$(show victor-fe-agent MainPID)" != "$frozen"
check "  ... the journal says why: watchdog timeout" \
    sh -c 'journalctl -u victor-fe-agent -o cat | grep -q -i "watchdog timeout"'

# ---- an upgrade restarts the running agent on the new binary: the postinst as dpkg runs it on
# an upgrade from 0.0.1 (a second dpkg -i costs a minute under TCG: dpkg reads the host's database)
before=$(show victor-fe-agent MainPID)
/var/lib/dpkg/info/victor-fe-agent.postinst configure 0.0.1 >>"$out/upgrade.log" 2>&1
check "the postinst of an upgrade restarted the running agent (try-restart), ready again" \
    test "$(show victor-fe-agent ActiveState)" = active -a "$(show victor-fe-agent MainPID)" != "$before"

# ---- a clean stop
check "systemctl stop of both: inactive, Result=success" \
    sh -c 'systemctl stop victor-fe-agent victor-controller &&
           [ "$(systemctl show -P Result victor-fe-agent) $(systemctl show -P Result victor-controller)" = "success success" ]'
check "the agent stopped on SIGTERM, kernel state kept (journal)" \
    sh -c 'journalctl -u victor-fe-agent -o cat | grep -q "SIGTERM: exiting (kernel state is kept"'
