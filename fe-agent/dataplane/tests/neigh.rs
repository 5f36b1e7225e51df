//! ARP, RARP and NDP capture and sending on a real VM-facing port (root needed): what a VM's
//! kernel sends by itself (DAD when an address is added, solicitations when it resolves a
//! neighbour, solicited advertisements answering our NUD probe), what a hypervisor sends (QEMU's
//! RARP announce) and what a moved guest sends (unsolicited NA), each captured by fe2 with the
//! right meaning and a kernel timestamp; malformed frames counted per protocol and reason; a
//! proxy advertisement from fe2 fills the VM's neighbour table.

mod common;

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use common::*;
use victor_dataplane::arp_io::monotonic_ns;
use victor_dataplane::neigh_io::{Captured, Frame, FrameSender, NeighCapture, Protocol, Protocols};
use victor_dataplane::packet::arp::MacAddr;
use victor_dataplane::packet::ndp::{self, NdpKind};
use victor_dataplane::packet::rarp;

const T: Duration = Duration::from_secs(5);

/// The next captured frame for which `pick` returns something, within `timeout`.
async fn next<R>(capture: &NeighCapture, timeout: Duration, mut pick: impl FnMut(&Captured) -> Option<R>) -> R {
    tokio::time::timeout(timeout, async {
        loop {
            let c = capture.recv().await.unwrap();
            if let Some(r) = pick(&c) {
                return r;
            }
        }
    })
    .await
    .expect("the frame within the timeout")
}

#[test]
fn dad_unsolicited_na_rarp_and_garbage_from_the_vm() {
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    let claimed: Ipv6Addr = "2001:db8:10::21".parse().unwrap();
    let (dad, na, announce, stats) = lab
        .ns(2)
        .block_on(|| async {
            let capture = NeighCapture::open("vm0", Protocols::ALL).unwrap();
            // The VM's kernel probes an address it is given (DAD, with Linux's nonce option).
            let dad_from = monotonic_ns();
            lab.vm.ip(&["-6", "addr", "add", &format!("{claimed}/64"), "dev", "eth0"]).unwrap();
            let dad = next(&capture, T, |c| match c.frame {
                Frame::Ndp(m) if m.kind() == NdpKind::Dad && m.target() == Some(claimed) => Some(c.clone()),
                _ => None,
            })
            .await;
            assert!(dad.mono_ns >= dad_from && dad.mono_ns <= monotonic_ns(), "kernel timestamp in the window");

            // A moved guest announces itself; a hypervisor sends QEMU's RARP; garbage of each kind.
            let sent_at = lab
                .vm
                .run_in(move || {
                    let s = FrameSender::open("eth0").unwrap();
                    let mut hop64 = ndp::build_frame(&ndp::unsolicited_advertisement(vm_mac, VM6, false, None));
                    hop64[14 + 7] = 64;
                    s.send_raw(&hop64).unwrap();
                    let mut bad_sum = ndp::build_frame(&ndp::dad(vm_mac, VM6, None));
                    bad_sum[14 + 40 + 2] ^= 0xff;
                    s.send_raw(&bad_sum).unwrap();
                    let mut rarp_op1 = rarp::build_frame(&rarp::announce(vm_mac));
                    rarp_op1[21] = 1;
                    s.send_raw(&rarp_op1).unwrap();
                    let at = monotonic_ns();
                    s.send_ndp(&ndp::unsolicited_advertisement(vm_mac, VM6, false, None)).unwrap();
                    s.send_rarp(&rarp::announce(vm_mac)).unwrap();
                    at
                })
                .unwrap();
            let na = next(&capture, T, |c| match c.frame {
                Frame::Ndp(m) if m.kind() == NdpKind::UnsolicitedAdvertisement && m.target() == Some(VM6) => {
                    Some(c.clone())
                }
                _ => None,
            })
            .await;
            assert!(na.mono_ns + 1_000_000 >= sent_at, "capture {} before send {sent_at}", na.mono_ns);
            let announce = next(&capture, T, |c| match c.frame {
                Frame::Rarp(m) => Some(m),
                _ => None,
            })
            .await;
            (dad, na, announce, capture.stats())
        })
        .unwrap();

    let Frame::Ndp(dad) = dad.frame else { unreachable!() };
    assert_eq!(dad.claim(), Some((claimed, vm_mac)), "DAD claims the target for the VM's MAC");
    assert!(dad.ip_src.is_unspecified());
    let Frame::Ndp(na) = na.frame else { unreachable!() };
    assert_eq!(na.claim(), Some((VM6, vm_mac)));
    assert!(announce.is_hypervisor_announce());
    assert_eq!(announce.claimed_mac(), vm_mac);
    assert_eq!(stats.malformed("ndp", "hop_limit"), 1, "{stats:?}");
    assert_eq!(stats.malformed("ndp", "checksum"), 1, "{stats:?}");
    assert_eq!(stats.malformed("rarp", "operation"), 1, "{stats:?}");
    assert_eq!(stats.kernel_dropped, 0);
    assert!(stats.parsed(Protocol::Ndp) >= 2 && stats.parsed(Protocol::Rarp) == 1, "{stats:?}");
}

