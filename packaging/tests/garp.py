#!/usr/bin/env python3
"""Sends a gratuitous ARP for IP from interface IFACE, as a hypervisor does for a VM after a move:
`garp.py IFACE IP`. Used by the package tests to make a VM known to an agent (the host may have
no ping or arping)."""

import socket
import struct
import sys


def main() -> None:
    iface, ip = sys.argv[1], socket.inet_aton(sys.argv[2])
    with open(f"/sys/class/net/{iface}/address") as f:
        mac = bytes.fromhex(f.read().strip().replace(":", ""))
    # Ethernet (broadcast, ARP) + ARP request, Ethernet/IPv4, sender = target = the VM's IP.
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    frame = b"\xff" * 6 + mac + struct.pack("!H", 0x0806) + arp
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        s.send(frame)


if __name__ == "__main__":
    main()
