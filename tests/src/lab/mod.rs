//! The migration testbed of the README's "See it work" (`victor-lab up|down|migrate`), and the
//! pieces the agent's tests share with it:
//! * [`addressing`] — the address plan;
//! * [`announce`] — how a moved VM announces itself (GARP, QEMU's RARP, NA) and its families;
//! * [`topology`] — namespaces, underlay bridge, client, FEs, VMs;
//! * [`agents`] — `victor-fe-agent` processes inside the FEs and their admin endpoints;
//! * [`bgp`] — the BGP upstream router (real BIRD 2) of `--bgp`, its FIB watch;
//! * [`controlplane`] — etcd (or the embedded store) and controller processes;
//! * [`probe`] — the exact-interval ICMP prober and the resident frame (GARP) sender;
//! * [`netlink`] — fast link moves between namespaces;
//! * [`migrate`] — the experiment and its report;
//! * [`qemu`] — the experiment with a real VM (`--vm qemu`): hypervisors, live migrations over
//!   QMP, the announcements the new FE saw; [`guest`] — the QEMU guest; [`qmp`] — the QMP client;
//! * [`state`] — what `up` leaves running, so `down` removes exactly that.

pub mod addressing;
pub mod agents;
pub mod announce;
pub mod bgp;
pub mod controlplane;
pub mod guest;
pub mod migrate;
pub mod netlink;
pub mod probe;
pub mod qemu;
pub mod qmp;
pub mod state;
pub mod topology;

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use victor_testkit::netns::NetNs;

pub use migrate::MigrateArgs;
use state::{LabState, Process};

/// `victor-lab up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Name of the lab (prefix of its namespaces, e.g. `vlab-client`, `vlab-fe1`).
    #[arg(long, default_value = "vlab")]
    pub name: String,
    /// etcd members: 0 = the controller's embedded store, 1 or 3.
    #[arg(long, default_value_t = 1)]
    pub etcd_members: usize,
    /// Controller replicas (>1 needs etcd).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Put the client behind a BGP router (real BIRD 2) that learns the mobile prefix from every
    /// FE's agent (ECMP) instead of the static ingress through fe1.
    #[arg(long)]
    pub bgp: bool,
}

/// `victor-lab down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Name of the lab to remove.
    #[arg(long, default_value = "vlab")]
    pub name: String,
}

/// Builds the lab, leaves it running, prints how to reach it.
pub async fn up(args: UpArgs) -> Result<()> {
    victor_testkit::require_root("victor-lab up");
    if !args.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        || args.name.is_empty()
        || args.name.len() > 20
    {
        bail!("--name {:?} must be 1-20 letters, digits or '-'", args.name);
    }
    if LabState::load(&args.name)?.is_some() {
        bail!(
            "a lab named {:?} is already up (or crashed); run `victor-lab down --name {}` first",
            args.name,
            args.name
        );
    }
    let dir = state::state_dir().join(&args.name);
    std::fs::create_dir_all(&dir)?;
    let record = RefCell::new(LabState { name: args.name.clone(), dirs: vec![dir.clone()], ..LabState::default() });
    record.borrow().save()?;
    // Every namespace is recorded before it is created, so `down` finds it even after a crash.
    let namer = |role: &str| -> Result<NetNs> {
        let name = format!("{}-{role}", args.name);
        record.borrow_mut().namespaces.push(name.clone());
        record.borrow().save()?;
        NetNs::named(&name)
    };
    let built = build_up(&args, &dir, &namer, &record).await;
    if let Err(err) = built {
        let cleanup = record.borrow().tear_down();
        return Err(err.context(format!("victor-lab up failed; cleaned up: {:?}", cleanup.unwrap_or_default())));
    }
    Ok(())
}

