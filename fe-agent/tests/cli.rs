//! The command line: every flag explained, configuration checked with a message that says what
//! to fix, and the kernel data plane refused (with the reason) where the kernel cannot do it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_victor-fe-agent"))
}

const BASE: &[&str] = &[
    "--controller",
    "http://127.0.0.1:1",
    "--fe-id",
    "fe1",
    "--underlay-addr",
    "198.51.100.1",
    "--vm-port",
    "vm0",
    "--mobile-prefix",
    "10.10.0.0/16",
];

#[test]
fn help_explains_every_flag() {
    let out = agent().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--controller ",
        "--controller-netns",
        "--fe-id",
        "--site",
        "--underlay-addr",
        "--underlay-dev",
        "--underlay-mtu",
        "--vm-port",
        "--mobile-prefix",
        "--gateway ",
        "--gateway-mac",
        "--dataplane",
        "--tun-name",
        "--http-listen",
        "--route-protocol",
        "--arp-probe-after",
        "--arp-probe-interval",
        "--arp-probe-count",
        "--arp-rate",
        "--arp-burst",
        "--connect-timeout",
        "--stream-timeout",
        "--headless-grace",
        "--log-format",
        "--check-config",
        "--config",
        "--move-hint-key-file",
        "--move-hint-port",
        "--move-hint-timeout",
        "--move-hint-max-age",
        "--move-hint-rate",
        "--migration-hold",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}:\n{help}");
    }
    assert!(help.contains("VICTOR_FE_ID"), "env variables are shown");
}

#[test]
fn check_config_prints_the_effective_configuration() {
    let out = agent().args(BASE).args(["--gateway", "10.10.0.1", "--check-config"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fe_id"], "fe1");
    assert_eq!(json["gateways"][0], "10.10.0.1");
    assert_eq!(json["dataplane"], "auto");
    assert_eq!(json["stream_timeout"], "1s 500ms");
}

#[test]
fn bad_configuration_exits_2_with_what_to_fix() {
    let out = agent().args(BASE).args(["--gateway", "192.0.2.1", "--check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gateway 192.0.2.1 is outside every --mobile-prefix"), "{err}");
    let out = agent().args(["--fe-id", "fe1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "missing required flags");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--controller"));
}

/// `--dataplane kernel` where the kernel's ipip module cannot be loaded: the agent refuses to
/// start and says why. Where it can, the kernel backend forwards a client's ping to a VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_dataplane() -> anyhow::Result<()> {
    let mut lab = Lab::build(2)?;
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    if let Some(why) = Plane::Kernel.unavailable() {
        lab.start_agent(1, &[ctl.url()], &["--dataplane", "kernel"])?;
        let status = lab.agents[0].guard.as_mut().unwrap().wait_exit(Duration::from_secs(10))?;
        assert!(!status.success());
        let log = lab.agent_log(1);
        assert!(
            log.contains("--dataplane kernel needs the kernel's ipip module, which cannot be loaded here"),
            "{log}"
        );
        println!(
            "SKIPPED kernel data-plane forwarding: the kernel's ipip module cannot be loaded here ({why}); \
             checked instead that --dataplane kernel refuses to start with that reason"
        );
        return Ok(());
    }
    for n in 1..=2 {
        lab.start_agent(n, &[ctl.url()], &["--dataplane", "kernel"])?;
    }
    for n in 1..=2 {
        lab.wait_ready(n, Duration::from_secs(20))?;
    }
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
    prober.wait_replies_from(0, 10, Duration::from_secs(5))?;
    Ok(())
}
