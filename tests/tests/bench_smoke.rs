//! A CI-sized run of `victor-lab bench` (3 FEs, 1,000 bindings, 2 s of churn) on a 1-member etcd
//! and on the embedded store: the JSON carries every field with sane values and the delivery
//! checks hold (every agent ends equal to the truth, nothing undelivered, no stream failure).
//! Speed is reported, never asserted. Plus the check that the agent-memory figure's formula
//! matches what the allocator really hands out.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::process::Command;

use serde_json::Value;

/// Counts the bytes allocated by the current thread while `COUNTING` is set on it.
struct CountingAlloc;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only thread-locals.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATED.with(|a| a.set(a.get() + layout.size()));
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.with(Cell::get) {
            ALLOCATED.with(|a| a.set(a.get().saturating_sub(layout.size())));
        }
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn bench(members: &str, extra: &[&str]) -> Value {
    // victor-lab looks for victor-controller next to itself; fail clearly if it is not built.
    let controller = victor_testkit::workspace_binary("victor-controller");
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_victor-lab"))
        .args(["bench", "--fes", "3", "--bindings", "1000", "--churn", "200", "--seconds", "2"])
        .args(["--etcd-members", members, "--floor-samples", "50", "--json"])
        .args(extra)
        .arg("--controller-bin")
        .arg(&controller)
        .arg("--output")
        .arg(&output)
        .output()
        .expect("run victor-lab");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "victor-lab bench failed:\n{stderr}");
    let json: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stderr}"));
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(json, written, "--output holds the printed object");
    json
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for part in path.split('.') {
        cur = cur.get(part).unwrap_or_else(|| panic!("missing field {path} in {v:#}"));
    }
    cur.as_f64().unwrap_or_else(|| panic!("{path} is not a number: {cur}"))
}

