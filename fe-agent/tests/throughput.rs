//! Benchmark, not a test (ignored; run explicitly): one iperf3 TCP flow client → VM through fe1
//! (encapsulates) and fe2 (decapsulates) with real agents on the kernel data plane and on the
//! userspace one, and through the same namespaces and veths with plain kernel routing (the
//! baseline), in one run; each repeated, reported as medians and as ratios to the baseline.
//! Absolute numbers depend on the machine (and mean little under QEMU's TCG); the ratios are the
//! figure (BENCHMARKS.md, "Kernel data plane"). Needs root and iperf3.
//!
//! ```text
//! cargo nextest run --release -p victor-fe-agent --test throughput --run-ignored only --no-capture
//! # in the stock-kernel guest (tests/vm):
//! tests/vm/run --cwd fe-agent target/release/deps/throughput-<hash> --ignored --nocapture
//! ```
//! `VICTOR_THROUGHPUT_SECONDS` (5) per flow, `VICTOR_THROUGHPUT_ROUNDS` (3), and
//! `VICTOR_THROUGHPUT_OUT=file` also writes the JSON. The kernel data plane is measured only where
//! the kernel's ipip module can be loaded (else the report says why it is missing).

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use serde_json::json;

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One iperf3 TCP flow client → VM: Gbit/s received and the sender's retransmissions.
fn iperf(lab: &Lab, seconds: u32) -> Result<(f64, u64)> {
    let port = victor_testkit::ports::free_port().to_string();
    let log = lab.dir.path().join(format!("iperf3-server-{port}.log"));
    let _server =
        lab.vm.spawn("iperf3-server", &["iperf3", "-s", "-1", "-B", &VM.to_string(), "-p", &port], Some(&log))?;
    wait("iperf3 server", Duration::from_secs(20), || {
        lab.vm.exec(&["ss", "-Hltn", &format!("sport = :{port}")]).is_ok_and(|o| !o.stdout.is_empty())
    })?;
    let out = lab
        .client
        .exec(&["iperf3", "-c", &VM.to_string(), "-p", &port, "-t", &seconds.to_string(), "-J"])
        .context("iperf3 client")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received in iperf3's report: {report}"))?;
    Ok((bps / 1e9, report["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0)))
}

/// The lab with plain kernel routing: fe1 routes the VM to fe2's underlay address, fe2 owns the
/// VM's gateway address. The same namespaces, veths and bridge as the tunnel paths.
fn plain_lab() -> Result<Lab> {
    let lab = Lab::build(2)?;
    lab.fe(1).route(&[&format!("{VM}/32"), "via", &fe_addr(2).to_string()])?;
    lab.fe(2).add_addr(VM_PORT, &format!("{GATEWAY}/24"))?;
    Ok(lab)
}

/// The lab with agents on `plane`, the VM bound at fe2 and answering.
async fn tunnel_lab(plane: Plane) -> Result<(Lab, Controller)> {
    let mut lab = Lab::build_on(2, plane)?;
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    for n in 1..=2 {
        lab.start_agent(n, &[ctl.url()], &[])?;
    }
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(60))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(20)).await?;
    Ok((lab, ctl))
}

/// Warms the path up (ping answered), then measures `rounds` flows.
fn measure(lab: &Lab, seconds: u32, rounds: u32) -> Result<Vec<(f64, u64)>> {
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 5, Duration::from_secs(20)).context("the path does not answer")?;
    drop(prober);
    (0..rounds).map(|_| iperf(lab, seconds)).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn summary(runs: &[(f64, u64)]) -> serde_json::Value {
    let gbps: Vec<f64> = runs.iter().map(|r| r.0).collect();
    json!({ "gbit_s_median": median(&gbps), "gbit_s": gbps, "retransmits": runs.iter().map(|r| r.1).collect::<Vec<_>>() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark (iperf3, tens of seconds): run explicitly, see the module doc"]
async fn kernel_and_userspace_tunnels_vs_plain_veth() -> Result<()> {
    victor_testkit::require_root("the throughput benchmark");
    let (seconds, rounds) = (env_or("VICTOR_THROUGHPUT_SECONDS", 5), env_or("VICTOR_THROUGHPUT_ROUNDS", 3));
    let load_before = std::fs::read_to_string("/proc/loadavg")?;
    let plain = {
        let lab = plain_lab()?;
        measure(&lab, seconds, rounds)?
    };
    let base = median(&plain.iter().map(|r| r.0).collect::<Vec<_>>());
    let mut report = json!({
        "seconds": seconds,
        "rounds": rounds,
        "kernel_release": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        "plain_veth": summary(&plain),
    });
    for plane in [Plane::Kernel, Plane::Tun] {
        if let Some(why) = plane.unavailable() {
            report[plane.label()] = json!({ "skipped": why });
            continue;
        }
        let runs = {
            let (lab, _ctl) = tunnel_lab(plane).await?;
            measure(&lab, seconds, rounds)?
        };
        let mut s = summary(&runs);
        s["ratio_to_plain_veth"] = json!(median(&runs.iter().map(|r| r.0).collect::<Vec<_>>()) / base);
        report[plane.label()] = s;
    }
    report["load_avg_before"] = json!(load_before.trim());
    report["load_avg_after"] = json!(std::fs::read_to_string("/proc/loadavg")?.trim());
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Ok(path) = std::env::var("VICTOR_THROUGHPUT_OUT") {
        std::fs::write(&path, &text).with_context(|| format!("write {path}"))?;
    }
    Ok(())
}
