//! Move hints between real agents (real controller on the embedded store, real namespaces):
//!
//! * a VM moves fe2 → fe3 while fe1's controller connection is frozen: fe3's hint alone makes
//!   fe1 tunnel straight to fe3 (the old FE relays nothing) before fe1 has any delta; once fe1
//!   fails over and gets the delta, its override is confirmed;
//! * hints with a bad HMAC, from an address that is no registered FE, for another binding version,
//!   or replayed are refused and counted; a valid hint nobody confirms expires and fe1 goes back
//!   to the desired state; a claim the controller rejects (site policy) is cancelled by its
//!   sender and the receivers revert at once.
//!
//! Each runs on both data planes (`<test>::tun`, `<test>::kernel`): a hint repoints the
//! forwarder's table entry or the kernel's /32 route alike.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use common::*;
use victor_fe_agent::codec::hint::{self as wire, Hint, Keys, Kind};
use victor_proto::clock::unix_nanos;
use victor_proto::v1::{DeclareVmRequest, SitePolicy};
use victor_testkit::netns::NetNs;

const KEY: &str = "6d6f76652d68696e742d746573742d6b65792d666f722d766963746f722d3031";
const HINT_PORT: u16 = 4796;
const TUNNEL_RX: &str = "victor_agent_dataplane_packets_total{direction=\"tunnel_rx\"}";

