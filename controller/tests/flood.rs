//! A stream flood against one replica (a controller process on a 1-member etcd) while an FE
//! heartbeats like an agent and an orchestrator makes unary calls:
//! * thousands of `Sync` streams with full snapshots — a quarter read at full speed, a quarter
//!   slowly, half never — plus binding watches with snapshots, idle TCP sockets and half HTTP/2
//!   prefaces, and streams beyond the per-connection and per-replica limits;
//! * asserted: the replica never loses a lease and keeps housekeeping, the heartbeating FE is
//!   never marked down and no heartbeat fails, every refused stream is RESOURCE_EXHAUSTED naming
//!   its limit, the replica's memory stays under a bound computed from the stream count;
//! * printed (not asserted, the machine is shared): unary latency idle and under the flood
//!   (p50/p99), the replica's RSS before and at its peak, what was admitted and refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;
use tonic::Code;
use tonic::transport::Channel;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::binding_service_client::BindingServiceClient;
use victor_proto::v1::*;
use victor_testkit::etcd::EtcdCluster;
use victor_testkit::http::{get, metric};

/// Bindings in the replica (the report had 13,500).
const BINDINGS: u32 = 13_500;
/// FEs whose connections carry the flood.
const FLOOD_FES: usize = 105;
/// Sync streams per flood connection (under the default 32 per connection).
const STREAMS_PER_CONNECTION: usize = 20;
/// The replica's agent-stream limit: the flood asks for more.
const MAX_AGENT_STREAMS: usize = 2048;
/// Binding watches with a snapshot (under the default limit of 256).
const WATCHES: usize = 200;
/// Silent sockets, and sockets with half an HTTP/2 preface.
const SILENT_SOCKETS: usize = 300;
const HALF_PREFACES: usize = 300;
/// How long the flood is watched once every stream is open.
const FLOOD: Duration = Duration::from_secs(15);
/// How long unary latency is measured before the flood.
const IDLE: Duration = Duration::from_secs(5);

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect("connect")
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command (which may hold spaces) come the fields from `state` (3) on: utime and
    // stime (14 and 15) are the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / hz)
}

/// Runs `future` on a runtime of its own thread, as a separate client process would: the flood's
/// reader tasks in the test's runtime must not delay the calls being measured.
fn isolated<F>(future: F) -> tokio::sync::oneshot::Receiver<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = tx.send(runtime.block_on(future));
    });
    rx
}

/// What the sampler saw of the replica during the flood.
#[derive(Debug, Default)]
struct Watched {
    peak_rss: u64,
    leases_lost: f64,
    housekeeper_missing: u32,
    fes_down: f64,
    samples: u32,
}

/// Samples the replica's RSS and metrics every 250 ms until `stop`.
async fn sample(pid: u32, http: std::net::SocketAddr, stop: Arc<AtomicBool>) -> Watched {
    let mut w = Watched::default();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        w.peak_rss = w.peak_rss.max(rss_bytes(pid));
        let (_, m) = get(http, "/metrics").await.expect("the admin port answers during the flood");
        w.leases_lost = metric(&m, "victor_replica_leases_lost_total", "");
        if metric(&m, "victor_housekeeper", "") != 1.0 {
            w.housekeeper_missing += 1;
        }
        w.fes_down = w.fes_down.max(metric(&m, "victor_fes", "state=\"down\""));
        w.samples += 1;
    }
    w
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Unary calls of an orchestrator (GetBinding of varying VMs, GetStatus) until `stop`; returns
/// their latencies, sorted. A failed call is a test failure.
async fn orchestrate(channel: Channel, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut client = BindingServiceClient::new(channel);
    let mut latencies = Vec::new();
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let vm = format!("10.10.{}.{}", (i % BINDINGS) / 250, 1 + (i % BINDINGS) % 250);
        client
            .get_binding(GetBindingRequest { vm_ip: vm.clone() })
            .await
            .unwrap_or_else(|e| panic!("GetBinding {vm}: {e}"));
        latencies.push(started.elapsed());
        let started = Instant::now();
        client.get_status(GetStatusRequest {}).await.expect("GetStatus");
        latencies.push(started.elapsed());
        i = i.wrapping_add(7919);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    latencies
}

