//! Throughput of the userspace IP-in-IP data plane: one iperf3 TCP flow client → VM through two
//! forwarders (fe1 encapsulates, fe2 decapsulates), and in the same run the same path with plain
//! kernel routing instead of the tunnel (baseline). Needs root and iperf3.
//!
//! ```text
//! cargo run --release -p victor-dataplane --example throughput -- [--seconds 5] [--no-offload]
//! ```
//! Writes `bench-results/dataplane.json` at the repository root and prints a summary.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::*;

struct Args {
    seconds: u32,
    offload: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { seconds: 5, offload: true };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => args.seconds = it.next().context("--seconds needs a value")?.parse().context("--seconds")?,
            "--no-offload" => args.offload = false,
            other => bail!("unknown argument {other:?}; use --seconds N and/or --no-offload"),
        }
    }
    Ok(args)
}

/// One iperf3 TCP flow client → VM: Gbit/s received and the sender's retransmissions.
fn iperf(lab: &Lab, seconds: u32, tag: &str) -> Result<(f64, u64)> {
    let port = victor_testkit::ports::free_port().to_string();
    let log = std::env::temp_dir().join(format!("victor-iperf3-server-{tag}-{}.log", std::process::id()));
    let _server =
        lab.vm.spawn("iperf3-server", &["iperf3", "-s", "-1", "-B", &VM.to_string(), "-p", &port], Some(&log))?;
    // Wait until the server listens.
    wait_until("iperf3 server", Duration::from_secs(5), || {
        lab.vm.exec(&["ss", "-Hltn", &format!("sport = :{port}")]).map(|o| !o.stdout.is_empty()).unwrap_or(false)
    })?;
    let out = lab
        .client
        .exec(&["iperf3", "-c", &VM.to_string(), "-p", &port, "-t", &seconds.to_string(), "-J"])
        .context("iperf3 client")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3 output: {json}"))?;
    let retransmits = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok((bps / 1e9, retransmits))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // Other work on the machine competes for the same 2 cores: record it with the result.
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let lab = Lab::build(args.offload)?;
    // Warm-up and sanity check: the tunnel path works.
    let reply = client_probe(&lab, Probe::echo(VM, 1), Duration::from_secs(5))?;
    anyhow::ensure!(reply == Some(ProbeReply::EchoReply { from: VM }), "tunnel path broken: {reply:?}");

    let (tunnel, tunnel_retransmits) = iperf(&lab, args.seconds, "tunnel")?;
    if std::env::var_os("VICTOR_BENCH_DEBUG").is_some() {
        for n in 1..=2 {
            eprintln!("{}", lab.ns(n).ip(&["-s", "link", "show", &lab.fe(n).tun])?);
            eprintln!(
                "{}",
                lab.ns(n).exec(&["cat", "/proc/net/snmp"]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())?
            );
        }
    }
    let fe1 = lab.fe(1).fwd().counters();
    let fe2 = lab.fe(2).fwd().counters();

    // Baseline: the same namespaces and veths, fe1 routes the VM over the underlay directly.
    lab.ns(1).route(&[&format!("{VM}/32"), "via", &fe_addr(2).to_string()])?;
    let (baseline, baseline_retransmits) = iperf(&lab, args.seconds, "baseline")?;
    lab.ns(1).ip(&["route", "del", &format!("{VM}/32")])?;

    let ratio = tunnel / baseline;
    let result = serde_json::json!({
        "benchmark": "dataplane",
        "flow": "one iperf3 TCP flow, client -> fe1 (encap) -> fe2 (decap) -> vm",
        "seconds": args.seconds,
        "offload": args.offload,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "tunnel": { "gbit_per_s": tunnel, "retransmits": tunnel_retransmits },
        "baseline": {
            "gbit_per_s": baseline,
            "retransmits": baseline_retransmits,
            "path": "same veths, plain kernel routing",
        },
        "ratio": ratio,
        "fe1_tunnel_tx_packets": fe1.tunnel_tx_packets,
        "fe1_tun_rx_packets": fe1.tun_rx_packets,
        "fe2_tun_tx_packets": fe2.tun_tx_packets,
        "drops": fe1.dropped_total() + fe2.dropped_total(),
        "loadavg_before": loadavg.trim(),
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench-results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("dataplane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)? + "\n")?;
    println!(
        "userspace IP-in-IP: {tunnel:.2} Gbit/s; plain veth baseline: {baseline:.2} Gbit/s; ratio {ratio:.2} (offload {}, {} s) -> {}",
        args.offload,
        args.seconds,
        path.display()
    );
    Ok(())
}
