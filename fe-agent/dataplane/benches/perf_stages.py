#!/usr/bin/env python3
"""Splits a system-wide `perf record -a -g` profile of the throughput example into forwarding
stages (by thread name and call chain) and prints CPU seconds per stage and microseconds per
underlay packet.

    perf record -a -g -o perf.data -- sleep 4      # while the example's tunnel phase runs
    perf script -i perf.data | python3 perf_stages.py --seconds 4 --packets N

N = underlay packets forwarded during the recording (e.g. Gbit/s x seconds / 8 / packet size).
"""
import argparse
import collections
import re
import sys

# Forwarder threads (`fwd-<tun>...`): which syscall the sample is in, and whether it is the kernel's
# receive processing of the next hop that the syscall ran as a softirq on its way out.
SYSCALLS = [
    ("sendmmsg", "underlay send (sendmmsg -> raw_sendmsg -> ip_output -> veth)"),
    ("recvmmsg", "underlay receive (recvmmsg: copy out of the raw socket)"),
    ("tun_chr_write_iter", "TUN write (tun_get_user)"),
    ("tun_chr_read_iter", "TUN read (copy out of the TUN)"),
    ("epoll_wait", "waiting / wakeups (epoll)"),
]
SOFTIRQ = ("net_rx_action", "process_backlog", "__napi_poll")
OTHERS = [
    (r"^iperf3", "iperf3 client + server (TCP, copies, their softirqs)"),
    (r"^(ksoftirqd|napi/)", "softirq threads (ksoftirqd, threaded NAPI)"),
    (r"^swapper", "idle"),
    (r".*", "other load on the machine (compilers of other sessions, ...)"),
]


def classify(comm, frames):
    if comm.startswith("fwd-"):
        tag = comm[len("fwd-"):]
        for frame, label in SYSCALLS:
            if any(frame in f for f in frames):
                if any(s in f for f in frames for s in SOFTIRQ):
                    label += ", softirq part: receive processing of the next hop"
                return f"{tag:8} {label}"
        return f"{tag:8} forwarder userspace (parse, split, encap, GRO, checksums)"
    for comm_re, label in OTHERS:
        if re.match(comm_re, comm):
            return f"{'':8} {label}"
    return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, required=True, help="length of the recording")
    ap.add_argument("--packets", type=float, default=0, help="underlay packets in that time")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()
    counts = collections.Counter()
    comm, frames, total = None, [], 0
    for line in sys.stdin:
        if not line.strip():
            if comm is not None:
                counts[classify(comm, frames)] += 1
                total += 1
            comm, frames = None, []
        elif not line.startswith((" ", "\t")):
            comm = re.split(r"\s+\d+(/\d+)?\s+", line.strip(), maxsplit=1)[0]
        else:
            frames.append(line.strip())
    if comm is not None:
        counts[classify(comm, frames)] += 1
        total += 1
    per_sample = args.seconds * args.cpus / total
    print(f"{total} samples, {per_sample * 1e3:.3f} ms of CPU each")
    for label, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        cpu = n * per_sample
        us = f"{cpu / args.packets * 1e6:7.2f} us/packet" if args.packets else ""
        print(f"{cpu:7.3f} CPU-s {100 * n / total:5.1f} %  {us}  {label}")


if __name__ == "__main__":
    main()
