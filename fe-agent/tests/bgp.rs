//! BGP anycast against a real BIRD 2 (docs/design.md §1, docs/bgp.md): the client sits behind an `upstream`
//! router running BIRD, linked to every FE; every FE's agent holds an eBGP session with it and
//! announces the mobile prefix while healthy.
//!
//! * The upstream learns the prefix from every FE and installs one ECMP route over all of them;
//!   the client reaches a VM behind fe2 through fe1's tunnel; the VM's replies leave at fe2.
//! * Stopping (SIGTERM) or killing (SIGKILL) fe1's agent withdraws its path at the upstream and
//!   the traffic moves to the other FEs; a restarted agent is announced again. The time from the
//!   signal to the upstream's FIB change and the probes lost meanwhile are benchmark output
//!   (JSON on stdout; `VICTOR_BGP_BENCH_OUT=file` also writes it, `VICTOR_BGP_ROUNDS=n` repeats).
//! * A data-plane failure (the data-plane device gone: the TUN device, or the kernel data plane's
//!   catch-all ipip device), a hung agent (SIGSTOP: the router's hold timer) and a controller
//!   outage longer than `--headless-grace` withdraw too; recovery re-announces.
//!
//! Both run on both data planes (`<test>::tun`, `<test>::kernel`).
//!
//! Every BIRD runs with its own config and control socket in the test's temp dir, inside the
//! test's namespaces, as a ChildGuard; everything is released on drop, also on failure.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use serde_json::json;
use victor_proto::clock::monotonic_ns;
use victor_testkit::netns::NetNs;
use victor_tests::lab::agents::{Agent, AgentCommand, agent_get, wait_agent_ready};
use victor_tests::lab::bgp::{self, Bird, FibWatch, edge_addr};
use victor_tests::lab::probe::{Prober, Probes, send_garp};
use victor_tests::lab::topology::{Ingress, MOBILE, Topology, VmSpec};

/// The lab. Field order is drop order: agents, the FIB watch and BIRD go before the namespaces.
struct BgpLab {
    agents: Vec<Agent>,
    watch: FibWatch,
    bird: Bird,
    ctl: common::Controller,
    topo: Topology,
    dir: tempfile::TempDir,
}

fn namer(role: &str) -> Result<NetNs> {
    common::short_netns("bg", role)
}

impl BgpLab {
    /// `fes` FEs behind the upstream, agents running `plane` with `extra` flags and announcing.
    async fn start(plane: common::Plane, fes: usize, extra: &[&str]) -> Result<BgpLab> {
        let dir = tempfile::tempdir()?;
        let topo = Topology::build_with(fes, &namer, Ingress::Bgp)?;
        let upstream = topo.upstream.as_ref().context("upstream")?;
        let bird = Bird::start(upstream, "upstream", &bgp::upstream_config(fes), dir.path())?;
        let watch = FibWatch::start(upstream, MOBILE)?;
        let ctl = common::Controller::start(&dir.path().join("ctl"), None).await?;
        let mut lab = BgpLab { agents: Vec::new(), watch, bird, ctl, topo, dir };
        let netns = format!("/proc/{}/ns/net", std::process::id());
        let urls = [lab.ctl.url()];
        for n in 1..=fes {
            let mut flags = bgp::agent_flags(n);
            flags.extend(extra.iter().chain(&plane.flags()).map(|s| s.to_string()));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let bin = Path::new(env!("CARGO_BIN_EXE_victor-fe-agent"));
            let argv = AgentCommand { bin, controllers: &urls, controller_netns: &netns, extra: &flags }.argv(n);
            lab.agents.push(Agent::spawn(lab.topo.fe(n), n, argv, lab.dir.path())?);
        }
        for n in 1..=fes {
            wait_agent_ready(lab.topo.fe(n), &mut lab.agents[n - 1], Duration::from_secs(30))?;
            let dataplane = victor_tests::lab::migrate::dataplane_of(lab.topo.fe(n))?;
            ensure!(dataplane.starts_with(plane.label()), "fe{n} runs {dataplane}, not {plane:?}");
        }
        lab.wait_paths(&(1..=fes).collect::<Vec<_>>(), 0)?;
        Ok(lab)
    }

    fn upstream(&self) -> &NetNs {
        self.topo.upstream.as_ref().expect("BGP topology")
    }

