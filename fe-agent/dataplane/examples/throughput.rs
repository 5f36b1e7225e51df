//! Throughput of the userspace tunnel data plane against plain veth routing, in the same run:
//! iperf3 TCP between the client (behind fe1) and the VM (behind fe2), one flow and four flows,
//! both directions, each through the tunnel (fe1 ⇄ fe2 userspace forwarders, both directions
//! tunnelled: data one way, ACKs the other) and through the same namespaces and veths with plain
//! kernel routing. Tunnel and veth runs alternate; every combination is repeated. Needs root
//! and iperf3 (`--underlay gro` also ethtool).
//!
//! `--family ipv6` measures IPv6 TCP (client 2001:db8:2::10 → VM 2001:db8:10::11) through the
//! 6in4 tunnel over the same IPv4 underlay, against plain IPv6 routing over the underlay veths
//! (which carry IPv6 addresses for this baseline only).
//!
//! ```text
//! cargo run --release -p victor-dataplane --example throughput -- \
//!     [--family ipv4|ipv6] [--seconds 5] [--repeats 5] [--flows 1,4] [--queues 0] [--no-offload] \
//!     [--underlay veth|gro] [--out bench-results/dataplane-throughput.json]
//! ```
//! `--underlay gro` makes the underlay behave like NICs with GRO: `gro on` and threaded NAPI on
//! the bridge ports that receive from the FEs (and `rx-udp-gro-forwarding`, without which a veth
//! hands packets from a TSO-capable sender to NAPI only when they come from a UDP socket), and a
//! 1000-packet `pfifo` on each FE's underlay port so a full NAPI ring pushes back instead of
//! dropping. It changes nothing for the veth baseline's packets, which are GSO already and never
//! go through NAPI. `VICTOR_BENCH_DEBUG=1` prints the qdisc, link and socket drop counters along
//! the path after each tunnel run. Per run: Gbit/s, retransmits, CPU (forwarder threads, iperf3 client + server,
//! softirq threads; and the whole machine, which includes other load) per Gbit/s, and the
//! forwarders' batching counters. Prints a summary and writes the JSON file.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::*;
use serde_json::{Value, json};
use victor_dataplane::counters::CounterSnapshot;
use victor_dataplane::fib::Action;

struct Args {
    ipv6: bool,
    seconds: u32,
    repeats: usize,
    flows: Vec<u32>,
    queues: usize,
    offload: bool,
    underlay_gro: bool,
    out: std::path::PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        ipv6: false,
        seconds: 5,
        repeats: 5,
        flows: vec![1, 4],
        queues: 0,
        offload: true,
        underlay_gro: false,
        out: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench-results/dataplane-throughput.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--family" => {
                args.ipv6 = match value()?.as_str() {
                    "ipv4" => false,
                    "ipv6" => true,
                    other => bail!("--family {other:?}: ipv4 or ipv6"),
                }
            }
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--repeats" => args.repeats = value()?.parse().context("--repeats")?,
            "--flows" => {
                args.flows = value()?.split(',').map(|f| f.parse().context("--flows")).collect::<Result<_>>()?
            }
            "--queues" => args.queues = value()?.parse().context("--queues")?,
            "--no-offload" => args.offload = false,
            "--underlay" => {
                args.underlay_gro = match value()?.as_str() {
                    "veth" => false,
                    "gro" => true,
                    other => bail!("--underlay {other:?}: veth or gro"),
                }
            }
            "--out" => args.out = value()?.into(),
            other => bail!(
                "unknown argument {other:?}; see the example's doc: --family --seconds --repeats --flows --queues --no-offload --underlay --out"
            ),
        }
    }
    Ok(args)
}

/// CPU time counters (clock ticks) at one instant.
#[derive(Debug, Clone, Default)]
struct CpuSample {
    at: Option<Instant>,
    /// Whole machine: busy (all but idle and iowait), all CPUs.
    machine_busy: u64,
    /// Per task (pid or tid): utime + stime, for the forwarder threads and softirq threads.
    tasks: HashMap<u32, (String, u64)>,
}

