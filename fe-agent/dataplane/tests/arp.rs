//! ARP capture and sending on a real VM-facing port (root needed): the VM behind fe2 sends a
//! gratuitous ARP, fe2's capture sees it with the right IP, MAC and timestamp; garbage is
//! counted; a burst larger than a default socket buffer waits in the capture's buffer instead of
//! being dropped by the kernel; a proxy-ARP reply sent by fe2 reaches the VM's side.

mod common;

use std::time::Duration;

use common::*;
use victor_dataplane::arp_io::{ArpCapture, ArpSender, monotonic_ns};
use victor_dataplane::packet::arp::{self, ArpKind, ArpOp, MacAddr};

#[test]
fn garp_from_the_vm_is_captured_and_garbage_counted() {
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    let fe2 = lab.ns(2);

    let result = fe2
        .block_on(|| async {
            let capture = ArpCapture::open("vm0").unwrap();
            // The VM side: a garbage ARP frame (hardware type 6), an IPv4 frame (filtered out by
            // BPF, never even counted), then the gratuitous ARP.
            let sent_at = lab
                .vm
                .run_in(move || {
                    let sender = ArpSender::open("eth0").unwrap();
                    assert_eq!(sender.mac(), vm_mac);
                    let garp = arp::gratuitous(vm_mac, VM, ArpOp::Request, None);
                    let mut garbage = arp::build_frame(&garp);
                    garbage[14..16].copy_from_slice(&6u16.to_be_bytes());
                    sender.send_raw(&garbage).unwrap();
                    let mut ipv4 = arp::build_frame(&garp);
                    ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                    sender.send_raw(&ipv4).unwrap();
                    let at = monotonic_ns();
                    sender.send(&garp).unwrap();
                    at
                })
                .unwrap();
            let got = loop {
                let c = tokio::time::timeout(Duration::from_secs(5), capture.recv())
                    .await
                    .expect("a GARP within 5 s")
                    .unwrap();
                // The kernel may send its own ARP/ND chatter on the port; wait for ours.
                if c.message.kind() == ArpKind::Gratuitous(ArpOp::Request) {
                    break c;
                }
            };
            let after = monotonic_ns();

            (got, sent_at, after, capture.stats())
        })
        .unwrap();
    let (got, sent_at, after, stats) = result;
    assert_eq!(got.message.sender_ip, VM);
    assert_eq!(got.message.sender_mac, vm_mac);
    assert!(got.message.is_gratuitous());
    assert!(
        got.mono_ns + 1_000_000 >= sent_at && got.mono_ns <= after,
        "capture time {} outside [{sent_at}, {after}]",
        got.mono_ns
    );
    assert_eq!(stats.malformed("hardware_type"), 1, "{stats:?}");
    assert_eq!(stats.malformed("not_arp"), 0, "the BPF filter keeps non-ARP out: {stats:?}");
    assert!(stats.parsed >= 1);
}

#[test]
fn a_burst_the_agent_has_not_read_yet_is_kept_not_dropped() {
    // 800 frames take ~600 KB of socket buffer: three times the kernel's default (212,992 B).
    const BURST: u64 = 800;
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    let (received, stats) = lab
        .ns(2)
        .block_on(|| async {
            let capture = ArpCapture::open("vm0").unwrap();
            // Nobody reads while the VM sends the whole burst.
            lab.vm
                .run_in(move || {
                    let sender = ArpSender::open("eth0").unwrap();
                    let garp = arp::gratuitous(vm_mac, VM, ArpOp::Request, None);
                    for _ in 0..BURST {
                        sender.send(&garp).unwrap();
                    }
                })
                .unwrap();
            let mut received = 0;
            while let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(500), capture.recv()).await {
                received += u64::from(c.message.sender_ip == VM && c.message.is_gratuitous());
            }
            (received, capture.stats())
        })
        .unwrap();
    assert_eq!(stats.kernel_dropped, 0, "{stats:?}");
    assert_eq!(received, BURST, "{stats:?}");
}

#[test]
fn proxy_arp_reply_reaches_the_requester() {
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    // The VM side listens for ARP replies.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let listener = lab
        .vm
        .spawn_thread("vm-arp", move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let capture = ArpCapture::open("eth0").unwrap();
                ready_tx.send(()).unwrap();
                tokio::time::timeout(Duration::from_secs(5), async {
                    loop {
                        let c = capture.recv().await.unwrap();
                        if c.message.kind() == ArpKind::Reply {
                            return c.message;
                        }
                    }
                })
                .await
            })
        })
        .unwrap();
    ready_rx.recv().unwrap();
    // fe2 answers the VM's request for its gateway (proxy ARP) from its port's MAC.
    let request = arp::ArpMessage {
        eth_dst: MacAddr::BROADCAST,
        eth_src: vm_mac,
        vlan: None,
        op: ArpOp::Request,
        sender_mac: vm_mac,
        sender_ip: VM,
        target_mac: MacAddr::ZERO,
        target_ip: GATEWAY,
    };
    let fe_mac = lab
        .ns(2)
        .run_in(move || {
            let sender = ArpSender::open("vm0").unwrap();
            sender.send(&arp::reply_to(&request, sender.mac())).unwrap();
            sender.mac()
        })
        .unwrap();
    let reply = listener.join().unwrap().expect("the VM saw the reply within 5 s");
    assert_eq!(reply.sender_ip, GATEWAY);
    assert_eq!(reply.sender_mac, fe_mac);
    assert_eq!(reply.eth_dst, vm_mac);
    assert_eq!(reply.target_ip, VM);
}
