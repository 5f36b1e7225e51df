//! IPv6 anycast against a real BIRD 2 (docs/bgp.md): every FE's agent announces an IPv6 mobile
//! prefix (multiprotocol BGP, RFC 4760) next to the IPv4 one to the `upstream` router, which
//! learns it from every FE and installs one IPv6 ECMP route over them (an ipv6 `protocol kernel`
//! with `merge paths on`). The links between the upstream and the FEs are dual-stack
//! (`wire_upstream6`: 2001:db8:ff:<n>::/64).
//!
//! * Over IPv4 sessions: the IPv6 routes carry each FE's global IPv6 address on its link and its
//!   link-local one (or only the configured `--bgp-next-hop6`); stopping (SIGTERM) or killing
//!   (SIGKILL) fe1's agent withdraws its IPv6 (and IPv4) path, a restarted agent is announced
//!   again. The time from the signal to the upstream's FIB change, per family, is benchmark
//!   output (JSON on stdout; `VICTOR_BGP6_BENCH_OUT=file` also writes it, `VICTOR_BGP_ROUNDS=n`
//!   repeats).
//! * Over IPv6 sessions (BIRD's neighbours are the FEs' IPv6 addresses): both families, the IPv4
//!   routes via the FEs' IPv4 addresses; a data-plane failure withdraws over the live session, a
//!   hung agent (SIGSTOP) is withdrawn by the router's hold timer, stop and kill withdraw.
//!
//! The IPv6 data plane is not part of this (the agent forwards IPv4 only so far): these tests
//! check what the routers learn and unlearn, not IPv6 packets.
//!
//! Every BIRD runs with its own config and control socket in the test's temp dir, inside the
//! test's namespaces, as a ChildGuard; everything is released on drop, also on failure.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use serde_json::json;
use victor_proto::clock::monotonic_ns;
use victor_testkit::netns::NetNs;
use victor_tests::lab::agents::{Agent, AgentCommand, agent_get, wait_agent_ready};
use victor_tests::lab::bgp::{
    self, Bird, FibWatch, MOBILE6, UPSTREAM_AS, VICTOR_AS, edge_addr, edge_addr6, edge_link_local, upstream_addr6,
};
use victor_tests::lab::topology::{Ingress, MOBILE, Topology};

/// The lab. Field order is drop order: agents, the FIB watches and BIRD go before the namespaces.
struct Bgp6Lab {
    agents: Vec<Agent>,
    watch4: FibWatch<Ipv4Addr>,
    watch6: FibWatch<Ipv6Addr>,
    bird: Bird,
    ctl: common::Controller,
    topo: Topology,
    dir: tempfile::TempDir,
}

fn namer(role: &str) -> Result<NetNs> {
    common::short_netns("b6", role)
}

/// How the agents reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// IPv4 sessions (`--bgp-peer 203.0.113.x`).
    Ipv4,
    /// IPv6 sessions (`--bgp-peer 2001:db8:ff:<n>::1`).
    Ipv6,
}

impl Bgp6Lab {
    /// `fes` FEs behind a dual-stack upstream, agents announcing [`MOBILE`] and [`MOBILE6`] over
    /// `session`s with `extra(n)` flags each, every path announced.
    async fn start(fes: usize, session: Session, extra: impl Fn(usize) -> Vec<String>) -> Result<Bgp6Lab> {
        let dir = tempfile::tempdir()?;
        let topo = Topology::build_with(fes, &namer, Ingress::Bgp)?;
        let upstream = topo.upstream.as_ref().context("upstream")?;
        bgp::wire_upstream6(upstream, &topo.fes)?;
        let config = bgp::upstream_config_dual(fes, session == Session::Ipv6);
        let bird = Bird::start(upstream, "upstream", &config, dir.path())?;
        let watch4 = FibWatch::start(upstream, MOBILE)?;
        let watch6 = FibWatch::start(upstream, MOBILE6)?;
        // The agents register their IPv6 prefix too: the controller must serve it.
        let ctl = common::Controller::start_with(&dir.path().join("ctl"), None, &["--mobile-prefix", MOBILE6]).await?;
        let mut lab = Bgp6Lab { agents: Vec::new(), watch4, watch6, bird, ctl, topo, dir };
        let netns = format!("/proc/{}/ns/net", std::process::id());
        let urls = [lab.ctl.url()];
        for n in 1..=fes {
            let mut flags = match session {
                Session::Ipv4 => bgp::agent_flags(n),
                Session::Ipv6 => ["--bgp-peer", &upstream_addr6(n).to_string(), "--bgp-local-as"]
                    .into_iter()
                    .map(String::from)
                    .chain([VICTOR_AS.to_string(), "--bgp-peer-as".into(), UPSTREAM_AS.to_string()])
                    .collect(),
            };
            flags.extend(["--mobile-prefix".to_owned(), MOBILE6.to_owned()]);
            flags.extend(extra(n));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let bin = Path::new(env!("CARGO_BIN_EXE_victor-fe-agent"));
            let argv = AgentCommand { bin, controllers: &urls, controller_netns: &netns, extra: &flags }.argv(n);
            lab.agents.push(Agent::spawn(lab.topo.fe(n), n, argv, lab.dir.path())?);
        }
        for n in 1..=fes {
            wait_agent_ready(lab.topo.fe(n), &mut lab.agents[n - 1], Duration::from_secs(30))?;
        }
        lab.wait_paths(&(1..=fes).collect::<Vec<_>>(), 0).with_context(|| lab.agent_logs())?;
        Ok(lab)
    }

