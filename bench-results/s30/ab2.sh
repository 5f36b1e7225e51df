#!/bin/bash
# ab2.sh <tag> <share> <repeats> <members> bin...
tag=$1; share=$2; rep=$3; mem=$4; shift 4
for round in 1 2; do
for bin in "$@"; do
  name=$(basename $bin)
  /work/rel/lab-sized bench --fes 1000 --bindings 20000 --churn 100 --seconds 10 --replicas 1 --etcd-members $mem --repeats $rep --fanout-share $share --controller-bin $bin --output /work/notes/s30/$tag-$name-s$share-m$mem-r$round.json > /work/notes/s30/$tag-$name-s$share-m$mem-r$round.log 2>&1
  echo "$name share=$share m=$mem round=$round rc=$? $(date +%T)"
done
done