fn check(v: &Value, members: f64) {
    assert_eq!(num(v, "fes"), 3.0);
    assert_eq!(num(v, "bindings"), 1000.0);
    assert_eq!(num(v, "etcd_members"), members);
    let (p50, p99, max) = (num(v, "convergence_ms.p50"), num(v, "convergence_ms.p99"), num(v, "convergence_ms.max"));
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max && max < 60_000.0, "convergence {p50}/{p99}/{max}");
    let updates = num(v, "updates_per_s");
    assert!(updates > 0.0 && updates.is_finite(), "updates_per_s {updates}");
    assert!(num(v, "churn.committed") > 0.0);
    assert!(num(v, "churn.committed_per_s") >= updates * 0.5, "delivered rate cannot exceed twice the committed rate");
    for field in ["controller_cold_start_s", "agent_full_sync_s"] {
        let s = num(v, field);
        assert!(s > 0.0 && s < 120.0, "{field} = {s}");
    }
    assert!(num(v, "controller_bytes_per_binding").is_finite());
    // 1,000 entries of 40 bytes in a map that is at most 7/8 full (and at least 7/16).
    let agent = num(v, "agent_bytes_per_binding");
    assert!((41.0..=120.0).contains(&agent), "agent_bytes_per_binding {agent}");
    for field in ["etcd_floor.cas_txn_ms", "etcd_floor.watch_ms"] {
        let (p50, p99) = (num(v, &format!("{field}.p50")), num(v, &format!("{field}.p99")));
        assert!(0.0 < p50 && p50 <= p99, "{field} {p50}/{p99}");
    }
    assert!(num(v, "ratios.convergence_p50_over_watch_p50") > 0.0);
    assert!(num(v, "preload.claims_per_s") > 0.0);
    assert_eq!(num(v, "preload.reports"), 3.0, "1,000 bindings over 3 FEs fit in one Report each");
    // Correctness of what was delivered is asserted, unlike speed.
    assert_eq!(num(v, "delivery.agents_consistent"), 3.0, "{v:#}");
    assert_eq!(num(v, "delivery.agents_inconsistent"), 0.0);
    assert_eq!(num(v, "delivery.stream_failures"), 0.0);
    assert_eq!(num(v, "delivery.anomalies"), 0.0);
    assert_eq!(num(v, "churn.undelivered"), 0.0);
    assert!(num(v, "delivery.entries") >= 3.0 * 1000.0, "every FE received every binding");
    assert!(num(v, "memory.controller_rss_after_mib") > 0.0);
    assert!(num(v, "cpu_during_churn_s.wall") > 0.0);
    // The controller's cost: every figure present, the churn's per-unit costs positive; the idle
    // window saw stream heartbeats (each stream sends one a second when nothing changes).
    for field in ["us_per_message", "us_per_entry", "us_per_move", "churn_cores"] {
        let x = num(v, &format!("controller_cost.{field}"));
        assert!(x > 0.0 && x.is_finite(), "controller_cost.{field} = {x}");
    }
    assert!(num(v, "controller_cost.idle_stream_heartbeats") >= 3.0, "{:#}", v["controller_cost"]);
    assert!(num(v, "controller_cost.us_per_heartbeat").is_finite());
    assert!(num(v, "delivery.stream_drops") >= 0.0);
    assert!(v["delivery"]["drop_causes"].is_object());
    assert!(v["preload"]["retries"].is_object());
    // CPU time per component during the churn: every replica and this benchmark worked.
    let replicas = v["cpu_during_churn_s"]["controllers"].as_array().expect("controllers CPU list");
    assert_eq!(replicas.len() as f64, num(v, "replicas"));
    for cpu in replicas {
        let cpu = cpu.as_f64().unwrap();
        assert!(cpu > 0.0 && cpu < 600.0, "replica CPU {cpu} s");
    }
    assert!(num(v, "cpu_during_churn_s.bench") > 0.0, "{:#}", v["cpu_during_churn_s"]);
    let etcd = num(v, "cpu_during_churn_s.etcd");
    if members > 0.0 {
        assert!(etcd > 0.0, "etcd used no CPU during the churn: {:#}", v["cpu_during_churn_s"]);
    } else {
        assert_eq!(etcd, 0.0, "no etcd with the embedded store");
    }
    // etcd's share of the idle window (session leases renewed by the heartbeats).
    let idle_etcd = num(v, "controller_cost.idle_etcd_cpu_s");
    assert!(num(v, "controller_cost.etcd_us_per_session_heartbeat").is_finite(), "{:#}", v["controller_cost"]);
    assert!(if members > 0.0 { idle_etcd >= 0.0 } else { idle_etcd == 0.0 }, "{:#}", v["controller_cost"]);
    // Pinning is on by default with two CPUs, and the kernel's view of every process agrees.
    let pinning = &v["pinning"];
    assert!(!pinning["reason"].as_str().unwrap_or_default().is_empty(), "{pinning:#}");
    let pinned = pinning["pinned"].as_bool().expect("pinning.pinned");
    assert_eq!(pinned, num(v, "machine.cpus") >= 2.0, "{pinning:#}");
    if pinned {
        let cpus = pinning["controller_cpus"].as_array().expect("controller_cpus");
        assert_eq!(cpus.len(), 1, "replicas pinned to one CPU: {pinning:#}");
        let seen = pinning["seen"].as_object().expect("pinning.seen");
        assert_eq!(seen["bench-r1"], cpus[0].to_string(), "the replica's Cpus_allowed_list: {pinning:#}");
        // Each process's scheduler is sized for the CPUs it was pinned to, not for the host.
        let others = pinning["others_cpus"].as_array().expect("others_cpus").len();
        let sized = pinning["sized"].as_object().expect("pinning.sized");
        assert_eq!(sized["bench-r1"], "TOKIO_WORKER_THREADS=1", "{pinning:#}");
        assert_eq!(sized["bench"], format!("{others} tokio workers"), "{pinning:#}");
        let etcd: Vec<_> = sized.iter().filter(|(k, _)| k.starts_with("etcd-")).collect();
        assert_eq!(etcd.len() as f64, members, "{pinning:#}");
        for (name, value) in etcd {
            assert_eq!(value, &format!("GOMAXPROCS={others}"), "{name}: {pinning:#}");
        }
        assert!(!seen["bench"].as_str().unwrap().contains(&cpus[0].to_string()), "the benchmark kept off it");
    }
    // Session heartbeats were answered and timed.
    assert!(num(v, "delivery.heartbeats") > 0.0);
    let (rtt50, rtt_max) = (num(v, "delivery.heartbeat_rtt_ms.p50"), num(v, "delivery.heartbeat_rtt_ms.max"));
    assert!(0.0 < rtt50 && rtt50 <= rtt_max, "heartbeat round trips {rtt50}/{rtt_max} ms");
    let (late50, late_max) = (num(v, "delivery.heartbeat_late_ms.p50"), num(v, "delivery.heartbeat_late_ms.max"));
    assert!(0.0 <= late50 && late50 <= late_max, "heartbeat lateness {late50}/{late_max} ms");
    assert!(num(v, "machine.cpus") >= 1.0);
    assert!(v["machine"]["loadavg_end"][0].as_f64().is_some(), "load recorded at the end");
}