    fn upstream(&self) -> &NetNs {
        self.topo.upstream.as_ref().expect("BGP topology")
    }

    /// Waits until BIRD and the upstream's FIB have both mobile prefixes from exactly FEs `fes`
    /// (after `since`); returns when the IPv4 and the IPv6 FIB got there.
    fn wait_paths(&self, fes: &[usize], since: u64) -> Result<(u64, u64)> {
        let names: Vec<String> = fes.iter().map(|n| bgp::peer_name(*n)).collect();
        self.bird.wait_route_sources(MOBILE6, &names, Duration::from_secs(20))?;
        self.bird.wait_route_sources(MOBILE, &names, Duration::from_secs(20))?;
        let want4: Vec<Ipv4Addr> = fes.iter().map(|n| edge_addr(*n)).collect();
        let want6: Vec<Ipv6Addr> = fes.iter().map(|n| edge_addr6(*n)).collect();
        let timeout = Duration::from_secs(5);
        let v4 = self.watch4.wait_for(&format!("paths via {want4:?}"), since, timeout, |g| g == want4.as_slice())?;
        let v6 = self.watch6.wait_for(&format!("paths via {want6:?}"), since, timeout, |g| g == want6.as_slice())?;
        Ok((v4.mono_ns, v6.mono_ns))
    }

    fn metric(&self, n: usize, series: &str) -> Result<f64> {
        let (_, body) = agent_get(self.topo.fe(n), "/metrics")?;
        Ok(common::metric(&body, series).unwrap_or(0.0))
    }

    fn restart(&mut self, n: usize) -> Result<()> {
        let t = monotonic_ns();
        self.agents[n - 1].respawn(self.topo.fe(n), n, self.dir.path())?;
        wait_agent_ready(self.topo.fe(n), &mut self.agents[n - 1], Duration::from_secs(30))?;
        let all: Vec<usize> = (1..=self.agents.len()).collect();
        self.wait_paths(&all, t).map(drop).with_context(|| self.agent_logs())
    }

    /// The end of every agent's log, for a failure.
    fn agent_logs(&self) -> String {
        let mut out = String::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let log = agent.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(25)..].join("\n");
            out.push_str(&format!("fe{}'s agent log ends:\n{tail}\n", i + 1));
        }
        out
    }

    fn signal(&self, n: usize, signal: Signal) -> Result<()> {
        self.agents[n - 1].guard.as_ref().context("agent not running")?.signal(signal)
    }

    /// Waits until neither family's FIB route has FE `n` (after `since`) and the others are
    /// left; returns the milliseconds from `since` until each family's route lost it.
    fn wait_withdrawn(&self, n: usize, since: u64) -> Result<(f64, f64)> {
        let others: Vec<usize> = (1..=self.agents.len()).filter(|m| *m != n).collect();
        let timeout = Duration::from_secs(10);
        let (gone4, gone6) = (edge_addr(n), edge_addr6(n));
        let v4 = self.watch4.wait_for(&format!("fe{n} withdrawn"), since, timeout, |g| !g.contains(&gone4))?;
        let v6 = self.watch6.wait_for(&format!("fe{n} withdrawn"), since, timeout, |g| !g.contains(&gone6))?;
        // The route over the other FEs stays. For IPv6 it is awaited rather than read off the
        // withdrawal event: an IPv6 multipath route may reach the kernel in more than one step.
        let want6: Vec<Ipv6Addr> = others.iter().map(|m| edge_addr6(*m)).collect();
        self.watch6.wait_for("the other FEs' IPv6 paths", since, timeout, |g| g == want6.as_slice())?;
        let want4: Vec<Ipv4Addr> = others.iter().map(|m| edge_addr(*m)).collect();
        ensure!(v4.gateways == want4, "after fe{n}'s withdrawal the IPv4 route should use {want4:?}: {v4:?}");
        let names: Vec<String> = others.iter().map(|m| bgp::peer_name(*m)).collect();
        ensure!(self.bird.route_sources(MOBILE6)? == names, "BIRD dropped fe{n}'s IPv6 route");
        let ms = |t: u64| t.saturating_sub(since) as f64 / 1e6;
        Ok((ms(v4.mono_ns), ms(v6.mono_ns)))
    }
}

