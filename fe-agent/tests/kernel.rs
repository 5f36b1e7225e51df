//! What only the kernel data plane does (the suites that hold for both data planes run each on
//! both: move, restart, guards, hints, bgp):
//!
//! * `--dataplane auto` loads the kernel's ipip and sit modules itself — with `modprobe`, or,
//!   where the agent sees no `modprobe` (a container), by asking the kernel for a link of that
//!   kind, which makes the kernel load it — and says which backend runs and why in its log,
//!   `/readyz` and `victor_agent_dataplane_choice`; where a module cannot be loaded it runs the
//!   userspace forwarder and says why;
//! * a restarted agent adopts its devices and routes, fixes what drifted (a tunnel's MTU) without
//!   touching routes, and removes what is stale (the route of a VM that is gone, the tunnel device
//!   of an FE that left) once the first snapshot says so; an agent switched to `--dataplane tun`
//!   removes the kernel data plane it finds (its ipip and sit devices) and hands the kernel's
//!   `sit0` back (down, IPv6 enabled again).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;

/// Unloads ipip (and what it pulled in) if nothing uses it: true if it is gone now. A test that
/// ran before may still be tearing its namespaces (and their ipip devices) down: retried for 10 s.
fn unload_ipip() -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = std::process::Command::new("modprobe").args(["-r", "ipip"]).output();
        if !victor_dataplane::kernel::ipip_available() || Instant::now() > deadline {
            return !victor_dataplane::kernel::ipip_available();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts fe1's agent with `--dataplane auto` (argv wrapped by `wrap`), waits until it is ready
/// and returns its `/readyz` data-plane line and the `why` of its `dataplane_choice` metric.
async fn start_auto(lab: &mut Lab, wrap: &[&str]) -> Result<(String, String)> {
    let ctl = Controller::start(&lab.dir.path().join("ctl"), None).await?;
    let mut argv: Vec<String> = wrap.iter().map(|s| s.to_string()).collect();
    argv.extend(lab.agent_argv(1, &[ctl.url()], &[]));
    lab.start_argv(1, argv)?;
    lab.wait_ready(1, Duration::from_secs(30))?;
    let line = victor_tests::lab::migrate::dataplane_of(lab.fe(1))?;
    let body = lab.agent_get(1, "/metrics")?.1;
    let choice = body
        .lines()
        .find(|l| l.starts_with("victor_agent_dataplane_choice{") && l.ends_with(" 1"))
        .context("no dataplane_choice metric")?
        .to_owned();
    let log = lab.agent_log(1);
    ensure!(log.contains("data plane chosen"), "the log does not say which data plane runs:\n{log}");
    println!("fe1: dataplane: {line}\n     {choice}");
    Ok((line, choice))
}

/// `auto` loads ipip with modprobe where the module exists (the stock kernel in the VM), or runs
/// the userspace forwarder and says why (a kernel without the module, like the CI host's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_loads_ipip_with_modprobe_or_says_why_not() -> Result<()> {
    let mut lab = Lab::build(2)?;
    let loadable = Plane::Kernel.unavailable().is_none();
    let unloaded = loadable && unload_ipip();
    let (line, choice) = start_auto(&mut lab, &[]).await?;
    if !loadable {
        // ipip (or, on a kernel that has ipip, sit) cannot be loaded.
        assert!(line.starts_with("tun (auto: the kernel's ") && line.contains(" module cannot be loaded ("), "{line}");
        let why = ["ipip_unavailable", "sit_unavailable"].map(|w| format!("backend=\"tun\",mode=\"auto\",why=\"{w}\""));
        assert!(why.iter().any(|w| choice.contains(w)), "{choice}");
    } else if unloaded {
        assert!(line.starts_with("kernel (auto: loaded the kernel's ipip module with modprobe; "), "{line}");
        assert!(line.contains(" sit module"), "{line}");
        assert!(choice.contains("backend=\"kernel\",mode=\"auto\",why=\"ipip_modprobed\""), "{choice}");
    } else {
        // Built in, or held by someone else: it was there before the agent asked.
        assert!(line.starts_with("kernel (auto: the kernel has the ipip module; "), "{line}");
        assert!(choice.contains("why=\"ipip_loaded\""), "{choice}");
    }
    Ok(())
}