fn task_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn cpu_sample() -> CpuSample {
    let mut s = CpuSample { at: Some(Instant::now()), ..Default::default() };
    if let Some(line) = std::fs::read_to_string("/proc/stat").ok().and_then(|t| t.lines().next().map(str::to_owned)) {
        let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let total: u64 = v.iter().take(8).sum();
        s.machine_busy = total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0);
    }
    let mut scan = |dir: &str, keep: &dyn Fn(&str) -> bool| {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let Ok(id) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default().trim().to_owned();
            if keep(&comm)
                && let Some(t) = std::fs::read_to_string(e.path().join("stat")).ok().as_deref().and_then(task_ticks)
            {
                s.tasks.insert(id, (comm, t));
            }
        }
    };
    scan("/proc/self/task", &|c| c.starts_with("fwd-"));
    scan("/proc", &|c| c.starts_with("ksoftirqd/") || c.starts_with("napi/"));
    s
}

/// CPU seconds per category between two samples.
fn cpu_delta(a: &CpuSample, b: &CpuSample) -> (f64, f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (mut fwd, mut softirq) = (0u64, 0u64);
    for (id, (comm, t)) in &b.tasks {
        let before = a.tasks.get(id).map_or(0, |(_, t)| *t);
        if comm.starts_with("fwd-") {
            fwd += t - before;
        } else {
            softirq += t - before;
        }
    }
    (fwd as f64 / hz, softirq as f64 / hz, (b.machine_busy - a.machine_busy) as f64 / hz)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Tunnel,
    Veth,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Tunnel => "tunnel",
            Path::Veth => "veth",
        }
    }
}

/// Routes client ⇄ VM through the tunnel (both directions) or plainly over the underlay.
fn set_path(lab: &Lab, path: Path, ipv6: bool) -> Result<()> {
    if ipv6 {
        let vm128 = format!("{VM6}/128");
        match path {
            Path::Tunnel => {
                let _ = lab.ns(1).ip(&["-6", "route", "del", &vm128]);
                lab.ns(2).ip(&["-6", "route", "replace", CLIENT_NET6, "dev", &lab.fe(2).tun])?;
            }
            Path::Veth => {
                lab.ns(1).ip(&["-6", "route", "replace", &vm128, "via", &fe_addr6(2).to_string()])?;
                lab.ns(2).ip(&["-6", "route", "replace", CLIENT_NET6, "via", &fe_addr6(1).to_string()])?;
            }
        }
        return Ok(());
    }
    let (vm32, client_net) = (format!("{VM}/32"), "192.0.2.0/24");
    match path {
        Path::Tunnel => {
            let _ = lab.ns(1).ip(&["route", "del", &vm32]);
            lab.ns(2).ip(&["route", "replace", client_net, "dev", &lab.fe(2).tun])?;
        }
        Path::Veth => {
            lab.ns(1).ip(&["route", "replace", &vm32, "via", &fe_addr(2).to_string()])?;
            lab.ns(2).ip(&["route", "replace", client_net, "via", &fe_addr(1).to_string()])?;
        }
    }
    Ok(())
}

/// The underlay's receiving ends behave like NICs with GRO (see the module doc).
fn underlay_gro(lab: &Lab) -> Result<()> {
    for n in 1..=3 {
        let port = format!("p{n}");
        lab.ul.exec(&["ethtool", "-K", &port, "gro", "on", "rx-udp-gro-forwarding", "on"])?;
        lab.ul.exec(&["sh", "-c", &format!("echo 1 > /sys/class/net/{port}/threaded")])?;
        // A queue in front of the ring, so a full ring pushes back on the sender instead of
        // dropping (veth has no qdisc by default; a NIC driver has its ring and a qdisc).
        lab.ns(n).exec(&["tc", "qdisc", "replace", "dev", "ul0", "root", "pfifo", "limit", "1000"])?;
    }
    Ok(())
}