/// What the heartbeating FE saw.
#[derive(Default)]
struct FeWitness {
    heartbeats: AtomicU64,
    heartbeat_failures: AtomicU64,
    marked_down: AtomicU64,
}

/// An FE as its agent runs it: a heartbeat every interval the controller asked for (2 s
/// deadline, as the agent), and its Sync stream, watching for its own FE entry going down.
async fn heartbeating_fe(addr: std::net::SocketAddr, witness: Arc<FeWitness>, stop: Arc<AtomicBool>) {
    let mut client = AgentServiceClient::new(channel(addr).await);
    let registered = client
        .register(RegisterRequest {
            fe_id: "fe-hb".into(),
            underlay_addr: "192.0.2.250".into(),
            site: "a".into(),
            ..Default::default()
        })
        .await
        .expect("register fe-hb")
        .into_inner();
    let every = Duration::from_millis(u64::from(registered.heartbeat_interval_ms));
    let mut stream = client.sync(SyncRequest { fe_id: "fe-hb".into(), from_revision: 0 }).await.unwrap().into_inner();
    let reader_witness = witness.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            if m.fe_upserts.iter().any(|f| f.fe_id == "fe-hb" && !f.up) {
                reader_witness.marked_down.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut tick = tokio::time::interval(every);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut request = tonic::Request::new(HeartbeatRequest { fe_id: "fe-hb".into() });
        request.set_timeout(Duration::from_secs(2));
        match client.heartbeat(request).await {
            Ok(_) => witness.heartbeats.fetch_add(1, Ordering::Relaxed),
            Err(status) => {
                eprintln!("heartbeat failed: {status}");
                witness.heartbeat_failures.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    reader.abort();
}

/// How a flood stream is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Fast,
    Slow,
    Never,
}

/// Outcome counters of the flood's stream requests.
#[derive(Default)]
struct Admitted {
    agent: AtomicU64,
    watch: AtomicU64,
    refused_connection: AtomicU64,
    refused_agent: AtomicU64,
    other_errors: AtomicU64,
}

impl Admitted {
    fn refused(&self, status: &tonic::Status) {
        let counter = if status.code() != Code::ResourceExhausted {
            &self.other_errors
        } else if status.message().contains("--max-streams-per-connection=32") {
            &self.refused_connection
        } else if status.message().contains(&format!("--max-agent-streams={MAX_AGENT_STREAMS}")) {
            &self.refused_agent
        } else {
            &self.other_errors
        };
        if std::ptr::eq(counter, &self.other_errors) {
            eprintln!("unexpected refusal: {status}");
        }
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn follow<T>(mut stream: tonic::Streaming<T>, reader: Reader, held: &mut Vec<tonic::Streaming<T>>)
where
    T: prost::Message + Default + Send + 'static,
{
    match reader {
        Reader::Never => held.push(stream),
        Reader::Fast | Reader::Slow => {
            tokio::spawn(async move {
                while let Ok(Some(_)) = stream.message().await {
                    if reader == Reader::Slow {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_delays_no_lease_no_heartbeat_and_stays_bounded() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let max_agent = MAX_AGENT_STREAMS.to_string();
    let replica =
        Replica::spawn("flood", &etcd.endpoints(), &["--session-ttl", "4s", "--max-agent-streams", &max_agent]).await;
    let (grpc, http, pid) = (replica.grpc, replica.http, replica.process.pid());
    let stop = Arc::new(AtomicBool::new(false));

    let witness = Arc::new(FeWitness::default());
    let fe = isolated(heartbeating_fe(grpc, witness.clone(), stop.clone()));

    // The flood FEs and the bindings (reported by them).
    let mut admin = connect(grpc).await;
    for i in 0..FLOOD_FES {
        let req = RegisterRequest {
            fe_id: format!("flood-{i:03}"),
            underlay_addr: format!("198.18.{}.{}", i / 250, 1 + i % 250),
            site: "a".into(),
            ..Default::default()
        };
        admin.agent.register(req).await.expect("register a flood FE");
    }
    let ips: Vec<u32> = (0..BINDINGS).collect();
    for (n, batch) in ips.chunks(1024).enumerate() {
        let observations = batch
            .iter()
            .map(|&i| {
                let mac = victor_proto::Mac([2, 0, 0, 0, (i >> 8) as u8, i as u8]);
                observation(&format!("10.10.{}.{}", i / 250, 1 + i % 250), mac, ObservationKind::Learned, unix_nanos())
            })
            .collect();
        let report = ReportRequest { fe_id: format!("flood-{:03}", n % FLOOD_FES), observations };
        let results = admin.agent.report(report).await.expect("preload").into_inner().results;
        assert!(results.iter().all(|r| r.outcome == ClaimOutcome::Bound as i32));
    }

    // Unary latency before the flood.
    let idle_stop = Arc::new(AtomicBool::new(false));
    let idle = isolated({
        let stop = idle_stop.clone();
        async move { orchestrate(channel(grpc).await, stop).await }
    });
    tokio::time::sleep(IDLE).await;
    idle_stop.store(true, Ordering::Relaxed);
    let idle = idle.await.unwrap();
    let rss_before = rss_bytes(pid);
    let (_, m) = get(http, "/metrics").await.unwrap();
    let snapshot_bytes_before = metric(&m, "victor_snapshot_bytes_total", "");

    // The flood.
    let flood_started = Instant::now();
    let cpu_before = (cpu_time(pid), cpu_time(std::process::id()));
    let busy = isolated({
        let stop = stop.clone();
        async move { orchestrate(channel(grpc).await, stop).await }
    });
    let watched = isolated(sample(pid, http, stop.clone()));
    let mut sockets = Vec::new();
    for n in 0..SILENT_SOCKETS + HALF_PREFACES {
        let mut socket = tokio::net::TcpStream::connect(grpc).await.expect("a raw socket");
        if n >= SILENT_SOCKETS {
            socket.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        sockets.push(socket);
    }
    let admitted = Arc::new(Admitted::default());
    let mut held_sync = Vec::new();
    let mut held_watch = Vec::new();
    // One connection asks for more than its share.
    let greedy = channel(grpc).await;
    for _ in 0..33 {
        let mut client = AgentServiceClient::new(greedy.clone());
        match client.sync(SyncRequest { fe_id: "flood-000".into(), from_revision: 0 }).await {
            Ok(s) => {
                admitted.agent.fetch_add(1, Ordering::Relaxed);
                follow(s.into_inner(), Reader::Never, &mut held_sync);
            }
            Err(status) => admitted.refused(&status),
        }
    }
    // Then the flood connections, readers of every kind.
    for i in 0..FLOOD_FES {
        let connection = channel(grpc).await;
        for j in 0..STREAMS_PER_CONNECTION {
            let reader = match (i + j) % 4 {
                0 => Reader::Fast,
                1 => Reader::Slow,
                _ => Reader::Never,
            };
            let mut client = AgentServiceClient::new(connection.clone());
            let request = SyncRequest { fe_id: format!("flood-{i:03}"), from_revision: 0 };
            match client.sync(request).await {
                Ok(s) => {
                    admitted.agent.fetch_add(1, Ordering::Relaxed);
                    follow(s.into_inner(), reader, &mut held_sync);
                }
                Err(status) => admitted.refused(&status),
            }
        }
    }
    for i in 0..WATCHES {
        let connection = channel(grpc).await;
        let mut client = BindingServiceClient::new(connection);
        let request = WatchBindingsRequest { include_snapshot: true, ..Default::default() };
        let s = client.watch_bindings(request).await.expect("a watch under the limit");
        admitted.watch.fetch_add(1, Ordering::Relaxed);
        follow(s.into_inner(), if i % 2 == 0 { Reader::Fast } else { Reader::Never }, &mut held_watch);
    }
    let opened_in = flood_started.elapsed();

    // The flood lasts a while once everything is open.
    tokio::time::sleep(FLOOD).await;
    stop.store(true, Ordering::Relaxed);
    let flood_lasted = flood_started.elapsed();
    let cpu = (cpu_time(pid) - cpu_before.0, cpu_time(std::process::id()) - cpu_before.1);
    let busy = busy.await.unwrap();
    let watched = watched.await.unwrap();
    fe.await.unwrap();
    let Watched { peak_rss, leases_lost, housekeeper_missing, fes_down, samples } = watched;
    let peak_rss = peak_rss.max(rss_before);
    let (_, m) = get(http, "/metrics").await.unwrap();
    let snapshot_bytes = metric(&m, "victor_snapshot_bytes_total", "") - snapshot_bytes_before;
    let timed_out = metric(&m, "victor_connections_timed_out_total", "server=\"grpc\",reason=\"handshake\"");
    let fes = admin.binding.list_fes(ListFesRequest {}).await.unwrap().into_inner().fes;
    let hb = fes.iter().find(|f| f.fe_id == "fe-hb").expect("fe-hb registered");

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("flood figures (controller debug build, shared 2-core machine; printed, not asserted):");
    println!(
        "  unary idle:  {} calls, p50 {:.2} ms, p99 {:.2} ms",
        idle.len(),
        ms(percentile(&idle, 0.5)),
        ms(percentile(&idle, 0.99))
    );
    println!(
        "  unary flood: {} calls, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        busy.len(),
        ms(percentile(&busy, 0.5)),
        ms(percentile(&busy, 0.99)),
        ms(busy.last().copied().unwrap_or_default())
    );
    println!("  controller RSS: {:.0} MiB before, {:.0} MiB peak", mib(rss_before), mib(peak_rss));
    println!(
        "  CPU over the {:.0} s flood: controller {:.1} s, test process (flood clients) {:.1} s",
        flood_lasted.as_secs_f64(),
        cpu.0.as_secs_f64(),
        cpu.1.as_secs_f64()
    );
    println!(
        "  streams: {} agent admitted, {} refused per connection, {} refused per replica; {} watches; opened in {:.1} s, \
         then {} s more",
        admitted.agent.load(Ordering::Relaxed),
        admitted.refused_connection.load(Ordering::Relaxed),
        admitted.refused_agent.load(Ordering::Relaxed),
        admitted.watch.load(Ordering::Relaxed),
        opened_in.as_secs_f64(),
        FLOOD.as_secs()
    );
    println!(
        "  snapshot bytes built: {:.0} MiB; raw sockets closed at the handshake deadline: {timed_out}",
        snapshot_bytes / (1 << 20) as f64
    );
    println!(
        "  fe-hb: {} heartbeats, {} failed; max FEs down {fes_down} (flood FEs do not heartbeat)",
        witness.heartbeats.load(Ordering::Relaxed),
        witness.heartbeat_failures.load(Ordering::Relaxed)
    );

    // Leases and housekeeping.
    assert_eq!(leases_lost, 0.0, "the replica lost a lease during the flood");
    assert!(samples >= 20, "only {samples} samples of the replica's metrics");
    assert_eq!(housekeeper_missing, 0, "the replica lost housekeeping during the flood");
    // The heartbeating FE.
    assert_eq!(witness.heartbeat_failures.load(Ordering::Relaxed), 0, "heartbeats failed");
    assert!(witness.heartbeats.load(Ordering::Relaxed) >= 10, "too few heartbeats were sent");
    assert_eq!(witness.marked_down.load(Ordering::Relaxed), 0, "fe-hb was marked down");
    assert_eq!(hb.health, FeHealth::Up as i32, "fe-hb is down after the flood");
    // Refusals: exactly the streams over the limits, each with its limit named.
    assert_eq!(admitted.other_errors.load(Ordering::Relaxed), 0, "a stream failed other than by a limit");
    assert_eq!(admitted.refused_connection.load(Ordering::Relaxed), 1, "the 33rd stream of one connection");
    let asked = 1 + 33 + (FLOOD_FES * STREAMS_PER_CONNECTION) as u64; // fe-hb, greedy, flood
    let agent = admitted.agent.load(Ordering::Relaxed) + 1;
    assert_eq!(agent, MAX_AGENT_STREAMS as u64, "admitted agent streams (fe-hb's included)");
    assert_eq!(agent + admitted.refused_agent.load(Ordering::Relaxed) + 1, asked);
    assert!(timed_out >= (SILENT_SOCKETS + HALF_PREFACES) as f64, "silent sockets and half prefaces were kept");
    // Memory: at most a few messages per stream (each at most a snapshot part) on top of the
    // replica before the flood.
    let streams = agent + admitted.watch.load(Ordering::Relaxed);
    let bound = rss_before + streams * 4 * (80 << 10) + (256 << 20);
    assert!(peak_rss <= bound, "RSS peaked at {:.0} MiB, bound {:.0} MiB", mib(peak_rss), mib(bound));
    drop((held_sync, held_watch, sockets));
}