/// With `--real-agent` (root): a real fe-agent in a namespace syncs every binding; foreign
/// bindings go to the userspace forwarding table, not the kernel.
#[test]
fn bench_on_one_member_etcd_reports_every_field() {
    let v = bench("1", &["--real-agent"]);
    check(&v, 1.0);
    let s = num(&v, "real_agent.full_sync_s");
    assert!(s > 0.0 && s < 120.0, "real_agent.full_sync_s = {s}");
    assert_eq!(num(&v, "real_agent.bindings"), 1000.0);
    assert_eq!(num(&v, "real_agent.reconcile_ops.tunnel_remote"), 1000.0, "every foreign binding programmed once");
    let routes = num(&v, "real_agent.kernel_routes");
    assert!((1.0..100.0).contains(&routes), "{routes} kernel routes: foreign bindings leaked into the kernel");
    // One inert record per foreign binding and per FE (what a restarted agent or its standby
    // forwards with).
    let records = num(&v, "real_agent.record_routes");
    assert!((1000.0..1100.0).contains(&records), "{records} records for 1000 foreign bindings and a few FEs");
    let complete = num(&v, "real_agent.records_complete_s");
    assert!(complete >= s, "records complete at {complete} s, before the agent was ready at {s} s");
    let desired = num(&v, "real_agent.desired_state_bytes_per_binding");
    assert!(desired > 0.0 && desired < 400.0, "desired_state_bytes_per_binding {desired}");
}

#[test]
fn bench_on_the_embedded_store_reports_every_field() {
    let v = bench("0", &[]);
    check(&v, 0.0);
    assert_eq!(v["etcd_floor"]["store"], "embedded");
    assert_eq!(num(&v, "replicas"), 1.0);
}

/// `--repeats 2`: both runs in full, and the min / median / max of the key figures over them.
#[test]
fn repeated_runs_report_the_spread_of_the_key_figures() {
    let v = bench("0", &["--repeats", "2"]);
    assert_eq!(num(&v, "repeats"), 2.0);
    assert_eq!(num(&v, "completed"), 2.0, "{:#}", v["failed"]);
    assert_eq!(num(&v, "checks_failed"), 0.0);
    assert_eq!(v["failed"].as_array().map(Vec::len), Some(0));
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    for run in runs {
        check(run, 0.0);
    }
    for figure in ["convergence_ms.p99", "updates_per_s", "controller_cost.us_per_message", "cpu_during_churn_s.bench"]
    {
        let values: Vec<f64> = runs.iter().map(|r| num(r, figure)).collect();
        let s = &v["summary"][figure];
        let (min, median, max) = (num(s, "min"), num(s, "median"), num(s, "max"));
        assert!(min <= median && median <= max, "{figure}: {s}");
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1.0);
        assert!(
            close(min, values[0].min(values[1])) && close(max, values[0].max(values[1])),
            "{figure}: {s} of {values:?}"
        );
    }
}

