#!/bin/bash
# Session TTL A/B (fewer lease renewals on the load core): 10 s vs 30 s, alternating, 3 runs each.
for round in 1 2; do
for ttl in 10s 30s; do
  VICTOR_SESSION_TTL=$ttl /work/rel/release/victor-lab bench --fes 1000 --bindings 20000 --churn 100 --seconds 10 --replicas 1 --repeats 3 --output /work/notes/s30/ttl-$ttl-r$round.json > /work/notes/s30/ttl-$ttl-r$round.log 2>&1
  echo "$ttl round=$round rc=$? $(date +%T)"
done
done