/// One withdrawal of fe1: milliseconds from the signal to each family's FIB change.
#[derive(Debug, Clone, Copy)]
struct Withdrawal {
    v4_ms: f64,
    v6_ms: f64,
}

/// Stops (SIGTERM, waiting for the exit) or kills (SIGKILL) fe1's agent and measures until both
/// families' upstream routes lost it.
fn withdraw_fe1(lab: &mut Bgp6Lab, kill: bool) -> Result<Withdrawal> {
    let t0 = monotonic_ns();
    let agent = &mut lab.agents[0];
    if kill {
        agent.guard.as_mut().context("fe1 agent not running")?.kill();
        agent.guard = None;
    } else {
        agent.stop();
    }
    let (v4_ms, v6_ms) = lab.wait_withdrawn(1, t0)?;
    Ok(Withdrawal { v4_ms, v6_ms })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_prefix_over_ipv4_sessions_ecmp_and_withdrawal_on_stop_and_kill() -> Result<()> {
    victor_testkit::require_root("BGP namespace test");
    // fe2 names its IPv6 next hop itself: no link-local next hop then.
    let mut lab = Bgp6Lab::start(2, Session::Ipv4, |n| match n {
        2 => vec!["--bgp-next-hop6".into(), edge_addr6(2).to_string()],
        _ => Vec::new(),
    })
    .await?;

    // The upstream learned the IPv6 prefix from both FEs over their IPv4 sessions: eBGP from AS
    // 65010, next hop = each FE's global address on its link (fe1 with its link-local address
    // too), one IPv6 ECMP route in the kernel.
    let routes = lab.bird.cli(&format!("show route for {MOBILE6} all"))?;
    for n in 1..=2 {
        assert!(routes.contains(&format!("via {} on fe{n}", edge_addr6(n))), "{routes}");
    }
    let fe1_ll = edge_link_local(lab.topo.fe(1))?;
    assert!(routes.contains(&format!("BGP.next_hop: {} {fe1_ll}\n", edge_addr6(1))), "{routes}");
    assert!(routes.contains(&format!("BGP.next_hop: {}\n", edge_addr6(2))), "{routes}");
    assert_eq!(routes.matches("BGP.as_path: 65010").count(), 2, "{routes}");
    let fib = lab.upstream().ip(&["-6", "route", "show", MOBILE6])?;
    assert_eq!(fib.matches("nexthop via").count(), 2, "one IPv6 ECMP route over both FEs: {fib}");
    // The IPv4 prefix went over the same sessions, as before.
    assert_eq!(lab.bird.route_sources(MOBILE)?, ["fe1", "fe2"]);
    let protocol = lab.bird.cli("show protocols all fe1")?;
    assert!(protocol.contains("Channel ipv6") && protocol.contains("Neighbor address: 203.0.113.2"), "{protocol}");

    // Stop, then kill, fe1's agent: the upstream stops using fe1 for both families.
    let rounds: usize = std::env::var("VICTOR_BGP_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let (mut stops, mut kills) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        stops.push(withdraw_fe1(&mut lab, false)?);
        lab.restart(1)?;
        kills.push(withdraw_fe1(&mut lab, true)?);
        let state = lab.bird.cli("show protocols fe1")?;
        assert!(!state.contains("Established"), "fe1's session ended with the process: {state}");
        lab.restart(1)?;
    }
    for w in stops.iter().chain(&kills) {
        assert!(w.v6_ms < 5_000.0 && w.v4_ms < 5_000.0, "{w:?}");
    }
    let series =
        |list: &[Withdrawal], f: fn(&Withdrawal) -> f64| common::summary(&list.iter().map(f).collect::<Vec<_>>());
    let report = json!({
        "bgp6_withdrawal": {
            "router": lab.bird.cli("show status")?.lines().next().unwrap_or_default().trim_end_matches(" ready."),
            "fes": 2,
            "session": "ipv4",
            "rounds": rounds,
            "stop_sigterm": {
                "ipv6_withdrawn_ms": series(&stops, |w| w.v6_ms),
                "ipv4_withdrawn_ms": series(&stops, |w| w.v4_ms),
            },
            "kill_sigkill": {
                "ipv6_withdrawn_ms": series(&kills, |w| w.v6_ms),
                "ipv4_withdrawn_ms": series(&kills, |w| w.v4_ms),
            },
            "load_avg_1m": std::fs::read_to_string("/proc/loadavg")?.split_whitespace().next().unwrap_or("").to_owned(),
        }
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Ok(path) = std::env::var("VICTOR_BGP6_BENCH_OUT") {
        std::fs::write(&path, &text).with_context(|| format!("write {path}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipv6_sessions_carry_both_families_and_withdraw_on_dataplane_failure_hang_stop_and_kill() -> Result<()> {
    victor_testkit::require_root("BGP namespace test");
    let mut lab = Bgp6Lab::start(2, Session::Ipv6, |_| vec!["--bgp-hold-time".into(), "3s".into()]).await?;
    let peer = format!("{{peer=\"[{}]:179\"}}", upstream_addr6(1));
    assert_eq!(lab.metric(1, &format!("victor_agent_bgp_session_up{peer}"))?, 1.0);
    assert_eq!(lab.metric(1, &format!("victor_agent_bgp_announced{peer}"))?, 1.0);
    let protocol = lab.bird.cli("show protocols all fe1")?;
    assert!(protocol.contains(&format!("Neighbor address: {}", edge_addr6(1))), "{protocol}");
    // IPv6 via the FEs' global and link-local addresses; IPv4 via their IPv4 addresses.
    let routes6 = lab.bird.cli(&format!("show route for {MOBILE6} all"))?;
    for n in 1..=2 {
        let ll = edge_link_local(lab.topo.fe(n))?;
        assert!(routes6.contains(&format!("BGP.next_hop: {} {ll}\n", edge_addr6(n))), "{routes6}");
    }
    let routes4 = lab.bird.cli(&format!("show route for {MOBILE} all"))?;
    for n in 1..=2 {
        assert!(routes4.contains(&format!("BGP.next_hop: {}\n", edge_addr(n))), "{routes4}");
    }

    // Data-plane failure: fe1's data-plane device disappears; fe1 withdraws over its live session.
    let t0 = monotonic_ns();
    lab.topo.fe(1).ip(&["link", "del", "vtun1"])?;
    let (v4, v6) = lab.wait_withdrawn(1, t0)?;
    println!("data-plane failure → withdrawn at the upstream in {v6:.1} ms (IPv6), {v4:.1} ms (IPv4)");
    assert!(lab.bird.established("fe1")?, "a withdrawal, not a session reset");
    assert_eq!(lab.metric(1, "victor_agent_bgp_withdrawals_total{kind=\"dataplane\"}")?, 1.0);
    lab.agents[0].stop();
    lab.restart(1)?;

    // A hung agent (SIGSTOP) sends no KEEPALIVE: the router's hold timer (3 s) withdraws it.
    let t0 = monotonic_ns();
    lab.signal(2, Signal::SIGSTOP)?;
    let (v4, v6) = lab.wait_withdrawn(2, t0)?;
    println!("hung agent → withdrawn by the hold timer after {v6:.0} ms (IPv6), {v4:.0} ms (IPv4)");
    assert!(v6 >= 1_000.0, "withdrawn by the hold timer, not at once (a closed session takes ms): {v6} ms");
    lab.signal(2, Signal::SIGCONT)?;
    lab.wait_paths(&[1, 2], monotonic_ns())?;

    // Stop and kill over an IPv6 session.
    let stop = withdraw_fe1(&mut lab, false)?;
    lab.restart(1)?;
    let kill = withdraw_fe1(&mut lab, true)?;
    println!("IPv6 session: SIGTERM → withdrawn in {:.1} ms, SIGKILL → {:.1} ms (IPv6)", stop.v6_ms, kill.v6_ms);
    assert!(!lab.bird.established("fe1")?, "fe1's session ended with the process");
    Ok(())
}
