//! A replica stops on SIGTERM whatever state its store is in: with etcd gone (the watch
//! retrying), `systemctl stop` must not wait for `TimeoutStopSec` and a SIGKILL.

use std::time::Duration;

use victor_testkit::controller::{ControllerCommand, ControllerStore};
use victor_testkit::etcd::EtcdCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_replica_whose_etcd_is_gone() {
    let mut etcd = EtcdCluster::start(1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("controller.log");
    let mut controller = ControllerCommand::new(
        env!("CARGO_BIN_EXE_victor-controller"),
        "stop",
        "10.10.0.0/16",
        ControllerStore::Etcd(etcd.endpoints()),
    )
    .log_file(&log)
    .start(Duration::from_secs(30))
    .await
    .unwrap();

    etcd.kill_member(0);
    // The replica notices: its watch breaks and is retried.
    victor_testkit::process::wait_for("the watch retrying", Duration::from_secs(30), || {
        let log = log.clone();
        async move { std::fs::read_to_string(log).ok()?.contains("watch failed; retrying").then_some(()) }
    })
    .await
    .unwrap();

    let status = controller.stop(Duration::from_secs(30));
    let tail = std::fs::read_to_string(&log).unwrap_or_default();
    let tail = &tail[tail.len().saturating_sub(3000)..];
    let status = status.unwrap_or_else(|| panic!("the replica did not exit on SIGTERM with etcd gone:\n{tail}"));
    assert!(status.success(), "exit status {status}:\n{tail}");
}
