//! `victor-fe-agent` processes inside the FE namespaces, and their admin endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use victor_testkit::netns::NetNs;
use victor_testkit::process::ChildGuard;

use super::addressing::{GATEWAY, GATEWAY_MAC, MOBILE, fe_addr};

/// Where every agent serves its admin HTTP inside its own namespace.
pub const AGENT_HTTP: &str = "127.0.0.1:9180";

/// The command line of the agent of FE `n`.
pub struct AgentCommand<'a> {
    /// The `victor-fe-agent` binary.
    pub bin: &'a Path,
    /// Controller addresses.
    pub controllers: &'a [String],
    /// The namespace the controllers are reachable from (`--controller-netns`).
    pub controller_netns: &'a str,
    /// Extra flags.
    pub extra: &'a [&'a str],
}

impl AgentCommand<'_> {
    /// The argv for FE `n` (fe_id `fe<n>`, site `dc<n>`, VM ports `vm*`, TUN `vtun<n>`).
    pub fn argv(&self, n: usize) -> Vec<String> {
        let mut argv: Vec<String> = vec![
            self.bin.display().to_string(),
            "--controller".into(),
            self.controllers.join(","),
            "--controller-netns".into(),
            self.controller_netns.into(),
            "--fe-id".into(),
            format!("fe{n}"),
            "--site".into(),
            format!("dc{n}"),
            "--underlay-addr".into(),
            fe_addr(n).to_string(),
            "--vm-port".into(),
            "vm*".into(),
            "--mobile-prefix".into(),
            MOBILE.into(),
            "--gateway".into(),
            GATEWAY.into(),
            "--gateway-mac".into(),
            GATEWAY_MAC.into(),
            "--tun-name".into(),
            format!("vtun{n}"),
            "--http-listen".into(),
            AGENT_HTTP.into(),
            "--log".into(),
            "info,victor_fe_agent=debug".into(),
            // The standby forwarder of an agent the lab killed hands over to a restarted agent
            // within this, and does not outlive the lab by more.
            "--standby-hold".into(),
            "5s".into(),
        ];
        argv.extend(self.extra.iter().map(|s| s.to_string()));
        argv
    }
}

/// Writes a fresh random move-hint key (32 bytes as hex, mode 600) to `<dir>/move-hint.key` and
/// returns the agents' flags that enable move hints with it (every agent of a lab shares it).
pub fn move_hint_flags(dir: &Path) -> Result<Vec<String>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join("move-hint.key");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    writeln!(file, "{hex}")?;
    Ok(vec!["--move-hint-key-file".into(), path.display().to_string()])
}

/// One agent process and its log.
pub struct Agent {
    /// The process (None while stopped).
    pub guard: Option<ChildGuard>,
    /// Its last command line.
    pub argv: Vec<String>,
    /// Its current log file.
    pub log: PathBuf,
    runs: u32,
}

impl Agent {
    /// Starts `argv` inside `ns`, logging to `<dir>/agent<n>.<run>.log`.
    pub fn spawn(ns: &NetNs, n: usize, argv: Vec<String>, dir: &Path) -> Result<Agent> {
        let mut agent = Agent { guard: None, argv, log: PathBuf::new(), runs: 0 };
        agent.respawn(ns, n, dir)?;
        Ok(agent)
    }

    /// (Re)starts it with its last command line, logging to a new file.
    pub fn respawn(&mut self, ns: &NetNs, n: usize, dir: &Path) -> Result<()> {
        self.runs += 1;
        self.log = dir.join(format!("agent{n}.{}.log", self.runs));
        let argv: Vec<&str> = self.argv.iter().map(String::as_str).collect();
        self.guard = Some(ns.spawn(&format!("agent{n}"), &argv, Some(&self.log))?);
        Ok(())
    }

    /// Stops it with SIGTERM (SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.stop(Duration::from_secs(5));
        }
    }

    /// Its current log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// GET `path` from the agent admin port inside `ns`.
pub fn agent_get(ns: &NetNs, path: &str) -> Result<(u16, String)> {
    let addr: SocketAddr = AGENT_HTTP.parse().expect("agent admin address");
    let path = path.to_owned();
    ns.block_on(move || async move { victor_testkit::http::get(addr, &path).await })?
}