/// One iperf3 run: `flows` TCP flows client → VM (or VM → client with `reverse`), over IPv6
/// with `ipv6`.
fn iperf(
    lab: &Lab,
    seconds: u32,
    flows: u32,
    reverse: bool,
    ipv6: bool,
    tag: &str,
) -> Result<(Value, CpuSample, CpuSample)> {
    let port = victor_testkit::ports::free_port().to_string();
    let log = std::env::temp_dir().join(format!("victor-iperf3-server-{tag}-{}.log", std::process::id()));
    let vm = if ipv6 { VM6.to_string() } else { VM.to_string() };
    let _server = lab.vm.spawn("iperf3-server", &["iperf3", "-s", "-1", "-B", &vm, "-p", &port], Some(&log))?;
    wait_until("iperf3 server", Duration::from_secs(5), || {
        lab.vm.exec(&["ss", "-Hltn", &format!("sport = :{port}")]).map(|o| !o.stdout.is_empty()).unwrap_or(false)
    })?;
    let (secs, p) = (seconds.to_string(), flows.to_string());
    let mut argv = vec!["iperf3", "-c", &vm, "-p", &port, "-t", &secs, "-P", &p, "-J"];
    if reverse {
        argv.push("-R");
    }
    let before = cpu_sample();
    let out = lab.client.exec(&argv).context("iperf3 client")?;
    let after = cpu_sample();
    let json: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    Ok((json, before, after))
}

/// Where packets were dropped along the tunnel path (cumulative), on stderr.
fn debug_drops(lab: &Lab) {
    let show = |ns: &victor_testkit::netns::NetNs, argv: &[&str]| {
        let out = ns.exec(argv).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        eprintln!("[{}] {}:\n{out}", ns.name(), argv.join(" "));
    };
    for n in 1..=2 {
        show(lab.ns(n), &["tc", "-s", "qdisc", "show", "dev", "ul0"]);
        show(lab.ns(n), &["ip", "-s", "link", "show", "ul0"]);
        show(lab.ns(n), &["cat", "/proc/net/raw"]);
        show(lab.ns(n), &["ip", "-s", "link", "show", &lab.fe(n).tun]);
    }
    show(&lab.ul, &["ip", "-s", "link"]);
    show(&lab.vm, &["ip", "-s", "link", "show", "eth0"]);
}

fn counters_delta(a: &CounterSnapshot, b: &CounterSnapshot) -> Value {
    let d = |x: u64, y: u64| y.saturating_sub(x);
    let per = |n: u64, calls: u64| if calls == 0 { 0.0 } else { n as f64 / calls as f64 };
    json!({
        "tun_rx_packets": d(a.tun_rx_packets, b.tun_rx_packets),
        "segments_per_tun_read": per(d(a.tun_rx_packets, b.tun_rx_packets), d(a.tun_reads, b.tun_reads)),
        "tunnel_tx_packets": d(a.tunnel_tx_packets, b.tunnel_tx_packets),
        "packets_per_sendmmsg": per(d(a.tunnel_tx_packets, b.tunnel_tx_packets), d(a.underlay_sends, b.underlay_sends)),
        "tunnel_rx_packets": d(a.tunnel_rx_packets, b.tunnel_rx_packets),
        "packets_per_recvmmsg": per(d(a.tunnel_rx_packets, b.tunnel_rx_packets), d(a.underlay_recvs, b.underlay_recvs)),
        "underlay_rx_coalesced": d(a.underlay_rx_coalesced, b.underlay_rx_coalesced),
        "ipv6_tunnel_tx_packets": d(a.ipv6_tunnel_tx_packets, b.ipv6_tunnel_tx_packets),
        "ipv6_tunnel_rx_packets": d(a.ipv6_tunnel_rx_packets, b.ipv6_tunnel_rx_packets),
        "tun_tx_packets": d(a.tun_tx_packets, b.tun_tx_packets),
        "packets_per_tun_write": per(d(a.tun_tx_packets, b.tun_tx_packets), d(a.tun_writes, b.tun_writes)),
        "drops": d(a.dropped_total(), b.dropped_total()),
    })
}