/// Without `modprobe` in its view (as in a container) `auto` still gets ipip: it asks the kernel
/// for an ipip link through netlink and the kernel loads the module with its own helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_gets_ipip_from_the_kernel_without_modprobe() -> Result<()> {
    if let Some(why) = Plane::Kernel.unavailable() {
        println!(
            "SKIPPED: auto_gets_ipip_from_the_kernel_without_modprobe: the kernel's ipip module cannot be loaded here: {why}"
        );
        return Ok(());
    }
    if !unload_ipip() {
        println!(
            "SKIPPED: auto_gets_ipip_from_the_kernel_without_modprobe: ipip cannot be unloaded (built in or in use), \
             so the kernel's own autoload cannot be observed"
        );
        return Ok(());
    }
    let mut lab = Lab::build(2)?;
    // The agent's own mount namespace hides modprobe (the kernel's helper runs outside it).
    let hide = "mount --bind /dev/null /usr/sbin/modprobe && exec \"$0\" \"$@\"";
    let (line, choice) =
        start_auto(&mut lab, &["unshare", "--mount", "--propagation", "private", "sh", "-c", hide]).await?;
    let want = "kernel (auto: the kernel loaded its ipip module when asked for an ipip link; ";
    assert!(line.starts_with(want) && line.contains(" sit module"), "{line}");
    assert!(choice.contains("why=\"ipip_autoloaded\""), "{choice}");
    let probe_left = lab.fe(1).ip(&["link", "show"])?;
    assert!(!probe_left.contains("victor-probe"), "the probe link is removed again: {probe_left}");
    Ok(())
}

