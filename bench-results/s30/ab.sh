#!/bin/bash
# A/B of controller binaries: ab.sh <tag> <share> <repeats> bin1 bin2 ...
tag=$1; share=$2; rep=$3; shift 3
for round in 1 2; do
for bin in "$@"; do
  name=$(basename $bin)
  /work/rel/release/victor-lab bench --fes 1000 --bindings 20000 --churn 100 --seconds 10 --replicas 1 --repeats $rep --fanout-share $share --controller-bin $bin --output /work/notes/s30/$tag-$name-s$share-r$round.json > /work/notes/s30/$tag-$name-s$share-r$round.log 2>&1
  echo "$name share=$share round=$round rc=$? $(date +%T)"
done
done