fn stats(values: &mut [f64]) -> Value {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return Value::Null;
    }
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    json!({ "min": values[0], "median": median, "max": values[n - 1], "n": n })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let loadavg = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    let load_start = loadavg();
    let lab = Lab::build_with(LabConfig { offload: args.offload, queues: args.queues, ..LabConfig::default() })?;
    if args.underlay_gro {
        underlay_gro(&lab)?;
    }
    // fe2 tunnels replies to the client back to fe1 (the lab binds the client's IPv6 address).
    lab.fe(2).fib.set(CLIENT, Action::Remote(fe_addr(1)))?;
    set_path(&lab, Path::Tunnel, args.ipv6)?;
    if args.ipv6 {
        let reply = client_probe6(&lab, VM6, 1, 64, 104, Duration::from_secs(5))?;
        anyhow::ensure!(reply == Some(Probe6Reply::EchoReply { from: VM6 }), "6in4 tunnel path broken: {reply:?}");
    } else {
        let reply = client_probe(&lab, Probe::echo(VM, 1), Duration::from_secs(5))?;
        anyhow::ensure!(reply == Some(ProbeReply::EchoReply { from: VM }), "tunnel path broken: {reply:?}");
    }

    let mut runs = Vec::new();
    for rep in 0..args.repeats {
        for &flows in &args.flows {
            for reverse in [false, true] {
                // Alternate which path goes first, so slow drifts of the machine's load hit both.
                let order = if rep % 2 == 0 { [Path::Tunnel, Path::Veth] } else { [Path::Veth, Path::Tunnel] };
                for path in order {
                    set_path(&lab, path, args.ipv6)?;
                    let c1 = (lab.fe(1).fwd().counters(), lab.fe(2).fwd().counters());
                    let load_before = loadavg();
                    let tag = format!("{}-{flows}-{reverse}-{rep}", path.name());
                    let (json, before, after) = iperf(&lab, args.seconds, flows, reverse, args.ipv6, &tag)?;
                    let c2 = (lab.fe(1).fwd().counters(), lab.fe(2).fwd().counters());
                    if std::env::var_os("VICTOR_BENCH_DEBUG").is_some() && path == Path::Tunnel {
                        debug_drops(&lab);
                    }
                    let end = &json["end"];
                    let gbps = end["sum_received"]["bits_per_second"]
                        .as_f64()
                        .with_context(|| format!("no end.sum_received in iperf3 output: {json}"))?
                        / 1e9;
                    let cpu = &end["cpu_utilization_percent"];
                    let iperf_cpu = (cpu["host_total"].as_f64().unwrap_or(0.0)
                        + cpu["remote_total"].as_f64().unwrap_or(0.0))
                        / 100.0
                        * f64::from(args.seconds);
                    let (fwd_cpu, softirq_cpu, machine_cpu) = cpu_delta(&before, &after);
                    let wall = after.at.zip(before.at).map_or(0.0, |(a, b)| (a - b).as_secs_f64());
                    let path_cores = (fwd_cpu + softirq_cpu + iperf_cpu) / wall;
                    let (sender, receiver) = if reverse { (2, 1) } else { (1, 2) };
                    let run = json!({
                        "repeat": rep, "flows": flows, "direction": if reverse { "vm_to_client" } else { "client_to_vm" },
                        "path": path.name(), "gbit_per_s": gbps,
                        "retransmits": end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
                        "wall_s": wall,
                        "cpu_s": { "forwarders": fwd_cpu, "iperf3": iperf_cpu, "softirq_threads": softirq_cpu, "machine_busy": machine_cpu },
                        "path_cores_per_gbit": path_cores / gbps,
                        "machine_cores_per_gbit": machine_cpu / wall / gbps,
                        "loadavg_before": load_before,
                        "encapsulating_fe": format!("fe{sender}"),
                        "encap": if path == Path::Tunnel { counters_delta(if sender == 1 { &c1.0 } else { &c1.1 }, if sender == 1 { &c2.0 } else { &c2.1 }) } else { Value::Null },
                        "decap": if path == Path::Tunnel { counters_delta(if receiver == 1 { &c1.0 } else { &c1.1 }, if receiver == 1 { &c2.0 } else { &c2.1 }) } else { Value::Null },
                    });
                    eprintln!(
                        "rep {rep} flows {flows} {:13} {:6}: {gbps:6.2} Gbit/s, path {:.3} cores/Gbit (load {load_before})",
                        run["direction"].as_str().unwrap_or(""),
                        path.name(),
                        path_cores / gbps
                    );
                    runs.push(run);
                }
            }
        }
    }

    // Summary per (flows, direction): tunnel and veth Gbit/s and their ratio per repeat.
    let mut summary = Vec::new();
    println!(
        "{:>5} {:13} | {:>20} | {:>20} | {:>17} | cores/Gbit tunnel, veth",
        "flows", "direction", "tunnel Gbit/s", "veth Gbit/s", "ratio"
    );
    for &flows in &args.flows {
        for dir in ["client_to_vm", "vm_to_client"] {
            let pick = |path: &str, key: &str| -> Vec<f64> {
                runs.iter()
                    .filter(|r| r["flows"] == flows && r["direction"] == dir && r["path"] == path)
                    .map(|r| r[key].as_f64().unwrap_or(0.0))
                    .collect()
            };
            let (mut t, mut v) = (pick("tunnel", "gbit_per_s"), pick("veth", "gbit_per_s"));
            let mut ratio: Vec<f64> = t.iter().zip(&v).map(|(t, v)| t / v).collect();
            let (mut tc, mut vc) = (pick("tunnel", "path_cores_per_gbit"), pick("veth", "path_cores_per_gbit"));
            let s = json!({
                "flows": flows, "direction": dir,
                "tunnel_gbit_per_s": stats(&mut t), "veth_gbit_per_s": stats(&mut v), "ratio": stats(&mut ratio),
                "tunnel_path_cores_per_gbit": stats(&mut tc), "veth_path_cores_per_gbit": stats(&mut vc),
            });
            let f = |x: &Value| {
                format!(
                    "{:.2} / {:.2} / {:.2}",
                    x["min"].as_f64().unwrap_or(0.0),
                    x["median"].as_f64().unwrap_or(0.0),
                    x["max"].as_f64().unwrap_or(0.0)
                )
            };
            println!(
                "{flows:>5} {dir:13} | {:>20} | {:>20} | {:>17} | {:.3}, {:.3}",
                f(&s["tunnel_gbit_per_s"]),
                f(&s["veth_gbit_per_s"]),
                f(&s["ratio"]),
                s["tunnel_path_cores_per_gbit"]["median"].as_f64().unwrap_or(0.0),
                s["veth_path_cores_per_gbit"]["median"].as_f64().unwrap_or(0.0),
            );
            summary.push(s);
        }
    }
    let result = json!({
        "benchmark": "dataplane",
        "family": if args.ipv6 { "ipv6 (6in4 over the IPv4 underlay; baseline: plain IPv6 routing)" } else { "ipv4 (IP-in-IP)" },
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "what": "iperf3 TCP client <-> VM; tunnel: client -> fe1 (encap) -> fe2 (decap) -> VM and back through the tunnel; veth: the same namespaces and veths with plain kernel routing of the same family",
        "seconds": args.seconds, "repeats": args.repeats, "offload": args.offload,
        "queues": lab.fe(1).fwd().queues(),
        "underlay": if args.underlay_gro { "gro (gro on + threaded NAPI on the receiving veth ends)" } else { "veth defaults" },
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "summary": summary,
        "runs": runs,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)? + "\n")?;
    println!("-> {}", args.out.display());
    Ok(())
}
