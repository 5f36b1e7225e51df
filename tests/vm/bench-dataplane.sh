#!/usr/bin/env bash
# The data-plane figures of BENCHMARKS.md ("Kernel data plane"), measured in one stock-kernel
# guest (tests/vm/run) side by side: the kernel data plane and the userspace one, each with the
# lab's migration (packets lost per move, data-plane convergence; `victor-lab migrate`, move and
# clone switch) and one iperf3 TCP flow as a ratio to plain veth routing in the same guest
# (fe-agent/tests/throughput.rs). Release builds (the userspace forwarder is compiled code on the
# packet path); build them first:
#
#   cargo build --release -p victor-tests --bin victor-lab -p victor-controller --bin victor-controller \
#       -p victor-fe-agent --bin victor-fe-agent
#   cargo test --release -p victor-fe-agent --test throughput --no-run
#   tests/vm/bench-dataplane.sh [--moves 10] [--rounds 3] [--seconds 5]
#
# The JSON reports land in target/vm/runs/<run>/bench/ (the runner prints the run directory);
# a summary is printed at the end. Exit status: the runner's (77 = SKIPPED: no QEMU or kernel).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/../.." || exit 1
moves=10 rounds=3 seconds=5
while [[ $# -gt 0 ]]; do
    case "$1" in
        --moves) moves=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --seconds) seconds=$2; shift ;;
        *) echo "usage: $0 [--moves N] [--rounds N] [--seconds N]" >&2; exit 2 ;;
    esac
    shift
done
# the newest release build of the throughput test (executables only: not .d or leftover objects)
throughput=$(find target/release/deps -maxdepth 1 -name 'throughput-*' -type f -executable -printf '%T@ %p\n' 2>/dev/null |
    sort -rn | head -1 | cut -d' ' -f2)
for bin in target/release/victor-lab target/release/victor-controller target/release/victor-fe-agent "$throughput"; do
    [[ -n $bin && -x $bin ]] || { echo "missing release build ${bin:-throughput test}: see the header of $0" >&2; exit 2; }
done

job=target/vm/bench-dataplane-job.sh
mkdir -p target/vm
cat >"$job" <<EOF
set -u
out=/run/victor-vm/out/bench
mkdir -p "\$out"
cd "$PWD"
for plane in kernel tun; do
    for switch in move clone; do
        echo "== migrate: \$plane, \$switch, $moves moves"
        target/release/victor-lab migrate --dataplane "\$plane" --switch "\$switch" --moves $moves \\
            --ping-interval-ms 10 --etcd-members 0 --json --out "\$out/migrate-\$plane-\$switch.json" >/dev/null || exit 1
    done
done
echo "== throughput: $rounds x $seconds s per path"
cd fe-agent && VICTOR_THROUGHPUT_OUT="\$out/throughput.json" VICTOR_THROUGHPUT_ROUNDS=$rounds \\
    VICTOR_THROUGHPUT_SECONDS=$seconds "$PWD/$throughput" --ignored --exact kernel_and_userspace_tunnels_vs_plain_veth
EOF
bash "$here/run" --timeout 3600 --cmd "bash $job"
status=$?
dir=$(readlink -f target/vm/runs/latest)/bench
if [[ $status -eq 0 && -d $dir ]]; then
    python3 - "$dir" <<'PY'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
print(f"results in {d}")
for f in sorted(d.glob("migrate-*.json")):
    r = json.loads(f.read_text())
    c, dc = r["convergence_ms"], r["dataplane_convergence_ms"]
    print(f"{f.stem:22} {r['dataplane'][:6]:6} lost total {r['lost_total']:4} max/move {r['lost_max_per_move']:3}"
          f" | convergence p50 {c['p50']:7.1f} p99 {c['p99']:7.1f} | data plane p50 {dc['p50']:7.1f} p99 {dc['p99']:7.1f} ms")
t = json.loads((d / "throughput.json").read_text())
base = t["plain_veth"]["gbit_s_median"]
print(f"throughput (median of {t['rounds']} x {t['seconds']} s): plain veth {base:.3f} Gbit/s")
for plane in ("kernel", "tun"):
    p = t[plane]
    print(f"  {plane:6} {p.get('gbit_s_median', 0):.3f} Gbit/s, ratio {p.get('ratio_to_plain_veth', 0):.2f}" if "skipped" not in p else f"  {plane}: skipped ({p['skipped']})")
PY
fi
exit "$status"
