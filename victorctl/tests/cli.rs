//! The real `victorctl` binary against real controllers (in-process replicas on the embedded
//! store or on a real etcd): every subcommand with its JSON output parsed and checked, exit codes
//! and messages of refused calls, fail-over between controllers (calls and a watch that resumes
//! on another replica when its controller shuts down), TLS and bearer tokens.

use victor_testkit::pki;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tonic::transport::Channel;
use victor_controller::config::Config;
use victor_controller::server::Server;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::agent_service_client::AgentServiceClient;
use victor_proto::v1::*;

const PREFIX: &str = "10.10.0.0/16";

/// One run of the binary.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "victorctl failed: {self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs victorctl with `args` (and `env`), without any VICTOR_* variable from the test's env.
async fn ctl_env(args: &[impl AsRef<std::ffi::OsStr>], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_victorctl"));
    for (key, _) in std::env::vars() {
        if key.starts_with("VICTOR_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).envs(env.iter().copied()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("victorctl hung").unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ctl(controller: &str, args: &[&str]) -> Run {
    let mut all = vec!["--controller", controller];
    all.extend_from_slice(args);
    ctl_env(&all, &[]).await
}

async fn start(data: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> = ["victor-controller", "--mobile-prefix", PREFIX]
        .into_iter()
        .chain(["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .map(String::from)
        .collect();
    args.extend(["--data-dir".into(), data.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let server = Server::start(Config::load_from(args).expect("config")).await.expect("start");
    wait_ready(server.http_addr).await;
    server
}

async fn wait_ready(http: SocketAddr) {
    victor_testkit::process::wait_for("controller /readyz", Duration::from_secs(20), || async move {
        matches!(victor_testkit::http::get(http, "/readyz").await, Ok((200, _))).then_some(())
    })
    .await
    .expect("controller ready");
}

async fn agent(grpc: SocketAddr) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(Channel::from_shared(format!("http://{grpc}")).unwrap().connect().await.unwrap())
}

async fn register(a: &mut AgentServiceClient<Channel>, fe_id: &str, n: u8, site: &str) {
    a.register(RegisterRequest {
        fe_id: fe_id.into(),
        underlay_addr: format!("192.0.2.{n}"),
        site: site.into(),
        mobile_prefixes: vec![],
        agent_version: "test".into(),
    })
    .await
    .expect("register");
}

async fn learn(a: &mut AgentServiceClient<Channel>, fe_id: &str, ip: &str, mac_last: u8) -> ClaimResult {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let obs = VmObservation {
        vm_ip: victor_proto::types::ip_to_bytes(ip),
        mac: vec![2, 0, 0, 0, 0, mac_last],
        kind: ObservationKind::Learned as i32,
        observed_at_unix_nanos: unix_nanos(),
        port: "vm0".into(),
        known_revision: None,
    };
    a.report(ReportRequest { fe_id: fe_id.into(), observations: vec![obs] })
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0)
}

/// Waits until `http`'s controller serves `n` WatchBindings streams.
async fn wait_watchers(http: SocketAddr, n: u32) {
    let want = format!("victor_binding_watchers {n}");
    let want = want.as_str();
    victor_testkit::process::wait_for("binding watchers", Duration::from_secs(20), || async move {
        let metrics = victor_testkit::http::get(http, "/metrics").await.ok()?.1;
        metrics.lines().any(|l| l == want).then_some(())
    })
    .await
    .expect("victorctl watch did not start");
}

fn assert_refused(run: &Run, code: i32, needles: &[&str]) {
    assert_eq!(run.code, code, "{run:?}");
    for n in needles {
        assert!(run.stderr.contains(n), "stderr should mention {n:?}: {run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_against_a_real_controller() {
    let dir = tempfile::tempdir().unwrap();
    // The FEs registered below send no heartbeats: a long session keeps them "up" for the test.
    let server = start(dir.path(), &["--damping-max-moves", "1", "--session-ttl", "300s"]).await;
    let addr = server.grpc_addr.to_string();
    let c = addr.as_str();
    let mut a = agent(server.grpc_addr).await;
    register(&mut a, "fe1", 1, "site-a").await;
    register(&mut a, "fe2", 2, "site-b").await;
    assert_eq!(learn(&mut a, "fe1", "10.10.0.11", 11).await.outcome, ClaimOutcome::Bound as i32);

    // status
    let s = ctl(c, &["status", "-o", "json"]).await.json();
    assert_eq!(
        (s["store_kind"].as_str(), s["fe_count"].as_u64(), s["binding_count"].as_u64()),
        (Some("embedded"), Some(2), Some(1))
    );
    assert_eq!(s["mobile_prefixes"], serde_json::json!([PREFIX]));
    let text = ctl(c, &["status"]).await;
    assert!(text.stdout.contains("store:") && text.stdout.contains("embedded (reachable)"), "{text:?}");

    // fe list
    let fes = ctl(c, &["fe", "list", "-o", "json"]).await.json();
    let fes = fes.as_array().unwrap();
    assert_eq!(fes.len(), 2);
    assert_eq!(
        (fes[0]["fe_id"].as_str(), fes[0]["health"].as_str(), fes[0]["binding_count"].as_u64()),
        (Some("fe1"), Some("up"), Some(1))
    );
    assert_eq!((fes[1]["site"].as_str(), fes[1]["underlay_addr"].as_str()), (Some("site-b"), Some("192.0.2.2")));
    let table = ctl(c, &["fe", "list"]).await.stdout;
    assert!(table.starts_with("FE   SITE    UNDERLAY   HEALTH  BINDINGS  VERSION\n"), "{table}");
    assert!(table.contains("fe1  site-a  192.0.2.1  up      1         test"), "{table}");

    // binding get (found / not found / bad usage)
    let b = ctl(c, &["binding", "get", "10.10.0.11", "-o", "json"]).await.json();
    assert_eq!(
        (b["fe_id"].as_str(), b["source"].as_str(), b["move_seq"].as_u64()),
        (Some("fe1"), Some("arp"), Some(0))
    );
    assert_eq!(b["mac"].as_str(), Some("02:00:00:00:00:0b"));
    let missing = ctl(c, &["binding", "get", "10.10.0.99"]).await;
    assert_refused(&missing, 1, &["binding get 10.10.0.99", "NOT_FOUND", "VM 10.10.0.99 has no binding"]);
    let outside = ctl(c, &["binding", "get", "192.168.1.1"]).await;
    assert_refused(&outside, 1, &["INVALID_ARGUMENT", "mobile"]);
    assert_refused(&ctl(c, &["binding", "get", "not-an-ip"]).await, 2, &["invalid IP address"]);
    assert_refused(&ctl(c, &["binding", "frobnicate"]).await, 2, &["unrecognized subcommand"]);

    // vm declare / list
    let vm = ctl(
        c,
        &[
            "vm",
            "declare",
            "10.10.0.21",
            "--mac",
            "02:00:00:00:00:15",
            "--site",
            "site-b",
            "--description",
            "db-1",
            "-o",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(
        (vm["vm_ip"].as_str(), vm["mac"].as_str(), vm["description"].as_str()),
        (Some("10.10.0.21"), Some("02:00:00:00:00:15"), Some("db-1"))
    );
    assert_eq!(vm["allowed_sites"], serde_json::json!(["site-b"]));
    let vms = ctl(c, &["vm", "list", "-o", "json"]).await.json();
    assert_eq!(vms.as_array().unwrap().len(), 1);

    // migrate announce: policy refusal (site-a not allowed), then a committed move to fe2
    let refused = ctl(c, &["migrate", "announce", "10.10.0.21", "--to", "fe1", "--commit"]).await;
    assert_refused(&refused, 1, &["PERMISSION_DENIED", "site"]);
    let moved = ctl(c, &["migrate", "announce", "10.10.0.21", "--to", "fe2", "--commit", "-o", "json"]).await.json();
    assert_eq!((moved["fe_id"].as_str(), moved["source"].as_str()), (Some("fe2"), Some("orchestrator")));
    let unknown_fe = ctl(c, &["migrate", "announce", "10.10.0.21", "--to", "fe9"]).await;
    assert_refused(&unknown_fe, 1, &["NOT_FOUND", "fe9"]);

    // binding list with filters and limit
    let all = ctl(c, &["binding", "list", "-o", "json"]).await.json();
    let ips: Vec<&str> = all.as_array().unwrap().iter().map(|b| b["vm_ip"].as_str().unwrap()).collect();
    assert_eq!(ips, ["10.10.0.11", "10.10.0.21"]);
    let at_fe2 = ctl(c, &["binding", "list", "--fe", "fe2", "-o", "json"]).await.json();
    assert_eq!(at_fe2.as_array().unwrap().len(), 1);
    assert_eq!(ctl(c, &["binding", "list", "--limit", "1", "-o", "json"]).await.json().as_array().unwrap().len(), 1);
    let none = ctl(c, &["binding", "list", "--prefix", "10.10.9.0/24", "-o", "json"]).await.json();
    assert_eq!(none, serde_json::json!([]));

    // binding watch: snapshot (2 bindings) then the live move of 10.10.0.11 to fe2
    let watch = {
        let c = addr.clone();
        tokio::spawn(async move { ctl(&c, &["binding", "watch", "--snapshot", "--count", "3", "-o", "json"]).await })
    };
    wait_watchers(server.http_addr, 1).await;
    assert_eq!(learn(&mut a, "fe2", "10.10.0.11", 11).await.outcome, ClaimOutcome::Moved as i32);
    let run = tokio::time::timeout(Duration::from_secs(10), watch).await.expect("watch did not end").unwrap();
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let events: Vec<&Value> = lines.iter().filter(|l| l.get("kind").is_some()).collect();
    assert_eq!(events.len(), 3, "{lines:?}");
    assert!(lines.iter().any(|l| l["snapshot_done"] == true), "{lines:?}");
    let last = events[2];
    assert_eq!((last["kind"].as_str(), last["binding"]["vm_ip"].as_str()), (Some("upsert"), Some("10.10.0.11")));
    assert_eq!((last["binding"]["fe_id"].as_str(), last["binding"]["move_seq"].as_u64()), (Some("fe2"), Some(1)));

    // damping clear: a second move within the window freezes (max 1 move), the operator clears it
    assert_eq!(learn(&mut a, "fe1", "10.10.0.11", 11).await.outcome, ClaimOutcome::Moved as i32);
    // (Report does not wait for the cache; poll until this replica shows the frozen binding.)
    let mut frozen = Value::Null;
    for _ in 0..50 {
        frozen = ctl(c, &["binding", "get", "10.10.0.11", "-o", "json"]).await.json();
        if frozen["frozen"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(frozen["frozen"], true, "{frozen}");
    assert!(ctl(c, &["binding", "get", "10.10.0.11"]).await.stdout.contains("frozen"));
    let cleared = ctl(c, &["damping", "clear", "10.10.0.11", "-o", "json"]).await.json();
    assert_eq!(cleared["frozen"], false, "{cleared}");
    let again = ctl(c, &["damping", "clear", "10.10.0.11"]).await;
    assert_refused(&again, 1, &["FAILED_PRECONDITION"]);

    // vm undeclare with its binding
    let undeclared = ctl(c, &["vm", "undeclare", "10.10.0.21", "--remove-binding", "-o", "json"]).await.json();
    assert!(undeclared["revision"].as_u64().unwrap() > 0);
    assert_refused(&ctl(c, &["binding", "get", "10.10.0.21"]).await, 1, &["NOT_FOUND"]);
    assert_refused(&ctl(c, &["vm", "undeclare", "10.10.0.21"]).await, 1, &["NOT_FOUND"]);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_vms_and_prefix_filters_against_a_real_controller() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &["--mobile-prefix", "fd00:10::/64", "--session-ttl", "300s"]).await;
    let addr = server.grpc_addr.to_string();
    let c = addr.as_str();
    let mut a = agent(server.grpc_addr).await;
    register(&mut a, "fe1", 1, "site-a").await;
    register(&mut a, "fe2", 2, "site-b").await;
    for (ip, last) in [("10.10.0.11", 11), ("fd00:10::11", 0x11), ("fd00:10::1:12", 0x12)] {
        assert_eq!(learn(&mut a, "fe1", ip, last).await.outcome, ClaimOutcome::Bound as i32, "{ip}");
    }
    let s = ctl(c, &["status", "-o", "json"]).await.json();
    assert_eq!(s["mobile_prefixes"], serde_json::json!([PREFIX, "fd00:10::/64"]));

    // binding get, in any spelling of the address; outside the prefixes and malformed
    let b = ctl(c, &["binding", "get", "FD00:10:0:0:0:0:0:11", "-o", "json"]).await.json();
    assert_eq!(
        (b["vm_ip"].as_str(), b["fe_id"].as_str(), b["mac"].as_str()),
        (Some("fd00:10::11"), Some("fe1"), Some("02:00:00:00:00:11"))
    );
    let table = ctl(c, &["binding", "get", "fd00:10::11"]).await.stdout;
    assert!(table.contains("fd00:10::11  fe1  site-a  02:00:00:00:00:11"), "{table}");
    assert_refused(&ctl(c, &["binding", "get", "fd00:10::99"]).await, 1, &["NOT_FOUND", "fd00:10::99"]);
    assert_refused(&ctl(c, &["binding", "get", "2001:db8::1"]).await, 1, &["INVALID_ARGUMENT", "mobile"]);
    assert_refused(&ctl(c, &["binding", "get", "fd00:10:::1"]).await, 2, &["invalid IP address"]);

    // binding list: IP order (IPv4 first), IPv6 prefix filters, a bad IPv6 prefix
    let ips = |v: Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|b| b["vm_ip"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(
        ips(ctl(c, &["binding", "list", "-o", "json"]).await.json()),
        ["10.10.0.11", "fd00:10::11", "fd00:10::1:12"]
    );
    let list = |prefix: &'static str| {
        let c = addr.clone();
        async move { ips(ctl(&c, &["binding", "list", "--prefix", prefix, "-o", "json"]).await.json()) }
    };
    assert_eq!(list("fd00:10::/64").await, ["fd00:10::11", "fd00:10::1:12"]);
    assert_eq!(list("fd00:10::/112").await, ["fd00:10::11"]);
    assert_eq!(list("fd00:10::1:0/112").await, ["fd00:10::1:12"]);
    assert_eq!(list("fd00:10::11/128").await, ["fd00:10::11"]);
    assert_eq!(list("10.10.0.0/16").await, ["10.10.0.11"]);
    assert!(list("fd00:20::/64").await.is_empty());
    let bad = ctl(c, &["binding", "list", "--prefix", "fd00:10::/129"]).await;
    assert_refused(&bad, 2, &["longer than 128", "IPv6"]);
    let table = ctl(c, &["binding", "list", "--prefix", "fd00:10::/64"]).await.stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("VM_IP          FE   SITE"), "{table}");
    assert!(lines[2].starts_with("fd00:10::1:12  fe1  site-a"), "{table}");

    // vm declare / get / list by prefix, then a committed migration of the declared IPv6 VM
    let declared =
        ctl(c, &["vm", "declare", "fd00:10::21", "--mac", "02:00:00:00:00:21", "--site", "site-b", "-o", "json"])
            .await
            .json();
    assert_eq!(
        (declared["vm_ip"].as_str(), declared["mac"].as_str()),
        (Some("fd00:10::21"), Some("02:00:00:00:00:21"))
    );
    let got = ctl(c, &["vm", "get", "fd00:10::21", "-o", "json"]).await.json();
    assert_eq!(got["allowed_sites"], serde_json::json!(["site-b"]));
    let vms = ctl(c, &["vm", "list", "--prefix", "fd00:10::/64", "-o", "json"]).await.json();
    assert_eq!(ips(vms), ["fd00:10::21"]);
    assert!(
        ctl(c, &["vm", "list", "--prefix", "10.10.0.0/16", "-o", "json"]).await.json().as_array().unwrap().is_empty()
    );
    let refused = ctl(c, &["migrate", "announce", "fd00:10::21", "--to", "fe1", "--commit"]).await;
    assert_refused(&refused, 1, &["PERMISSION_DENIED", "site"]);

    // binding watch of an IPv6 prefix: its snapshot, then the committed move of fd00:10::21 (the
    // IPv4 binding and the IPv6 one outside the prefix never show)
    let watch = {
        let c = addr.clone();
        tokio::spawn(async move {
            ctl(&c, &["binding", "watch", "--prefix", "fd00:10::/112", "--snapshot", "--count", "2", "-o", "json"])
                .await
        })
    };
    wait_watchers(server.http_addr, 1).await;
    assert_eq!(learn(&mut a, "fe2", "10.10.0.11", 11).await.outcome, ClaimOutcome::Moved as i32);
    assert_eq!(learn(&mut a, "fe2", "fd00:10::1:12", 0x12).await.outcome, ClaimOutcome::Moved as i32);
    let moved = ctl(c, &["migrate", "announce", "fd00:10::21", "--to", "fe2", "--commit", "-o", "json"]).await.json();
    assert_eq!((moved["fe_id"].as_str(), moved["source"].as_str()), (Some("fe2"), Some("orchestrator")));
    let run = tokio::time::timeout(Duration::from_secs(10), watch).await.expect("watch did not end").unwrap();
    assert_eq!(run.code, 0, "{run:?}");
    let events: Vec<Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|l| l.get("kind").is_some())
        .collect();
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["binding"]["vm_ip"].as_str().unwrap(), e["binding"]["fe_id"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [("fd00:10::11", "fe1"), ("fd00:10::21", "fe2")], "{run:?}");

    // The table of a watch that can show IPv6 VMs has room for their addresses (even the longest).
    let long = "fd00:10::abcd:ef01:2345:6789";
    assert_eq!(learn(&mut a, "fe1", long, 0x31).await.outcome, ClaimOutcome::Bound as i32);
    let watch = {
        let c = addr.clone();
        tokio::spawn(async move { ctl(&c, &["binding", "watch", "--snapshot", "--count", "5"]).await })
    };
    let run = tokio::time::timeout(Duration::from_secs(10), watch).await.expect("watch did not end").unwrap();
    let lines: Vec<&str> = run.stdout.lines().collect();
    let fe_column = lines[0].find("FE").unwrap();
    let rows: Vec<&&str> = lines.iter().filter(|l| l.contains("upsert")).collect();
    assert_eq!(rows.len(), 5, "{}", run.stdout);
    assert!(rows.iter().any(|l| l.contains(long)), "{}", run.stdout);
    for line in rows {
        assert_eq!(line.find(" fe").map(|i| i + 1), Some(fe_column), "{}", run.stdout);
    }

    // migrate announce (not committed) and cancel; damping clear of an unfrozen IPv6 binding
    let announced = ctl(c, &["migrate", "announce", "fd00:10::11", "--to", "fe2", "-o", "json"]).await.json();
    assert_eq!(announced["pending_fe_id"].as_str(), Some("fe2"), "{announced}");
    let b = ctl(c, &["binding", "get", "fd00:10::11"]).await.stdout;
    assert!(b.contains("migrating->fe2"), "{b}");
    let cancelled = ctl(c, &["migrate", "cancel", "fd00:10::11", "-o", "json"]).await;
    assert_eq!(cancelled.code, 0, "{cancelled:?}");
    assert_refused(&ctl(c, &["migrate", "cancel", "fd00:10::11"]).await, 1, &["NOT_FOUND"]);
    assert_refused(&ctl(c, &["damping", "clear", "fd00:10::11"]).await, 1, &["FAILED_PRECONDITION"]);
    let undeclared = ctl(c, &["vm", "undeclare", "fd00:10::21", "--remove-binding", "-o", "json"]).await.json();
    assert_eq!(undeclared["vm_ip"].as_str(), Some("fd00:10::21"));
    assert_refused(&ctl(c, &["binding", "get", "fd00:10::21"]).await, 1, &["NOT_FOUND"]);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_between_controllers() {
    // A port nobody listens on (bound, then released).
    let dead = victor_testkit::ports::free_addr().to_string();
    let dead2 = victor_testkit::ports::free_addr().to_string();
    let cluster = victor_testkit::etcd::EtcdCluster::start(1).await.unwrap();
    let etcd = cluster.endpoints().join(",");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r1 = start(d1.path(), &["--etcd-endpoints", &etcd, "--replica-id", "r1"]).await;
    let r2 = start(d2.path(), &["--etcd-endpoints", &etcd, "--replica-id", "r2"]).await;
    let mut a = agent(r1.grpc_addr).await;
    register(&mut a, "fe1", 1, "site-a").await;
    register(&mut a, "fe2", 2, "site-b").await;

    // A dead address first: the call goes on to the live controller.
    let list = format!("{dead},{}", r1.grpc_addr);
    let s = ctl(&list, &["status", "-o", "json"]).await.json();
    assert_eq!(s["replica_id"].as_str(), Some("r1"));
    // Nothing answers: exit 1 naming every address tried.
    let none = ctl(&format!("{dead},{dead2}"), &["status"]).await;
    assert_refused(&none, 1, &["no controller answered", &dead, &dead2]);

    // A watch on r1 resumes on r2 when r1 shuts down, without losing the change made meanwhile.
    let list = format!("{},{}", r1.grpc_addr, r2.grpc_addr);
    let watch = tokio::spawn(async move { ctl(&list, &["binding", "watch", "--count", "2", "-o", "json"]).await });
    wait_watchers(r1.http_addr, 1).await;
    assert_eq!(learn(&mut a, "fe1", "10.10.0.11", 11).await.outcome, ClaimOutcome::Bound as i32);
    tokio::time::sleep(Duration::from_millis(300)).await;
    r1.shutdown().await.unwrap();
    let mut a2 = agent(r2.grpc_addr).await;
    assert_eq!(learn(&mut a2, "fe2", "10.10.0.11", 11).await.outcome, ClaimOutcome::Moved as i32);
    let run = tokio::time::timeout(Duration::from_secs(15), watch).await.expect("watch did not resume").unwrap();
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("resuming after revision"), "{run:?}");
    let events: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let fes: Vec<&str> = events.iter().map(|e| e["binding"]["fe_id"].as_str().unwrap()).collect();
    assert_eq!(fes, ["fe1", "fe2"], "{events:?}");
    r2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_bearer_tokens() {
    let pki = pki::Pki::new("victorctl-test");
    let server_cert = pki.server("controller");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ro-1111 read-only\nrw-2222 read-write\n").unwrap();
    let rw_file = dir.path().join("rw-token");
    std::fs::write(&rw_file, "rw-2222\n").unwrap();
    let (cert, key, ca) = (
        server_cert.cert.path.display().to_string(),
        server_cert.key.path.display().to_string(),
        pki.ca.path.display().to_string(),
    );
    let toks = tokens.display().to_string();
    let server = start(
        &dir.path().join("data"),
        &["--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-client-ca-file", &ca, "--auth-tokens-file", &toks],
    )
    .await;
    let c = server.grpc_addr.to_string();
    let base = ["--controller", c.as_str(), "--ca-file", ca.as_str()];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };

    let ro = [("VICTOR_TOKEN", "ro-1111")];
    let s = ctl_env(&with(&["status", "-o", "json"]), &ro).await.json();
    assert_eq!(s["binding_count"].as_u64(), Some(0));
    let declare = ["vm", "declare", "10.10.0.21", "--mac", "02:00:00:00:00:15"];
    assert_refused(&ctl_env(&with(&declare), &ro).await, 1, &["PERMISSION_DENIED", "read-only"]);
    // The new writes need read-write too; GetVm is a read.
    assert_refused(&ctl_env(&with(&["fe", "remove", "fe1"]), &ro).await, 1, &["PERMISSION_DENIED", "read-only"]);
    let cancel = ["migrate", "cancel", "10.10.0.21"];
    assert_refused(&ctl_env(&with(&cancel), &ro).await, 1, &["PERMISSION_DENIED", "read-only"]);
    assert_refused(&ctl_env(&with(&["vm", "get", "10.10.0.21"]), &ro).await, 1, &["NOT_FOUND", "not declared"]);
    assert_refused(&ctl_env(&with(&["status"]), &[]).await, 1, &["UNAUTHENTICATED", "--token"]);
    assert_refused(
        &ctl_env(&with(&["status", "--token", "nope"]), &[]).await,
        1,
        &["UNAUTHENTICATED", "unknown bearer token"],
    );
    let rw_path = rw_file.display().to_string();
    let mut args = with(&declare);
    args.extend(["--token-file".into(), rw_path, "-o".into(), "json".into()]);
    // The file's read-write token wins over the read-only one in the environment.
    assert_eq!(ctl_env(&args, &ro).await.json()["vm_ip"].as_str(), Some("10.10.0.21"));

    // Local mistakes are usage errors (exit 2) that name the file or option.
    let missing = ctl_env(&["--controller", c.as_str(), "--ca-file", "/nonexistent/ca.pem", "status"], &[]).await;
    assert_refused(&missing, 2, &["cannot read CA file", "/nonexistent/ca.pem"]);
    let key_only = ctl_env(&with(&["--key-file", key.as_str(), "status"]), &ro).await;
    assert_refused(&key_only, 2, &["--cert-file"]);
    // Plaintext against a TLS controller fails with exit 1 and says why.
    let plain = ctl_env(&["--controller", c.as_str(), "status"], &ro).await;
    assert_eq!(plain.code, 1, "{plain:?}");

    // With --tls-client-ca-file a client certificate is optional at the TLS layer (every call
    // above came without one), and the agent API insists on one: as the flag's help says.
    let tls =
        victor_proto::tls::ClientTlsFiles { ca_file: Some(pki.ca.path.clone()), ..Default::default() }.load().unwrap();
    let channel =
        victor_proto::tls::endpoint(&c, tls.as_ref(), Duration::from_secs(5)).unwrap().connect().await.unwrap();
    let refused =
        AgentServiceClient::new(channel).heartbeat(HeartbeatRequest { fe_id: "fe1".into() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let help = <Config as clap::CommandFactory>::command().render_long_help().to_string();
    let flag_help = help.split("--tls-client-ca-file").nth(1).unwrap().split("\n      --").next().unwrap();
    let flag_help = flag_help.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in ["optional at the TLS layer", "AgentService call", "<fe_id>.fe.victor"] {
        assert!(flag_help.contains(needle), "--tls-client-ca-file help should say {needle:?}: {flag_help}");
    }
    assert!(!flag_help.contains("must present a certificate"), "{flag_help}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_say_what_to_fix_and_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&dir.path().join("data"), &[]).await;
    let c = server.grpc_addr.to_string();

    // The HTTP admin port given as a controller address (HTTP/1.1 only: the gRPC call fails at
    // the transport, and victorctl finds out what answers there).
    let http = server.http_addr.to_string();
    let run = ctl(&http, &["status"]).await;
    assert_refused(
        &run,
        1,
        &[&http, "answers HTTP but not gRPC", "probably an HTTP admin port", "port 50051 by default"],
    );
    // A port where nothing speaks HTTP is not called one.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let closer = tokio::spawn(async move {
        loop {
            let (tcp, _) = silent.accept().await.unwrap();
            drop(tcp);
        }
    });
    let run = ctl(&silent_addr, &["status"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(!run.stderr.contains("HTTP admin port"), "{run:?}");
    closer.abort();

    // A prefix length out of range is named as such, for lists and watches, IPv4 and IPv6.
    let run = ctl(&c, &["binding", "list", "--prefix", "10.10.230.0/33"]).await;
    assert_refused(&run, 2, &["has prefix length 33, longer than 32 (the most an IPv4 prefix has)"]);
    assert!(!run.stderr.contains("invalid IP address syntax"), "{run:?}");
    let run = ctl(&c, &["binding", "watch", "--prefix", "fd00:10::/129"]).await;
    assert_refused(&run, 2, &["longer than 128 (the most an IPv6 prefix has)"]);
    let run = ctl(&c, &["binding", "list", "--prefix", "10.10.300.0/24"]).await;
    assert_refused(&run, 2, &["the part before '/' is not an IP address"]);

    // --limit 0 would print a bare header: refused.
    let run = ctl(&c, &["binding", "list", "--limit", "0"]).await;
    assert_refused(&run, 2, &["--limit", "at least 1"]);
    assert!(run.stdout.is_empty(), "{run:?}");

    // A reader that went away (`victorctl vm list | head -0`): status 0 and nothing on stderr.
    let declare = ["vm", "declare", "10.10.0.21", "--mac", "02:00:00:00:00:15"];
    assert_eq!(ctl(&c, &declare).await.code, 0);
    for args in [&["vm", "list"][..], &["-o", "json", "vm", "list"], &["binding", "watch", "--snapshot"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_victorctl"))
            .args(["--controller", c.as_str()])
            .args(args)
            .env_remove("VICTOR_OUTPUT")
            .stdout(writer)
            .stderr(stderr.reopen().unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("victorctl {args:?} did not end on a closed pipe"))
            .unwrap();
        let stderr = std::fs::read_to_string(stderr.path()).unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} should end quietly: {stderr}");
    }
    server.shutdown().await.unwrap();
}

/// Polls `fe list` until `fe` shows `health`.
async fn wait_health(c: &str, fe: &str, health: &str) {
    victor_testkit::process::wait_for("FE health", Duration::from_secs(30), || async move {
        let fes = ctl(c, &["fe", "list", "-o", "json"]).await.json();
        fes.as_array()?.iter().any(|f| f["fe_id"] == fe && f["health"] == health).then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("{fe} did not become {health}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_subcommands_and_filters() {
    let dir = tempfile::tempdir().unwrap();
    // Short sessions: FEs without heartbeats go down within seconds (fe3 is kept up).
    let server = start(dir.path(), &["--damping-max-moves", "1", "--session-ttl", "2s"]).await;
    let addr = server.grpc_addr.to_string();
    let c = addr.as_str();
    let mut a = agent(server.grpc_addr).await;
    register(&mut a, "fe1", 1, "site-a").await;
    register(&mut a, "fe2", 2, "site-b").await;
    register(&mut a, "fe3", 3, "site-c").await;
    let heartbeats = {
        let mut a = a.clone();
        tokio::spawn(async move {
            loop {
                let _ = a.heartbeat(HeartbeatRequest { fe_id: "fe3".into() }).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    assert_eq!(learn(&mut a, "fe1", "10.10.0.11", 11).await.outcome, ClaimOutcome::Bound as i32);
    assert_eq!(learn(&mut a, "fe1", "10.10.1.5", 5).await.outcome, ClaimOutcome::Bound as i32);

    // vm get / vm list --prefix
    for (ip, mac) in [("10.10.0.21", "02:00:00:00:00:15"), ("10.10.1.21", "02:00:00:00:01:15")] {
        assert_eq!(ctl(c, &["vm", "declare", ip, "--mac", mac]).await.code, 0);
    }
    let vm = ctl(c, &["vm", "get", "10.10.0.21", "-o", "json"]).await.json();
    assert_eq!((vm["vm_ip"].as_str(), vm["mac"].as_str()), (Some("10.10.0.21"), Some("02:00:00:00:00:15")));
    assert!(ctl(c, &["vm", "get", "10.10.0.21"]).await.stdout.starts_with("VM_IP"));
    assert_refused(&ctl(c, &["vm", "get", "10.10.0.11"]).await, 1, &["vm get 10.10.0.11", "NOT_FOUND", "not declared"]);
    let listed = ctl(c, &["vm", "list", "--prefix", "10.10.1.0/24", "-o", "json"]).await.json();
    assert_eq!(
        listed.as_array().unwrap().iter().map(|v| v["vm_ip"].as_str().unwrap()).collect::<Vec<_>>(),
        ["10.10.1.21"]
    );
    assert_refused(
        &ctl(c, &["vm", "list", "--prefix", "10.10.230.0/33"]).await,
        2,
        &["10.10.230.0/33", "has prefix length 33, longer than 32"],
    );

    // binding list --frozen / --not-frozen / --source
    assert_eq!(learn(&mut a, "fe2", "10.10.0.11", 11).await.outcome, ClaimOutcome::Moved as i32);
    assert_eq!(learn(&mut a, "fe1", "10.10.0.11", 11).await.outcome, ClaimOutcome::Moved as i32);
    assert_eq!(ctl(c, &["migrate", "announce", "10.10.0.21", "--to", "fe2", "--commit"]).await.code, 0);
    let ips =
        |v: Value| v.as_array().unwrap().iter().map(|b| b["vm_ip"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let frozen = ctl(c, &["binding", "list", "--frozen", "-o", "json"]).await.json();
    assert_eq!((frozen[0]["vm_ip"].as_str(), frozen[0]["previous_fe_id"].as_str()), (Some("10.10.0.11"), Some("fe2")));
    assert_eq!(ips(frozen), ["10.10.0.11"]);
    assert_eq!(
        ips(ctl(c, &["binding", "list", "--not-frozen", "-o", "json"]).await.json()),
        ["10.10.0.21", "10.10.1.5"]
    );
    let placed = ctl(c, &["binding", "list", "--source", "orchestrator", "-o", "json"]).await.json();
    assert_eq!(ips(placed), ["10.10.0.21"]);
    let arp_at_fe1 = ctl(c, &["binding", "list", "--source", "arp", "--fe", "fe1", "--limit", "1", "-o", "json"]).await;
    assert_eq!(ips(arp_at_fe1.json()), ["10.10.0.11"]);
    assert_refused(&ctl(c, &["binding", "list", "--frozen", "--not-frozen"]).await, 2, &["cannot be used with"]);

    // migrate cancel
    assert_eq!(ctl(c, &["migrate", "announce", "10.10.1.5", "--to", "fe2"]).await.code, 0);
    let other = ctl(c, &["migrate", "cancel", "10.10.1.5", "--to", "fe3"]).await;
    assert_refused(&other, 1, &["migrate cancel 10.10.1.5", "FAILED_PRECONDITION", "to FE fe2, not fe3"]);
    let cancelled = ctl(c, &["migrate", "cancel", "10.10.1.5", "-o", "json"]).await.json();
    assert_eq!(cancelled["cancelled_fe_id"].as_str(), Some("fe2"));
    assert_eq!(cancelled["binding"]["pending_fe_id"].as_str(), Some(""));
    let again = ctl(c, &["migrate", "cancel", "10.10.1.5"]).await;
    assert_refused(&again, 1, &["NOT_FOUND", "no pending migration announcement"]);

    // binding watch --fe: fe1's snapshot, a change at fe2 (not shown), then 10.10.1.5 leaving fe1
    let watch = {
        let c = addr.clone();
        tokio::spawn(async move {
            ctl(&c, &["binding", "watch", "--fe", "fe1", "--snapshot", "--count", "3", "-o", "json"]).await
        })
    };
    wait_watchers(server.http_addr, 1).await;
    assert_eq!(ctl(c, &["migrate", "announce", "10.10.0.21", "--to", "fe1"]).await.code, 0);
    assert_eq!(ctl(c, &["migrate", "announce", "10.10.1.5", "--to", "fe2", "--commit"]).await.code, 0);
    let run = tokio::time::timeout(Duration::from_secs(10), watch).await.expect("watch did not end").unwrap();
    let events: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect();
    let seen: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.get("kind").is_some())
        .map(|e| (e["binding"]["vm_ip"].as_str().unwrap().into(), e["binding"]["fe_id"].as_str().unwrap().into()))
        .collect();
    let want = [("10.10.0.11", "fe1"), ("10.10.1.5", "fe1"), ("10.10.1.5", "fe2")];
    assert_eq!(seen, want.map(|(ip, fe)| (ip.to_owned(), fe.to_owned())), "{run:?}");

    // fe remove: unknown, live, with bindings (refused, then forced), gone from the list
    assert_refused(&ctl(c, &["fe", "remove", "fe9"]).await, 1, &["fe remove fe9", "NOT_FOUND", "not registered"]);
    assert_refused(&ctl(c, &["fe", "remove", "fe3", "--force"]).await, 1, &["FAILED_PRECONDITION", "live session"]);
    wait_health(c, "fe2", "down").await;
    let held = ctl(c, &["fe", "remove", "fe2"]).await;
    assert_refused(&held, 1, &["FAILED_PRECONDITION", "FE fe2 still holds 2 binding(s)", "force"]);
    let removed = ctl(c, &["fe", "remove", "fe2", "--force", "-o", "json"]).await.json();
    assert_eq!(removed["removed_bindings"].as_u64(), Some(2), "{removed}");
    let text = ctl(c, &["fe", "list"]).await.stdout;
    assert!(!text.contains("fe2"), "{text}");
    assert_refused(&ctl(c, &["binding", "get", "10.10.1.5"]).await, 1, &["NOT_FOUND"]);
    heartbeats.abort();
    server.shutdown().await.unwrap();
}