    /// Waits until BIRD and the upstream's FIB have the mobile prefix from exactly FEs `fes`
    /// (after `since`); returns when the FIB got there.
    fn wait_paths(&self, fes: &[usize], since: u64) -> Result<u64> {
        let names: Vec<String> = fes.iter().map(|n| bgp::peer_name(*n)).collect();
        self.bird.wait_route_sources(MOBILE, &names, Duration::from_secs(20))?;
        let want: Vec<Ipv4Addr> = fes.iter().map(|n| edge_addr(*n)).collect();
        let event = self
            .watch
            .wait_for(&format!("paths via {want:?}"), since, Duration::from_secs(5), |g| g == want.as_slice())?;
        Ok(event.mono_ns)
    }

    fn metric(&self, n: usize, series: &str) -> Result<f64> {
        let (_, body) = agent_get(self.topo.fe(n), "/metrics")?;
        Ok(common::metric(&body, series).unwrap_or(0.0))
    }

    fn restart(&mut self, n: usize) -> Result<()> {
        self.agents[n - 1].respawn(self.topo.fe(n), n, self.dir.path())?;
        wait_agent_ready(self.topo.fe(n), &mut self.agents[n - 1], Duration::from_secs(30))
    }

    fn signal(&self, n: usize, signal: Signal) -> Result<()> {
        self.agents[n - 1].guard.as_ref().context("agent not running")?.signal(signal)
    }
}

/// Packets sent on `dev` of `ns`.
fn tx_packets(ns: &NetNs, dev: &str) -> Result<u64> {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{dev}/statistics/tx_packets")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

const TUNNEL_TX: &str = "victor_agent_dataplane_packets_total{direction=\"tunnel_tx\"}";
const TUNNEL_RX: &str = "victor_agent_dataplane_packets_total{direction=\"tunnel_rx\"}";

/// How one withdrawal went.
#[derive(Debug, Clone, Copy)]
struct Withdrawal {
    /// Signal → the upstream's FIB no longer has the FE.
    withdrawn_ms: f64,
    /// Probes lost from the signal until well after the agent was gone.
    lost: u32,
    /// Longest run of consecutive lost probes × the interval.
    outage_ms: f64,
}

/// Lost probes in `from..to` and the longest run of them.
fn loss(probes: &Probes, from: u32, to: u32) -> (u32, u32) {
    let lost = probes.lost_seqs(from, to);
    let mut longest = 0;
    let mut run = 0;
    let mut prev = None;
    for s in &lost {
        run = if prev == Some(s - 1) { run + 1 } else { 1 };
        longest = longest.max(run);
        prev = Some(*s);
    }
    (lost.len() as u32, longest)
}

/// Signals fe1's agent (`kill`: SIGKILL, else SIGTERM and wait for its exit) while the client
/// probes the VM through it; measures until fe1 is out of the upstream's FIB and the traffic has
/// settled on the other FEs.
fn withdraw_fe1(lab: &mut BgpLab, prober: &Prober, interval: Duration, kill: bool) -> Result<Withdrawal> {
    let gone = edge_addr(1);
    let t0 = monotonic_ns();
    let agent = &mut lab.agents[0];
    if kill {
        agent.guard.as_mut().context("fe1 agent not running")?.kill();
        agent.guard = None;
    } else {
        agent.stop();
    }
    let exited = monotonic_ns();
    let event = lab.watch.wait_for("fe1 withdrawn", t0, Duration::from_secs(10), |g| !g.contains(&gone))?;
    ensure!(
        event.gateways == vec![edge_addr(2), edge_addr(3)],
        "after fe1's withdrawal the upstream should use fe2 and fe3: {:?}",
        event.gateways
    );
    // The traffic flows through the others; count until then (plus replies in flight).
    let end = event.mono_ns.max(exited) + 300_000_000;
    while monotonic_ns() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let settled = prober.sent();
    prober.wait_replies_from(settled, 20, Duration::from_secs(5)).context("the VM stopped answering")?;
    let probes = prober.probes();
    let (lost, longest) = loss(&probes, probes.first_sent_after(t0), probes.first_sent_after(end));
    Ok(Withdrawal {
        withdrawn_ms: (event.mono_ns.saturating_sub(t0)) as f64 / 1e6,
        lost,
        outage_ms: f64::from(longest) * interval.as_secs_f64() * 1e3,
    })
}

/// Restarts fe1, waits for its path, pins the client's flow to it and checks the traffic enters
/// there again.
fn bring_back_fe1(lab: &mut BgpLab, prober: &Prober, vm: Ipv4Addr) -> Result<()> {
    let t = monotonic_ns();
    lab.restart(1)?;
    lab.wait_paths(&[1, 2, 3], t)?;
    bgp::pin_client(&lab.topo.client, lab.upstream(), vm, 1)?;
    let before = lab.metric(1, TUNNEL_TX)?;
    let from = prober.sent();
    prober.wait_replies_from(from, 50, Duration::from_secs(5))?;
    let after = lab.metric(1, TUNNEL_TX)?;
    ensure!(after - before >= 40.0, "fe1 is the ingress again: it encapsulated {} packets", after - before);
    Ok(())
}

fn summary(values: &[f64]) -> serde_json::Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pick = |q: f64| v[(((q * v.len() as f64).ceil() as usize).max(1) - 1).min(v.len() - 1)];
    json!({ "p50": pick(0.5), "max": pick(1.0), "all": values })
}

