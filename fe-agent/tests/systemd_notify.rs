//! The `victor-fe-agent` binary speaking systemd's service protocol (`Type=notify` with a
//! watchdog, `packaging/systemd/victor-fe-agent.service`) to a socket of the test standing in for
//! systemd: while no controller answers it says why it is not ready (`STATUS=starting: ...`) and
//! sends no `READY=1`; once a controller's state is applied (synced), `READY=1` (and `/readyz`
//! is 200 then); `WATCHDOG=1` pings while the engine runs; `STOPPING=1` on SIGTERM. The same
//! under a real systemd runs in the VM guest (`packaging/tests/vm-guest.sh`).

mod common;

use std::time::Duration;

use common::*;
use tokio::net::UnixDatagram;

/// Receives notifications until one has a line for which `want` holds; returns that line.
async fn until_line(socket: &UnixDatagram, seen: &mut Vec<String>, want: impl Fn(&str) -> bool) -> String {
    let mut buf = vec![0u8; 4096];
    let wait = async {
        loop {
            let n = socket.recv(&mut buf).await.unwrap();
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(message.clone());
            if let Some(line) = message.lines().find(|l| want(l)) {
                return line.to_owned();
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), wait).await {
        Ok(line) => line,
        Err(_) => panic!("no such notification; the agent sent {seen:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_when_synced_watchdog_pings_and_stopping_on_sigterm() -> anyhow::Result<()> {
    let lab = Lab::build(2)?;
    // The controller's ports are fixed at its first start; it is down when the agent starts.
    let mut ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    ctl.stop().await?;

    let socket_path = lab.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)?;
    let env = [format!("NOTIFY_SOCKET={}", socket_path.display()), "WATCHDOG_USEC=2000000".to_owned()];
    let mut argv: Vec<String> = ["env".to_owned()].into_iter().chain(env).collect();
    argv.extend(lab.agent_argv(1, &[ctl.url()], &[]));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let log = lab.dir.path().join("agent1.log");
    let mut agent = lab.fe(1).spawn("agent1", &argv, Some(&log))?;

    let mut seen = Vec::new();
    let status = until_line(&socket, &mut seen, |l| l.starts_with("STATUS=starting:")).await;
    assert!(status.contains("waiting for a complete desired state"), "{status}");
    until_line(&socket, &mut seen, |l| l == "WATCHDOG=1").await;
    assert!(!seen.iter().any(|m| m.contains("READY=1")), "READY=1 without a controller: {seen:?}");

    ctl.restart().await?;
    until_line(&socket, &mut seen, |l| l == "READY=1").await;
    let (code, body) = lab.agent_get(1, "/readyz")?;
    assert_eq!(code, 200, "READY=1 was sent while /readyz says {code} {body}");
    let mut after = Vec::new();
    until_line(&socket, &mut after, |l| l == "WATCHDOG=1").await;

    let exit = agent.stop(Duration::from_secs(10));
    assert!(exit.is_some_and(|s| s.success()), "agent exit {exit:?}:\n{}", std::fs::read_to_string(&log)?);
    until_line(&socket, &mut after, |l| l == "STOPPING=1").await;
    assert!(!after.iter().any(|m| m.contains("READY=1")), "READY=1 sent twice: {after:?}");
    ctl.stop().await?;
    Ok(())
}
