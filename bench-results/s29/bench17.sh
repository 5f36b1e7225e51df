#!/bin/bash
# Issue 17: fan-out share sweep on a quiet host, 1,000 FEs, one replica-core, 100 moves/s, 5 repeats.
cd "$(git rev-parse --show-toplevel)"
for sh in 0.5 0.75 1.0; do
  target/release/victor-lab bench --fes 1000 --bindings 20000 --churn 100 --seconds 10 --replicas 1 --repeats 5 --fanout-share $sh --output bench-results/s29/share-$sh-100.json > /dev/null
  echo "$sh rc=$? $(date)"
done