common::plane_tests!(
    anycast_ecmp_tunnel_and_withdrawal_on_stop_and_kill,
    withdraws_on_dataplane_failure_hang_and_headless_beyond_grace
);

async fn anycast_ecmp_tunnel_and_withdrawal_on_stop_and_kill(plane: common::Plane) -> Result<()> {
    victor_testkit::require_root("BGP namespace test");
    let mut lab = BgpLab::start(plane, 3, &[]).await?;
    let vm = VmSpec::numbered(1);
    lab.topo.add_vm(vm.clone(), 2, &namer)?;
    send_garp(lab.topo.vm(1), "eth0", &vm.mac, vm.ip)?;
    lab.ctl.wait_bound(vm.ip, "fe2", Duration::from_secs(10)).await?;

    // The upstream learned the prefix from every FE: eBGP from AS 65010, next hop = each FE's
    // own address on its link, one ECMP route in the kernel.
    let routes = lab.bird.cli(&format!("show route for {MOBILE} all"))?;
    for n in 1..=3 {
        assert!(routes.contains(&format!("via {} on fe{n}", edge_addr(n))), "{routes}");
    }
    assert_eq!(routes.matches("BGP.as_path: 65010").count(), 3, "{routes}");
    let fib = lab.upstream().ip(&["route", "show", MOBILE])?;
    assert_eq!(fib.matches("nexthop via").count(), 3, "one ECMP route over three FEs: {fib}");

    // The client's flow enters at fe1 and is tunnelled to fe2; the replies leave at fe2.
    let client_src = bgp::pin_client(&lab.topo.client, lab.upstream(), vm.ip, 1)?;
    let fe1_tx = lab.metric(1, TUNNEL_TX)?;
    let fe1_rx = lab.metric(1, TUNNEL_RX)?;
    let fe2_out = tx_packets(lab.topo.fe(2), "up0")?;
    let interval = Duration::from_millis(1);
    let prober = Prober::start(&lab.topo.client, vm.ip, interval)?;
    prober.wait_replies_from(0, 200, Duration::from_secs(10)).context("the client reaches the VM over BGP")?;
    let replies = prober.probes().replied.len() as f64;
    let tunnelled = lab.metric(1, TUNNEL_TX)? - fe1_tx;
    assert!(tunnelled >= replies, "fe1 is the ingress: {tunnelled} encapsulated for {replies} replies");
    assert_eq!(lab.metric(1, TUNNEL_RX)? - fe1_rx, 0.0, "the VM's replies do not come back through fe1");
    let left = (tx_packets(lab.topo.fe(2), "up0")? - fe2_out) as f64;
    assert!(left >= replies, "the VM's replies leave at fe2 towards the upstream: {left} for {replies}");

    // Stop, then kill, fe1's agent: the upstream stops using fe1; the VM keeps answering.
    let rounds: usize = std::env::var("VICTOR_BGP_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let (mut stops, mut kills) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        stops.push(withdraw_fe1(&mut lab, &prober, interval, false)?);
        assert_eq!(lab.bird.route_sources(MOBILE)?, ["fe2", "fe3"]);
        bring_back_fe1(&mut lab, &prober, vm.ip)?;
        kills.push(withdraw_fe1(&mut lab, &prober, interval, true)?);
        let state = lab.bird.cli("show protocols fe1")?;
        assert!(!state.contains("Established"), "fe1's session ended with the process: {state}");
        bring_back_fe1(&mut lab, &prober, vm.ip)?;
    }
    let probes = prober.stop()?;
    for w in stops.iter().chain(&kills) {
        assert!(w.withdrawn_ms < 5_000.0, "{w:?}");
    }
    let series = |list: &[Withdrawal], f: fn(&Withdrawal) -> f64| summary(&list.iter().map(f).collect::<Vec<_>>());
    let report = json!({
        "bgp_withdrawal": {
            "router": lab.bird.cli("show status")?.lines().next().unwrap_or_default().trim_end_matches(" ready."),
            "fes": 3,
            "ping_interval_ms": interval.as_secs_f64() * 1e3,
            "client_source": client_src.to_string(),
            "rounds": rounds,
            "probes_sent": probes.sent,
            "stop_sigterm": {
                "withdrawn_ms": series(&stops, |w| w.withdrawn_ms),
                "lost": series(&stops, |w| f64::from(w.lost)),
                "outage_ms": series(&stops, |w| w.outage_ms),
            },
            "kill_sigkill": {
                "withdrawn_ms": series(&kills, |w| w.withdrawn_ms),
                "lost": series(&kills, |w| f64::from(w.lost)),
                "outage_ms": series(&kills, |w| w.outage_ms),
            },
            "load_avg_1m": std::fs::read_to_string("/proc/loadavg")?.split_whitespace().next().unwrap_or("").to_owned(),
        }
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Ok(path) = std::env::var("VICTOR_BGP_BENCH_OUT") {
        std::fs::write(&path, &text).with_context(|| format!("write {path}"))?;
    }
    Ok(())
}

async fn withdraws_on_dataplane_failure_hang_and_headless_beyond_grace(plane: common::Plane) -> Result<()> {
    victor_testkit::require_root("BGP namespace test");
    let mut lab = BgpLab::start(plane, 2, &["--headless-grace", "8s", "--bgp-hold-time", "3s"]).await?;
    let peer = format!("{{peer=\"{}:179\"}}", bgp::upstream_addr(1));
    assert_eq!(lab.metric(1, &format!("victor_agent_bgp_session_up{peer}"))?, 1.0);
    assert_eq!(lab.metric(1, &format!("victor_agent_bgp_announced{peer}"))?, 1.0);
    assert_eq!(lab.metric(1, "victor_agent_bgp_healthy")?, 1.0);

    // Data-plane failure: fe1's data-plane device (TUN, or the kernel data plane's catch-all)
    // disappears; fe1 withdraws over its live session.
    let t0 = monotonic_ns();
    lab.topo.fe(1).ip(&["link", "del", "vtun1"])?;
    let t = lab.wait_paths(&[2], t0)?;
    println!("data-plane failure → withdrawn at the upstream in {:.1} ms", (t - t0) as f64 / 1e6);
    assert!(lab.bird.established("fe1")?, "a withdrawal, not a session reset");
    assert_eq!(lab.metric(1, "victor_agent_bgp_withdrawals_total{kind=\"dataplane\"}")?, 1.0);
    assert_eq!(lab.metric(1, "victor_agent_bgp_healthy")?, 0.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.bird.route_sources(MOBILE)?, ["fe2"], "fe1 stays withdrawn without its data plane");
    lab.agents[0].stop();
    let t = monotonic_ns();
    lab.restart(1)?;
    lab.wait_paths(&[1, 2], t)?;

    // A hung agent (SIGSTOP) sends no KEEPALIVE: the router's hold timer (3 s) withdraws it.
    let t0 = monotonic_ns();
    lab.signal(2, Signal::SIGSTOP)?;
    let t = lab.wait_paths(&[1], t0)?;
    let held = (t - t0) as f64 / 1e6;
    println!("hung agent → withdrawn by the hold timer after {held:.0} ms");
    assert!(held >= 1_000.0, "withdrawn by the hold timer, not at once (a closed session takes ms): {held} ms");
    lab.signal(2, Signal::SIGCONT)?;
    lab.wait_paths(&[1, 2], monotonic_ns())?;

    // Controller outage: both FEs keep announcing for the grace period (8 s, counted from the
    // last stream message: long enough that a slow `stop` cannot eat it), then withdraw;
    // the sessions stay up. The controller returns: both are announced again.
    let t0 = monotonic_ns();
    lab.ctl.stop().await?;
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lab.watch.gateways(), vec![edge_addr(1), edge_addr(2)], "announced within the grace period");
    let gone = lab.watch.wait_for("every FE withdrawn", t0, Duration::from_secs(20), |g| g.is_empty())?;
    println!(
        "headless → withdrawn {:.0} ms after the controller stopped (grace 8 s)",
        (gone.mono_ns - t0) as f64 / 1e6
    );
    for n in 1..=2 {
        assert!(lab.bird.established(&bgp::peer_name(n))?);
        assert!(lab.metric(n, "victor_agent_bgp_withdrawals_total{kind=\"headless\"}")? >= 1.0);
    }
    let t = monotonic_ns();
    lab.ctl.restart().await?;
    lab.wait_paths(&[1, 2], t)?;
    Ok(())
}