#[test]
fn proxy_advertisement_answers_the_vms_solicitation() {
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    // A mobile IP bound elsewhere, on the VM's own /64: the VM resolves it on its link.
    let elsewhere: Ipv6Addr = "2001:db8:10::99".parse().unwrap();
    let fe_mac = lab
        .ns(2)
        .block_on(|| async {
            let capture = NeighCapture::open("vm0", Protocols::ALL).unwrap();
            // The VM's kernel resolves `elsewhere` (a ping makes it send the solicitation).
            let pinger = lab
                .vm
                .spawn_thread("vm-ping6", move || {
                    let sock = Icmp6Socket::open().unwrap();
                    sock.probe(elsewhere, 1, 64, 104, Duration::from_millis(1500))
                })
                .unwrap();
            let ns = next(&capture, T, |c| match c.frame {
                Frame::Ndp(m) if m.kind() == NdpKind::Solicitation && m.target() == Some(elsewhere) => Some(m),
                _ => None,
            })
            .await;
            assert_eq!(ns.claim(), Some((VM6, vm_mac)), "the solicitor is the VM");
            assert_eq!(ns.ip_dst, ndp::solicited_node(elsewhere));
            capture.send_ndp(&ndp::advertise_to(&ns, capture.mac(), false, true).unwrap()).unwrap();
            let _ = pinger.join();
            capture.mac()
        })
        .unwrap();
    let neigh = lab.vm.ip(&["-6", "neigh", "show", &elsewhere.to_string(), "dev", "eth0"]).unwrap();
    assert!(neigh.contains(&fe_mac.to_string()), "VM's neighbour entry: {neigh:?}, fe2's port MAC {fe_mac}");
}

#[test]
fn nud_probe_gets_a_solicited_advertisement_and_an_override_na_is_taken() {
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    let new_mac = MacAddr([0x02, 0, 0, 0, 0xaa, 0xbb]);
    let (reply, fe_mac) = lab
        .ns(2)
        .block_on(|| async {
            let capture = NeighCapture::open("vm0", Protocols { arp: false, rarp: false, ndp: true }).unwrap();
            // "Are you still there?" — unicast to the VM's MAC and address, from the gateway.
            capture.send_ndp(&ndp::probe(capture.mac(), GATEWAY6, vm_mac, VM6, None)).unwrap();
            let reply = next(&capture, T, |c| match c.frame {
                Frame::Ndp(m) if m.kind() == NdpKind::SolicitedAdvertisement && m.target() == Some(VM6) => Some(m),
                _ => None,
            })
            .await;
            (reply, capture.mac())
        })
        .unwrap();
    assert_eq!(reply.claim(), Some((VM6, vm_mac)));
    assert_eq!((reply.ip_src, reply.ip_dst, reply.eth_dst), (VM6, GATEWAY6, fe_mac), "answered to the prober");

    // The probe left the VM an entry for the gateway at fe2's MAC; an unsolicited advertisement
    // with the override flag (what an FE sends to announce the gateway) replaces it.
    let show = || lab.vm.ip(&["-6", "neigh", "show", &GATEWAY6.to_string(), "dev", "eth0"]).unwrap();
    assert!(show().contains(&fe_mac.to_string()), "{}", show());
    lab.ns(2)
        .run_in(move || {
            let s = FrameSender::open("vm0").unwrap();
            s.send_ndp(&ndp::unsolicited_advertisement(new_mac, GATEWAY6, true, None)).unwrap();
        })
        .unwrap();
    wait_until("the VM to take the override", T, || show().contains(&new_mac.to_string()))
        .unwrap_or_else(|e| panic!("{e}: {}", show()));
}

#[test]
fn arp_rarp_and_ndp_on_one_socket_with_per_sender_rate_limit_keys() {
    let lab = Lab::build(true).unwrap();
    let vm_mac: MacAddr = VM_MAC.parse().unwrap();
    let sources = lab
        .ns(2)
        .block_on(|| async {
            let capture = NeighCapture::open("vm0", Protocols::ALL).unwrap();
            lab.vm
                .run_in(move || {
                    let s = FrameSender::open("eth0").unwrap();
                    s.send_arp(&victor_dataplane::packet::arp::gratuitous(
                        vm_mac,
                        VM,
                        victor_dataplane::packet::arp::ArpOp::Request,
                        None,
                    ))
                    .unwrap();
                    s.send_rarp(&rarp::announce(vm_mac)).unwrap();
                    s.send_ndp(&ndp::unsolicited_advertisement(vm_mac, VM6, false, None)).unwrap();
                })
                .unwrap();
            let mut sources = Vec::new();
            while sources.len() < 3 {
                let c = next(&capture, T, |c| (c.frame.eth_src() == vm_mac).then_some(c.frame)).await;
                // The VM kernel's own NDP (link-local DAD, router solicitations) may interleave.
                if !matches!(c, Frame::Ndp(m) if m.ip_src != VM6) {
                    sources.push((c.protocol(), c.source()));
                }
            }
            sources
        })
        .unwrap();
    assert_eq!(
        sources,
        vec![
            (Protocol::Arp, (vm_mac, IpAddr::V4(VM))),
            (Protocol::Rarp, (vm_mac, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))),
            (Protocol::Ndp, (vm_mac, IpAddr::V6(VM6))),
        ]
    );
}