/// Waits until the agent in `ns` answers /readyz with 200 (stream up, snapshot applied).
pub fn wait_agent_ready(ns: &NetNs, agent: &mut Agent, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if agent_get(ns, "/readyz").is_ok_and(|(code, _)| code == 200) {
            return Ok(());
        }
        if let Some(g) = agent.guard.as_mut()
            && !g.is_running()
        {
            bail!("agent in {} exited:\n{}", ns.name(), agent.log_text());
        }
        if Instant::now() > deadline {
            bail!("agent in {} not ready after {timeout:?}:\n{}", ns.name(), agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A snapshot of one agent's counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AgentCounters {
    /// Controller sessions opened.
    pub sessions: f64,
    /// Complete snapshots applied.
    pub snapshots: f64,
    /// 1 while a stream is up.
    pub connected: f64,
    /// Revision of the applied desired state.
    pub revision: f64,
    /// Bindings in the desired state (local + remote).
    pub bindings: f64,
    /// Registrations.
    pub registrations: f64,
    /// Report calls (or claims answered UNAVAILABLE) sent again.
    pub report_retries: f64,
    /// Kernel and data-plane operations by kind.
    pub ops: BTreeMap<String, f64>,
}

impl AgentCounters {
    /// Operations of `op` since `before`.
    pub fn ops_since(&self, before: &AgentCounters, op: &str) -> f64 {
        self.ops.get(op).copied().unwrap_or(0.0) - before.ops.get(op).copied().unwrap_or(0.0)
    }

    /// Kernel route and neighbour operations and tunnel removals since `before`: what would flap a
    /// route (the lab's VM never moves, the churn only moves VMs between other FEs).
    pub fn route_churn_since(&self, before: &AgentCounters) -> f64 {
        ["set_route", "del_route", "set_neighbour", "del_neighbour", "tunnel_remove", "tunnel_local"]
            .iter()
            .map(|op| self.ops_since(before, op))
            .sum()
    }
}

/// The counters of the agent in `ns`, from its `/metrics`.
pub fn agent_counters(ns: &NetNs) -> Result<AgentCounters> {
    let (code, text) = agent_get(ns, "/metrics")?;
    if code != 200 {
        bail!("the agent in {} answered /metrics with {code}", ns.name());
    }
    let metric = |name: &str, labels: &str| victor_testkit::http::metric(&text, name, labels);
    let mut ops = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("victor_agent_reconcile_ops_total{")) {
        let (Some(op), Some(value)) = (label(line, "op"), line.rsplit(' ').next()) else { continue };
        *ops.entry(op.to_owned()).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(AgentCounters {
        sessions: metric("victor_agent_controller_sessions_total", ""),
        snapshots: metric("victor_agent_snapshots_received_total", ""),
        connected: metric("victor_agent_controller_connected", ""),
        revision: metric("victor_agent_stream_revision", ""),
        bindings: metric("victor_agent_bindings", "kind=\"local\"")
            + metric("victor_agent_bindings", "kind=\"remote\""),
        registrations: metric("victor_agent_registrations_total", ""),
        report_retries: metric("victor_agent_report_retries_total", ""),
        ops,
    })
}

/// The metric family of the data plane's migration relay (announced migrations): packets the
/// old FE copied to the announced FE, the announced FE held, released to the arrived VM, or
/// dropped when their hold expired.
pub const RELAY_METRIC: &str = "victor_agent_migration_relay_packets";

/// One agent's migration relay counters (`victor_agent_migration_relay_packets_total{what}`),
/// or their change over a move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayCounters {
    /// Tunnel packets for an announced VM copied to the FE it migrates to (at the old FE).
    pub copied: u64,
    /// Copies held for a VM not yet local (at the announced FE).
    pub held: u64,
    /// Held packets delivered once the VM became local.
    pub released: u64,
    /// Held packets dropped when their hold expired.
    pub expired: u64,
}

impl RelayCounters {
    /// Parses the relay counters out of a `/metrics` text; None when the agent does not export
    /// the family at all (an agent without the relay). A family with no sample yet is all zeros.
    pub fn parse(text: &str) -> Option<RelayCounters> {
        if !text.lines().any(|l| l.contains(RELAY_METRIC)) {
            return None;
        }
        let mut c = RelayCounters::default();
        let sample = format!("{RELAY_METRIC}_total{{");
        for line in text.lines().filter(|l| l.starts_with(&sample)) {
            let (Some(what), Some(value)) = (label(line, "what"), line.rsplit(' ').next()) else { continue };
            let value = value.parse::<f64>().unwrap_or(0.0) as u64;
            match what {
                "copied" => c.copied += value,
                "held" => c.held += value,
                "released" => c.released += value,
                "expired" => c.expired += value,
                _ => {}
            }
        }
        Some(c)
    }

    /// The change since `before` (counters only grow; a restarted agent's reset reads as 0).
    pub fn since(&self, before: &RelayCounters) -> RelayCounters {
        RelayCounters {
            copied: self.copied.saturating_sub(before.copied),
            held: self.held.saturating_sub(before.held),
            released: self.released.saturating_sub(before.released),
            expired: self.expired.saturating_sub(before.expired),
        }
    }
}

/// The migration relay counters of the agent in `ns` (None: it exports none).
pub fn relay_counters(ns: &NetNs) -> Result<Option<RelayCounters>> {
    let (code, text) = agent_get(ns, "/metrics")?;
    if code != 200 {
        bail!("the agent in {} answered /metrics with {code}", ns.name());
    }
    Ok(RelayCounters::parse(&text))
}

/// The value of label `name` in a Prometheus sample line.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_counters_are_absent_without_the_family_and_summed_by_what() {
        let without =
            "# TYPE victor_agent_reconcile_ops counter\nvictor_agent_reconcile_ops_total{op=\"x\",result=\"ok\"} 3\n";
        assert_eq!(RelayCounters::parse(without), None);
        // Registered but nothing relayed yet: zeros, not absent.
        let empty = "# HELP victor_agent_migration_relay_packets Packets.\n# TYPE victor_agent_migration_relay_packets counter\n";
        assert_eq!(RelayCounters::parse(empty), Some(RelayCounters::default()));
        let text = format!(
            "{empty}victor_agent_migration_relay_packets_total{{what=\"copied\"}} 120\n\
             victor_agent_migration_relay_packets_total{{what=\"held\"}} 7\n\
             victor_agent_migration_relay_packets_total{{what=\"released\",family=\"ipv4\"}} 5\n\
             victor_agent_migration_relay_packets_total{{what=\"released\",family=\"ipv6\"}} 1\n\
             victor_agent_migration_relay_packets_total{{what=\"expired\"}} 1\n"
        );
        let now = RelayCounters::parse(&text).unwrap();
        assert_eq!(now, RelayCounters { copied: 120, held: 7, released: 6, expired: 1 });
        let before = RelayCounters { copied: 100, held: 7, released: 2, expired: 0 };
        assert_eq!(now.since(&before), RelayCounters { copied: 20, held: 0, released: 4, expired: 1 });
    }
}