#[test]
fn agent_map_size_formula_matches_the_allocator() {
    use victor_tests::bench::agent::{BindingMap, Rec};
    use victor_tests::bench::stats::hash_map_heap_bytes;
    for n in [1usize, 7, 100, 1000, 54_321] {
        COUNTING.with(|c| c.set(true));
        ALLOCATED.with(|a| a.set(0));
        let mut map = BindingMap::default();
        for i in 0..n as u32 {
            map.insert(i, Rec { revision: 1, move_seq: 0, fe: 0, mac: [0; 6] });
        }
        let counted = ALLOCATED.with(Cell::get);
        COUNTING.with(|c| c.set(false));
        let formula = hash_map_heap_bytes(map.capacity(), std::mem::size_of::<(u32, Rec)>());
        assert_eq!(counted, formula, "{n} entries, capacity {}", map.capacity());
    }
}

/// A simulated agent whose replica restarts (its stream and connection drop) reconnects, resumes
/// from its revision without a snapshot, counts the drop with its cause and ends equal to the
/// truth — as a real agent does, instead of failing the benchmark.
#[test]
fn a_simulated_agent_resumes_after_its_replica_restarts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use victor_testkit::controller::{ControllerCommand, ControllerStore};
    use victor_tests::bench::agent::{Causes, FeTable, Sessions, SimFe};
    use victor_tests::bench::{cluster::MOBILE_PREFIX, driver};

    async fn wait_for(progress: &victor_tests::bench::agent::Progress, revision: u64) {
        let started = std::time::Instant::now();
        while progress.revision.load(Ordering::Acquire) < revision {
            assert!(started.elapsed() < Duration::from_secs(60), "the agent never reached revision {revision}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let bin = victor_testkit::workspace_binary("victor-controller");
        let store = ControllerStore::Embedded(dir.path().join("store"));
        let command = ControllerCommand::new(&bin, "resume", MOBILE_PREFIX, store).log_filter("warn");
        let mut replica = command.start(Duration::from_secs(60)).await.unwrap();
        let sessions = Arc::new(Sessions::default());
        let ids = ["fe-00000", "fe-00001"];
        let mut fes = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            fes.push(SimFe::register(id.to_string(), i, replica.grpc(), sessions.clone()).await.unwrap());
        }
        let reporters: driver::Reporters = Arc::new(fes.iter().map(|f| (f.id.clone(), f.client.clone())).collect());
        let retries = Causes::default();
        let first = driver::preload(&reporters, 100, 1024, 2, &retries).await.unwrap();

        let drops = Arc::new(Causes::default());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let table = Arc::new(FeTable::new(ids));
        let recording = Arc::new(AtomicBool::new(false));
        let (progress, task) = fes[0].follow(table, recording, stop_rx, drops.clone()).await.unwrap();
        wait_for(&progress, first.revision).await;

        replica.stop(Duration::from_secs(10));
        replica = command.start(Duration::from_secs(60)).await.unwrap();
        // VMs 0..100 are unchanged, 100..200 are new: delivered on the resumed stream.
        let second = driver::preload(&reporters, 200, 1024, 2, &retries).await.unwrap();
        wait_for(&progress, second.revision).await;

        stop.send_replace(true);
        let state = task.await.unwrap();
        assert_eq!(state.error, None);
        assert_eq!(state.map.len(), 200, "the resumed stream delivered the bindings made after the restart");
        assert!(progress.drops.load(Ordering::Relaxed) >= 1, "the drop was counted");
        assert!(drops.total() >= 1 && !drops.counts().is_empty(), "with its cause: {:?}", drops.counts());
        assert_eq!(progress.snapshots.load(Ordering::Relaxed), 1, "resumed from its revision, no second snapshot");
        drop(replica);
    });
}
