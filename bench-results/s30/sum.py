#!/usr/bin/env python3
"""Summarise victor-lab bench JSON files: per file, per run conv p50/p99, stages, cost."""
import json, sys, statistics as st
for f in sys.argv[1:]:
    d = json.load(open(f))
    runs = d['runs'] if 'runs' in d else [d]
    rows = []
    for r in runs:
        s = r.get('controller_stages_ms') or {}
        c = r['controller_cost']
        rows.append((r['convergence_ms']['p50'], r['convergence_ms']['p99'], s.get('commit', {}).get('p99', 0),
                     s.get('fan_out', {}).get('p50', 0), s.get('fan_out', {}).get('p99', 0), c['us_per_message'], c['churn_cores'],
                     r['cpu_during_churn_s']['etcd'], r['cpu_during_churn_s']['bench']))
    name = f.split('/')[-1]
    print(f"{name}: n={len(rows)}")
    for row in rows:
        print("   p50 %6.1f p99 %6.1f | commit99 %5.1f fan50 %5.1f fan99 %5.1f | us/msg %5.1f cores %.2f etcd %.2f bench %.2f" % row)
    p99 = sorted(r[1] for r in rows); p50 = sorted(r[0] for r in rows)
    print("   p50 min/med/max %.1f/%.1f/%.1f  p99 min/med/max %.1f/%.1f/%.1f  p99<=50: %d/%d" % (p50[0], st.median(p50), p50[-1], p99[0], st.median(p99), p99[-1], sum(x <= 50 for x in p99), len(p99)))