async fn build_up(
    args: &UpArgs,
    dir: &std::path::Path,
    namer: topology::Namer<'_>,
    record: &RefCell<LabState>,
) -> Result<()> {
    let controller_bin = victor_testkit::workspace_binary("victor-controller");
    let agent_bin = victor_testkit::workspace_binary("victor-fe-agent");
    let ingress = if args.bgp { topology::Ingress::Bgp } else { topology::Ingress::Static };
    let mut topo = topology::Topology::build_with(3, namer, ingress)?;
    let vm = topology::VmSpec::numbered(1);
    topo.add_vm(vm.clone(), 2, namer)?;
    let bird = match &topo.upstream {
        Some(ns) => {
            let bird = bgp::start_upstream(ns, 3, dir)?;
            record.borrow_mut().processes.push(Process {
                role: "bird-upstream".into(),
                pid: bird.pid(),
                exe: PathBuf::from(bgp::BIRD),
            });
            record.borrow().save()?;
            Some(bird)
        }
        None => None,
    };
    let mut plane =
        controlplane::ControlPlane::start(&controller_bin, dir, args.etcd_members, args.replicas, &[]).await?;
    let urls = plane.urls();
    let netns = migrate::controller_netns()?;
    let mut agents = Vec::new();
    // The agents share a generated move-hint key (in the lab's directory, removed by `down`).
    let hint_flags = agents::move_hint_flags(dir)?;
    for n in 1..=3 {
        let mut flags = if args.bgp { bgp::agent_flags(n) } else { Vec::new() };
        flags.extend(hint_flags.iter().cloned());
        let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
        let argv =
            agents::AgentCommand { bin: &agent_bin, controllers: &urls, controller_netns: &netns, extra: &extra }
                .argv(n);
        let agent = agents::Agent::spawn(topo.fe(n), n, argv, dir)?;
        if let Some(g) = &agent.guard {
            record.borrow_mut().processes.push(Process {
                role: format!("agent{n}"),
                pid: g.pid(),
                exe: agent_bin.clone(),
            });
        }
        agents.push(agent);
    }
    for (r, replica) in plane.replicas.iter().enumerate() {
        record.borrow_mut().processes.push(Process {
            role: format!("controller{}", r + 1),
            pid: replica.pid(),
            exe: controller_bin.clone(),
        });
    }
    record.borrow().save()?;
    for n in 1..=3 {
        agents::wait_agent_ready(topo.fe(n), &mut agents[n - 1], Duration::from_secs(30))?;
    }
    probe::send_garp(topo.vm(1), "eth0", &vm.mac, vm.ip)?;
    plane.wait_bound(vm.ip, "fe2", Duration::from_secs(10)).await?;
    let anycast = match (&bird, &topo.upstream) {
        (Some(bird), Some(ns)) => Some(bgp::anycast_ready(&topo.client, ns, bird, 3, vm.ip, 1)?),
        _ => None,
    };

    // Everything works: let it outlive this process.
    topo.make_persistent();
    let bird_socket = bird.map(|b| {
        let socket = b.socket.clone();
        b.detach();
        socket
    });
    for agent in &mut agents {
        if let Some(g) = agent.guard.take() {
            g.detach();
        }
    }
    let replicas: Vec<_> = plane.replicas.drain(..).collect();
    let http: Vec<_> = replicas.iter().map(|r| r.http()).collect();
    for replica in replicas {
        replica.detach();
    }
    if let Some(etcd) = plane.etcd.take() {
        let (pids, data) = etcd.detach();
        let mut rec = record.borrow_mut();
        for (i, pid) in pids.into_iter().enumerate() {
            rec.processes.insert(i, Process { role: format!("etcd{i}"), pid, exe: PathBuf::from("/usr/bin/etcd") });
        }
        rec.dirs.push(data);
    }
    record.borrow().save()?;
    drop(topo);
    let name = &args.name;
    println!(
        "VICTOR lab {name:?} is up ({} etcd member(s), {} controller replica(s)).",
        args.etcd_members, args.replicas
    );
    println!("  namespaces : {}", record.borrow().namespaces.join(" "));
    match (&anycast, &bird_socket) {
        (Some(a), Some(socket)) => {
            println!(
                "  client     : 192.0.2.10 in {name}-client, behind {name}-upstream ({}, AS {}) with ECMP over {}; \
                 source {} enters at {}",
                a.router,
                bgp::UPSTREAM_AS,
                a.paths.join(", "),
                a.client_source,
                a.ingress_fe
            );
            println!("  BGP routes : birdc -s {} show route for {} all", socket.display(), addressing::MOBILE);
        }
        _ => println!("  client     : 192.0.2.10 in {name}-client (ingress FE: fe1)"),
    }
    println!("  VM         : {} (MAC {}) behind fe2, in {name}-vm1, gateway {}", vm.ip, vm.mac, addressing::GATEWAY);
    println!(
        "  underlay   : fe1..fe3 = {}, {}, {}",
        addressing::fe_addr(1),
        addressing::fe_addr(2),
        addressing::fe_addr(3)
    );
    println!("  controllers: {}", urls.join(", "));
    for h in &http {
        println!("  status page: http://{h}/status   (also /readyz, /metrics, /debug/moves)");
    }
    println!(
        "  agents     : admin on {} inside each FE namespace (/readyz, /metrics, /debug/events)",
        agents::AGENT_HTTP
    );
    println!("  logs       : {}", dir.display());
    println!("try:");
    println!("  ip netns exec {name}-client ping -c 3 {}", vm.ip);
    println!("  victorctl --controller {} binding list", urls[0]);
    println!("  victor-lab down --name {name}");
    Ok(())
}

/// Removes what `up` created.
pub async fn down(args: DownArgs) -> Result<()> {
    victor_testkit::require_root("victor-lab down");
    let Some(state) = LabState::load(&args.name)? else {
        println!("no lab named {:?} is up (nothing recorded in {})", args.name, state::state_dir().display());
        return Ok(());
    };
    for line in state.tear_down().context("tear down")? {
        println!("{line}");
    }
    println!("lab {:?} is down", args.name);
    Ok(())
}

/// Runs the migration experiment and prints its report.
pub async fn migrate(args: MigrateArgs) -> Result<()> {
    victor_testkit::require_root("victor-lab migrate");
    if args.vm == migrate::VmKind::Qemu {
        let report = qemu::run(&args).await?;
        return qemu::print(&args, &report);
    }
    let report = migrate::run(&args).await?;
    migrate::print(&args, &report)
}
