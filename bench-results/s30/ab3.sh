#!/bin/bash
# ab3.sh <tag> <share> <repeats> <controller> lab...
tag=$1; share=$2; rep=$3; ctl=$4; shift 4
for round in 1 2; do
for lab in "$@"; do
  name=$(basename $lab)
  $lab bench --fes 1000 --bindings 20000 --churn 100 --seconds 10 --replicas 1 --repeats $rep --fanout-share $share --controller-bin $ctl --output /work/notes/s30/$tag-$name-s$share-r$round.json > /work/notes/s30/$tag-$name-s$share-r$round.log 2>&1
  echo "$name share=$share round=$round rc=$? $(date +%T)"
done
done