/// The metric lines of `victor_agent_reconcile_ops_total`, as `op → count`.
fn ops(lab: &Lab, n: usize) -> Result<std::collections::BTreeMap<String, f64>> {
    let body = lab.agent_get(n, "/metrics")?.1;
    let mut out = std::collections::BTreeMap::new();
    for l in body.lines().filter(|l| l.starts_with("victor_agent_reconcile_ops_total{")) {
        let op = l.split("op=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or_default();
        let value: f64 = l.rsplit(' ').next().unwrap_or("0").parse()?;
        if value > 0.0 {
            *out.entry(op.to_owned()).or_insert(0.0) += value;
        }
    }
    Ok(out)
}

/// Adoption after a restart: what is right stays untouched, drift is fixed, stale state goes
/// (after the first snapshot); then the same FE restarted with `--dataplane tun` removes the
/// kernel data plane and forwards in userspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_adopts_fixes_drift_and_removes_stale_state() -> Result<()> {
    run_on("restart_adopts_fixes_drift_and_removes_stale_state", Plane::Kernel, |plane| async move {
        let (mut lab, ctl) = Lab::with_agents(plane).await?;
        send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
        ctl.wait_bound(VM, "fe2", Duration::from_secs(10)).await?;
        let prober = Prober::start(&lab.client, VM, Duration::from_millis(10))?;
        prober.wait_replies_from(0, 10, Duration::from_secs(10))?;
        let fe1 = lab.fe(1);
        let tunnels = fe1.ip(&["-d", "link", "show", "type", "ipip"])?;
        for n in [2, 3] {
            assert!(tunnels.contains(&tunnel_device(n)), "fe1 has a tunnel to fe{n}: {tunnels}");
        }
        assert!(tunnels.contains("mtu 1480") && tunnels.contains("pmtudisc"), "{tunnels}");
        assert_eq!(fe1.exec(&["cat", "/proc/sys/net/ipv4/conf/vtun1/rp_filter"])?.stdout, b"1\n");
        // 6in4 beside every ipip device: a sit device per peer, and the kernel's sit0 adopted
        // as the 6in4 catch-all (up, IPv6 disabled).
        let sits = fe1.ip(&["-d", "link", "show", "type", "sit"])?;
        for n in [2, 3] {
            assert!(sits.contains(&sit_device(n)), "fe1 has a sit device to fe{n}: {sits}");
        }
        assert!(sits.contains("mtu 1480") && sits.contains(" pmtudisc"), "{sits}");
        assert!(sits.lines().any(|l| l.contains(" sit0@") && l.contains(",UP")), "sit0 is up: {sits}");
        assert_eq!(fe1.exec(&["cat", "/proc/sys/net/ipv6/conf/sit0/disable_ipv6"])?.stdout, b"1\n");

        // While fe1's agent is away: a stale route (a VM that is gone), the tunnel device of an
        // FE that left, and drift (the MTU of the tunnel to fe2).
        lab.stop_agent(1);
        let gone_vm = "10.10.0.77";
        let left = std::net::Ipv4Addr::new(198, 51, 100, 50);
        let left_dev = victor_fe_agent::forwarding::kernel::devices::peer_name(left);
        let fe1 = lab.fe(1);
        fe1.ip(&["route", "add", &format!("{gone_vm}/32"), "dev", &tunnel_device(2), "proto", "158"])?;
        fe1.ip(&[
            "link",
            "add",
            &left_dev,
            "type",
            "ipip",
            "local",
            &fe_addr(1).to_string(),
            "remote",
            &left.to_string(),
        ])?;
        fe1.ip(&["link", "set", &left_dev, "alias", "victor-fe-agent: IP-in-IP tunnel to FE 198.51.100.50", "up"])?;
        fe1.ip(&["link", "set", &tunnel_device(2), "mtu", "1400"])?;
        let monitor_log = lab.dir.path().join("monitor.log");
        let mut monitor = lab.monitor(1, &[], &monitor_log)?;
        let vm_route = lab.routes(1, &[&format!("{VM}/32")])?;

        lab.respawn(1)?;
        lab.wait_ready(1, Duration::from_secs(30))?;
        wait("the stale route and the device of the FE that left are removed", Duration::from_secs(10), || {
            lab.routes(1, &[&format!("{gone_vm}/32")]).is_ok_and(|r| r.trim().is_empty())
                && lab.fe(1).ip(&["link", "show"]).is_ok_and(|l| !l.contains(&left_dev))
        })?;
        std::thread::sleep(Duration::from_millis(300));
        monitor.kill();
        let events = std::fs::read_to_string(&monitor_log)?;
        let vm_events: Vec<&str> = events.lines().filter(|l| l.contains(&VM.to_string())).collect();
        assert!(vm_events.is_empty(), "the VM's route changed: {vm_events:?}");
        assert_eq!(lab.routes(1, &[&format!("{VM}/32")])?, vm_route);
        let dev = lab.fe(1).ip(&["link", "show", &tunnel_device(2)])?;
        assert!(dev.contains("mtu 1480"), "the MTU drift is fixed: {dev}");
        let done = ops(&lab, 1)?;
        assert_eq!(
            done,
            [("peer_remove".to_owned(), 1.0), ("tunnel_remove".to_owned(), 1.0)].into(),
            "only the stale state is removed"
        );
        let log = lab.agent_log(1);
        assert!(log.contains("devices_created: 0"), "nothing was created on the restart:\n{log}");
        let from = prober.sent();
        prober.wait_replies_from(from, 10, Duration::from_secs(10))?;

        // The same FE switched to the userspace data plane: the kernel one is removed first.
        lab.stop_agent(1);
        let argv = &mut lab.agents[0].argv;
        let at = argv.iter().position(|a| a == "--dataplane").context("--dataplane")? + 1;
        argv[at] = "tun".into();
        lab.plane = Some(Plane::Tun);
        lab.respawn(1)?;
        lab.wait_ready(1, Duration::from_secs(30))?;
        let links = lab.fe(1).ip(&["link", "show"])?;
        assert!(!links.contains("victor-"), "the kernel data plane's devices are gone: {links}");
        assert!(!links.contains("vsit-"), "the sit devices are gone: {links}");
        let sit0 = lab.fe(1).ip(&["link", "show", "sit0"])?;
        assert!(!sit0.contains(",UP") && !sit0.contains("alias"), "sit0 is handed back: {sit0}");
        assert_eq!(lab.fe(1).exec(&["cat", "/proc/sys/net/ipv6/conf/sit0/disable_ipv6"])?.stdout, b"0\n");
        assert!(lab.routes(1, &[&format!("{VM}/32")])?.trim().is_empty());
        let from = prober.sent();
        prober
            .wait_replies_from(from, 10, Duration::from_secs(10))
            .context("forwarding through the userspace plane")?;
        let probes = prober.stop()?;
        println!("adoption, cleanup and the switch to tun: {} echo requests, {} lost", probes.sent, probes.lost(5));
        Ok(())
    })
    .await
}
