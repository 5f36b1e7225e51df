#!/usr/bin/env bash
# The migration benchmark matrix of BENCHMARKS.md: `victor-lab migrate` with 20 moves at 10 ms and
# 1 ms ping intervals, 1- and 3-member etcd, both switch modes, on a release build. Writes one JSON
# per run into bench-results/ and prints a summary line each. Run as root.
# Usage: tests/bench-migrate.sh [moves]   (VICTOR_BENCH_NO_BUILD=1: use the release build as it is)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
moves=${1:-20}
[[ ${VICTOR_BENCH_NO_BUILD:-0} == 1 ]] || cargo build --release -q -p victor-tests -p victor-controller -p victor-fe-agent --bins
mkdir -p bench-results
for switch in move clone; do
    for etcd in 1 3; do
        for interval in 10 1; do
            out="bench-results/migrate-${switch}-etcd${etcd}-${interval}ms.json"
            target/release/victor-lab migrate --moves "$moves" --ping-interval-ms "$interval" --etcd-members "$etcd" \
                --switch "$switch" --json --out "$out" >/dev/null
            python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, s, d = r["convergence_ms"], r["link_switch_ms"], r.get("dataplane_convergence_ms", {})
print(f'{r["switch"]:5} etcd={r["etcd_members"]} ping={r["ping_interval_ms"]:>2}ms moves={r["moves"]} '
      f'lost={r["lost_total"]} (max/move {r["lost_max_per_move"]}, during switch {r["lost_during_link_switch"]}) '
      f'convergence p50={c["p50"]} p99={c["p99"]} ms  data plane p50={d.get("p50")} p99={d.get("p99")} ms  '
      f'switch p50={s["p50"]} ms  load={r["load_avg_1m"]}')
PY
        done
    done
done
