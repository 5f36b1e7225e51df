#!/bin/bash
# Issue 18: announced (relay) vs not, release build, 10 moves per run, agents at normal priority.
cd "$(git rev-parse --show-toplevel)"
L=target/release/victor-lab
O=bench-results/s29
for ping in 1 10; do
  for nic in virtio e1000; do
    for ann in announced unannounced; do
      [ $ping = 10 ] && [ $ann = unannounced ] && continue
      flag=""; [ $ann = unannounced ] && flag="--no-announce"
      $L migrate --vm qemu --nic $nic --moves 10 --ping-interval-ms $ping $flag --json --out $O/migrate-qemu-$nic-${ping}ms-$ann.json > /dev/null
      echo "$nic $ping $ann rc=$? $(date)"
    done
  done
done