/// Writes the cluster's hint key (mode 600) and returns the agents' hint flags.
fn hint_flags(lab: &Lab, extra: &[&str]) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let path = lab.dir.path().join("hint.key");
    std::fs::write(&path, format!("{KEY}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let mut flags = vec!["--move-hint-key-file".to_owned(), path.display().to_string()];
    flags.extend(extra.iter().map(|s| s.to_string()));
    Ok(flags)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Agent `n`'s stage timestamps for (VM, `move_seq`).
fn event(lab: &Lab, n: usize, move_seq: u64) -> Result<serde_json::Value> {
    let (_, body) = lab.agent_get(n, &format!("/debug/events?vm={VM}"))?;
    let events: serde_json::Value = serde_json::from_str(&body)?;
    let found = events.as_array().and_then(|a| a.iter().find(|e| e["move_seq"] == move_seq)).cloned();
    found.ok_or_else(|| anyhow::anyhow!("fe{n} has no event for move_seq {move_seq}: {body}"))
}

fn ns_of(e: &serde_json::Value, key: &str) -> u64 {
    e[key].as_u64().unwrap_or(0)
}

/// Sends `datagram` from `src` (an address of `ns`) to the hint port of `to`.
fn send_datagram(ns: &NetNs, src: Ipv4Addr, to: Ipv4Addr, datagram: Vec<u8>) -> Result<()> {
    ns.run_in(move || -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind((src, 0))?;
        socket.send_to(&datagram, (to, HINT_PORT))?;
        Ok(())
    })??;
    Ok(())
}

fn hint_from_fe3(move_seq: u64, nonce: u64) -> Hint {
    Hint {
        kind: Kind::Move,
        fe_id: "fe3".into(),
        vm_ip: VM.into(),
        mac: mac(VM_MAC),
        move_seq,
        observed_at: unix_nanos(),
        sent_at: unix_nanos(),
        nonce,
    }
}

fn wait_metric(lab: &Lab, n: usize, series: &str, value: f64, timeout: Duration) -> Result<()> {
    wait(&format!("fe{n} {series} = {value}"), timeout, || lab.agent_metric(n, series).is_ok_and(|v| v == value))
        .map_err(|e| anyhow::anyhow!("{e}; now {:?}\nfe{n} log:\n{}", lab.agent_metric(n, series), lab.agent_log(n)))
}

plane_tests!(
    a_move_hint_repoints_fe1_before_its_delta_and_the_delta_confirms_it,
    forged_foreign_stale_and_replayed_hints_are_refused_unconfirmed_ones_expire,
    a_rejected_claim_cancels_its_hint_and_the_receivers_revert,
);

async fn a_move_hint_repoints_fe1_before_its_delta_and_the_delta_confirms_it(plane: Plane) -> Result<()> {
    let mut lab = Lab::build_on(3, plane)?;
    // Heartbeats every 30 s (a quarter of the session TTL): fe1's frozen session is not ended by a
    // failed heartbeat while the test looks at it.
    let ctl = Controller::start_with(&lab.dir.path().join("ctl"), None, &["--session-ttl", "120s"]).await?;
    let proxy = LinkProxy::start(ctl.grpc).await?;
    // fe1 reaches the controller through a proxy first (partitioned below, then healed, which
    // resets the held connection), then directly. Its liveness timers and everyone's hint timeout are far longer than the test: fe1 fails
    // over when the test heals the proxy, not when a loaded machine makes a step slow, and no
    // override expires while the controller commits.
    let flags = hint_flags(&lab, &["--move-hint-timeout", "60s"])?;
    let fe1_flags = hint_flags(&lab, &["--stream-timeout", "60s", "--move-hint-timeout", "60s"])?;
    lab.start_agent(1, &[proxy.url(), ctl.url()], &strs(&fe1_flags))?;
    for n in 2..=3 {
        lab.start_agent(n, &[ctl.url()], &strs(&flags))?;
    }
    for n in 1..=3 {
        lab.wait_ready(n, Duration::from_secs(20))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    let first = ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 20, Duration::from_secs(5))?;

    // fe1 hears nothing from the controller any more; the VM moves to fe3.
    proxy.partition();
    let move_started = prober.sent();
    lab.move_vm_link(2, 3)?;
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    let moved = ctl.wait_bound(VM, "fe3", Duration::from_secs(5)).await?;
    assert_eq!(moved.move_seq, first.move_seq + 1);
    let after = prober.sent();
    prober.wait_replies_from(after, 10, Duration::from_secs(1))?;
    // fe1 tunnels straight to fe3: the old FE relays none of the next 20 echo requests.
    let relayed_before = lab.agent_metric(2, TUNNEL_RX)?;
    let from = prober.sent();
    prober.wait_replies_from(from, 20, Duration::from_secs(1))?;
    let relayed = lab.agent_metric(2, TUNNEL_RX)? - relayed_before;
    let fe1 = event(&lab, 1, moved.move_seq)?;
    assert_eq!(ns_of(&fe1, "delta_received_mono_ns"), 0, "fe1 must not have the delta yet: {fe1}");
    assert_eq!(relayed, 0.0, "fe2 relayed {relayed} packets: fe1 did not follow the hint");
    assert_eq!(fe1["hint_from"], "fe3", "{fe1}");
    let fe3 = event(&lab, 3, moved.move_seq)?;
    let captured = ns_of(&fe3, "captured_mono_ns");
    let (installed, hinted) = (ns_of(&fe3, "provisional_applied_mono_ns"), ns_of(&fe3, "hint_sent_mono_ns"));
    let (received, applied) = (ns_of(&fe1, "hint_received_mono_ns"), ns_of(&fe1, "hint_applied_mono_ns"));
    assert!(captured > 0 && installed >= captured && hinted >= installed, "fe3 hints after its local install: {fe3}");
    assert!(received >= hinted && applied >= received, "{fe1}");
    println!(
        "fe3 captured → local install {:.3} ms → hint sent {:.3} ms → fe1 received {:.3} ms → applied {:.3} ms",
        (installed - captured) as f64 / 1e6,
        (hinted - captured) as f64 / 1e6,
        (received - captured) as f64 / 1e6,
        (applied - captured) as f64 / 1e6
    );
    assert_eq!(lab.agent_metric(3, "victor_agent_move_hints_sent_total{kind=\"move\"}")?, 2.0, "to fe1 and fe2");
    assert_eq!(lab.agent_metric(1, "victor_agent_move_hints_accepted_total{kind=\"move\"}")?, 1.0);

    // fe1 fails over to the direct endpoint; the delta confirms the override.
    proxy.heal();
    wait_metric(
        &lab,
        1,
        "victor_agent_move_hint_overrides_ended_total{how=\"confirmed\"}",
        1.0,
        Duration::from_secs(10),
    )?;
    let fe1 = event(&lab, 1, moved.move_seq)?;
    assert_eq!(fe1["hint_end"], "confirmed", "{fe1}");
    assert!(ns_of(&fe1, "applied_mono_ns") > ns_of(&fe1, "hint_applied_mono_ns"), "{fe1}");
    assert_eq!(lab.agent_metric(1, "victor_agent_move_hint_overrides")?, 0.0);
    let from = prober.sent();
    prober.wait_replies_from(from, 10, Duration::from_secs(2))?;
    let probes = prober.stop()?;
    let lost = probes.lost_seqs(0, probes.sent.saturating_sub(5));
    println!(
        "{} echo requests at 10 ms, lost {lost:?} (the link switch by `ip` started at {move_started}, the controller \
         had moved the binding by {after})",
        probes.sent
    );
    // The old FE took the hint too (or had the delta first); nothing expired anywhere.
    for n in 1..=2 {
        let expired = lab.agent_metric(n, "victor_agent_move_hint_overrides_ended_total{how=\"expired\"}")?;
        assert_eq!(expired, 0.0, "fe{n}");
    }
    Ok(())
}

/// Three agents with `hint_flags`, the VM declared for dc1 and dc2 only (fe3's claims, site
/// dc3, are rejected), bound at fe2 and answering the client's pings.
struct PolicyLab {
    lab: Lab,
    ctl: Controller,
    /// The binding's move sequence at fe2.
    seq: u64,
    prober: Prober,
}

async fn policy_lab(plane: Plane, hint_options: &[&str]) -> Result<PolicyLab> {
    let mut lab = Lab::build_on(3, plane)?;
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    let policy = SitePolicy { allowed_sites: vec!["dc1".into(), "dc2".into()] };
    let req =
        DeclareVmRequest { vm_ip: VM.to_string(), mac: VM_MAC.into(), site_policy: Some(policy), ..Default::default() };
    ctl.client().await?.declare_vm(req).await?;
    let flags = hint_flags(&lab, hint_options)?;
    for n in 1..=3 {
        lab.start_agent(n, &[ctl.url()], &strs(&flags))?;
    }
    for n in 1..=3 {
        lab.wait_ready(n, Duration::from_secs(20))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    let bound = ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;
    Ok(PolicyLab { lab, ctl, seq: bound.move_seq, prober })
}

async fn forged_foreign_stale_and_replayed_hints_are_refused_unconfirmed_ones_expire(plane: Plane) -> Result<()> {
    // A short override (it must expire here) and a long age limit (a replay sent late on a slow
    // machine must still be judged a replay, not too old).
    let PolicyLab { lab, ctl: _controller, seq, prober } =
        policy_lab(plane, &["--move-hint-timeout", "500ms", "--move-hint-max-age", "60s"]).await?;
    let keys = Keys::parse(KEY)?;
    let (fe1, fe3) = (fe_addr(1), fe_addr(3));
    let rejected = |reason: &str| format!("victor_agent_move_hints_rejected_total{{reason=\"{reason}\"}}");
    let patience = Duration::from_secs(5);

    // Signed with another key.
    let forged = wire::encode(&hint_from_fe3(seq, 1), &Keys::new(&[&[0x42; 32]])?);
    send_datagram(lab.fe(3), fe3, fe1, forged)?;
    wait_metric(&lab, 1, &rejected("bad_hmac"), 1.0, patience)?;
    // The right key, but from an address that is no registered FE.
    let outsider = Ipv4Addr::new(198, 51, 100, 99);
    lab.ul.add_addr("br0", &format!("{outsider}/24"))?;
    send_datagram(&lab.ul, outsider, fe1, wire::encode(&hint_from_fe3(seq, 2), &keys))?;
    wait_metric(&lab, 1, &rejected("source_mismatch"), 1.0, patience)?;
    // From fe3, for a binding version that is not the current one.
    send_datagram(lab.fe(3), fe3, fe1, wire::encode(&hint_from_fe3(seq + 1, 3), &keys))?;
    wait_metric(&lab, 1, &rejected("stale_seq"), 1.0, patience)?;
    assert_eq!(lab.agent_metric(1, "victor_agent_move_hints_accepted_total{kind=\"move\"}")?, 0.0);
    assert_eq!(lab.agent_metric(3, TUNNEL_RX)?, 0.0, "nothing was redirected to fe3");

    // A valid hint nobody confirms: fe1 sends the client's traffic to fe3 until it expires...
    let valid = wire::encode(&hint_from_fe3(seq, 4), &keys);
    send_datagram(lab.fe(3), fe3, fe1, valid.clone())?;
    wait_metric(&lab, 1, "victor_agent_move_hints_accepted_total{kind=\"move\"}", 1.0, patience)?;
    wait("fe3 receives the client's traffic", patience, || lab.agent_metric(3, TUNNEL_RX).is_ok_and(|v| v >= 3.0))?;
    // ...a replay of it is refused...
    send_datagram(lab.fe(3), fe3, fe1, valid)?;
    wait_metric(&lab, 1, &rejected("replay"), 1.0, patience)?;
    // ...and after the timeout fe1 follows the desired state again: fe3 gets nothing more (once
    // what fe1 sent it just before the expiry has arrived).
    wait_metric(&lab, 1, "victor_agent_move_hint_overrides_ended_total{how=\"expired\"}", 1.0, patience)?;
    let settle = prober.sent();
    prober.wait_replies_from(settle, 10, patience)?;
    let redirected = lab.agent_metric(3, TUNNEL_RX)?;
    let from = prober.sent();
    prober.wait_replies_from(from, 20, patience)?;
    assert_eq!(lab.agent_metric(3, TUNNEL_RX)?, redirected, "fe1 still sends to fe3 after the expiry");
    let e = event(&lab, 1, seq + 1)?;
    assert_eq!(e["hint_end"], "expired", "{e}");
    let lived = ns_of(&e, "hint_ended_mono_ns").saturating_sub(ns_of(&e, "hint_applied_mono_ns"));
    assert!(lived >= 450_000_000, "override lived {lived} ns with a 500 ms timeout");
    Ok(())
}

async fn a_rejected_claim_cancels_its_hint_and_the_receivers_revert(plane: Plane) -> Result<()> {
    // Overrides that would outlive the test: only the cancel can end them.
    let PolicyLab { lab, ctl, seq, prober } = policy_lab(plane, &["--move-hint-timeout", "60s"]).await?;
    let patience = Duration::from_secs(5);
    // The VM really goes to fe3, whose claim the controller rejects: fe3 cancels its hint.
    lab.move_vm_link(2, 3)?;
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    wait_metric(&lab, 3, "victor_agent_move_hints_sent_total{kind=\"cancel\"}", 2.0, patience)?;
    for n in 1..=2 {
        wait_metric(&lab, n, "victor_agent_move_hint_overrides_ended_total{how=\"cancelled\"}", 1.0, patience)?;
        let e = event(&lab, n, seq + 1)?;
        assert_eq!(e["hint_end"], "cancelled", "fe{n}: {e}");
        let lived = ns_of(&e, "hint_ended_mono_ns").saturating_sub(ns_of(&e, "hint_applied_mono_ns"));
        println!("fe{n}: override cancelled {:.3} ms after it was applied", lived as f64 / 1e6);
    }
    assert_eq!(lab.agent_metric(3, "victor_agent_claims_undone_total")?, 1.0, "fe3 undid its own install");
    let still = ctl.binding(VM).await?.expect("binding");
    assert_eq!((still.fe_id.as_str(), still.move_seq), ("fe2", seq), "the controller kept the binding");
    assert_eq!(lab.agent_metric(1, "victor_agent_move_hints_accepted_total{kind=\"cancel\"}")?, 1.0);
    drop(prober);
    Ok(())
}
