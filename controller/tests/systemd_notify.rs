//! The `victor-controller` binary speaking systemd's service protocol (`Type=notify` with a
//! watchdog, `packaging/systemd/victor-controller.service`) to a socket of the test standing in
//! for systemd: `READY=1` once `/readyz` answers 200 (not before), `WATCHDOG=1` pings while it
//! is healthy, `STOPPING=1` on SIGTERM. The same under a real systemd runs in the VM guest
//! (`packaging/tests/vm-guest.sh`).

use std::time::Duration;

use tokio::net::UnixDatagram;
use victor_testkit::controller::{ControllerCommand, ControllerStore};

/// Receives notifications until one has the line `line`; returns every message seen.
async fn until_line(socket: &UnixDatagram, line: &str, seen: &mut Vec<String>) {
    let mut buf = vec![0u8; 4096];
    let wait = async {
        loop {
            let n = socket.recv(&mut buf).await.unwrap();
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let found = message.lines().any(|l| l == line);
            seen.push(message);
            if found {
                return;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), wait).await.is_err() {
        panic!("no {line:?} from the controller; it sent {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_when_readyz_says_so_watchdog_pings_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut controller = ControllerCommand::new(
        env!("CARGO_BIN_EXE_victor-controller"),
        "sd",
        "10.10.0.0/16",
        ControllerStore::Embedded(dir.path().join("data")),
    )
    .env("NOTIFY_SOCKET", &socket_path)
    .env("WATCHDOG_USEC", "2000000")
    .log_file(dir.path().join("controller.log"))
    .spawn()
    .unwrap();

    let mut seen = Vec::new();
    until_line(&socket, "READY=1", &mut seen).await;
    let (status, body) = controller.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "READY=1 was sent while /readyz says {status} {body}; messages {seen:?}");
    assert_eq!(seen.iter().filter(|m| m.lines().any(|l| l == "READY=1")).count(), 1, "{seen:?}");

    // The watchdog (WATCHDOG_USEC = 2 s) is pinged at half the interval while /healthz answers.
    let mut pings = Vec::new();
    until_line(&socket, "WATCHDOG=1", &mut pings).await;
    until_line(&socket, "WATCHDOG=1", &mut pings).await;
    assert!(controller.is_running(), "{}", controller.log_tail(2000));

    controller.stop(Duration::from_secs(10));
    let mut rest = Vec::new();
    until_line(&socket, "STOPPING=1", &mut rest).await;
    assert!(!rest.iter().any(|m| m.contains("READY=1")), "READY=1 sent twice: {rest:?}");
}
