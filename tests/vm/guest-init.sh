#!/bin/bash
# PID 1 of the VM runner's guest, started by the initramfs after switch_root into the host's root
# (a read-only 9p mount under a tmpfs overlay). Runs the jobs the host wrote to
# /run/victor-vm/out/jobs.tsv one after the other, each in its own process with its output in
# logs/<n>.log, records `<n> <exit status> <seconds>` per job in results.tsv, and powers the VM off
# through QEMU's isa-debug-exit device. The host-side runner (tests/vm/run) reads the files back;
# they are authoritative, the debug-exit status is a cross-check.
#
# jobs.tsv: one job a line, tab-separated: name, working directory, timeout (s), argv...
# env.sh:   the environment of the jobs (sourced).
out=/run/victor-vm/out
exec </dev/null >/dev/console 2>&1
read -r boot_s _ </proc/uptime

# isa-debug-exit (iobase 0xf4): QEMU exits with status (code << 1) | 1.
# Codes: 0 every job passed, 1 a job failed, 2 the guest could not run the jobs.
power_off() {
    sync
    # shellcheck disable=SC2059 # the format is the byte to write
    printf "\\$(printf '%03o' "$1")" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 10
}
say() { echo "vm: $*"; }

hostname victor-vm
ip link set lo up 2>/dev/null
# shellcheck source=/dev/null
[[ -f $out/env.sh ]] && . "$out/env.sh"
if [[ ! -f $out/jobs.tsv ]]; then
    say "no jobs.tsv in the out share"
    power_off 2
fi

kver=$(uname -r)
{
    echo "kernel=$kver"
    echo "boot_uptime=$boot_s"
    echo "cpus=$(nproc)"
    echo "mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
} >"$out/guest.env"
say "up after ${boot_s}s (guest uptime), kernel $kver"

mkdir -p "$out/logs"
: >"$out/results.tsv"
failed=0
n=0
while IFS=$'\t' read -r -a job; do
    [[ ${#job[@]} -ge 4 ]] || continue
    n=$((n + 1))
    name=${job[0]} cwd=${job[1]} limit=${job[2]}
    argv=("${job[@]:3}")
    start=$(date +%s%N)
    (cd "$cwd" && exec timeout -k 10 "$limit" "${argv[@]}") >"$out/logs/$n.log" 2>&1
    rc=$?
    secs=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
    printf '%s\t%s\t%s\n' "$n" "$rc" "$secs" >>"$out/results.tsv"
    if [[ $rc -eq 0 ]]; then
        say "PASS [${secs}s] $name"
    else
        failed=1
        [[ $rc -eq 124 ]] && say "TIMEOUT after ${limit}s: $name"
        say "FAIL [${secs}s] $name (exit status $rc)"
    fi
done <"$out/jobs.tsv"
read -r end_s _ </proc/uptime
echo "end_uptime=$end_s" >>"$out/guest.env"
echo "done" >"$out/finished"
power_off "$failed"
