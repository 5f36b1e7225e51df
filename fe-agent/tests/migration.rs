//! An orchestrator's announced migration (AnnounceMigration without commit, issue 18) reaches
//! every agent's data plane (real agents, real controller on the embedded store, both data
//! planes): on the userspace one each agent's relay table holds the VM → the announced FE
//! (`victor_agent_migrations_announced`); CancelMigration and the committed move empty it again.
//! The kernel backend has no relay: it keeps none and says so in its log.

mod common;

use std::time::{Duration, Instant};

use common::*;
use victor_proto::v1::{AnnounceMigrationRequest, CancelMigrationRequest};

const ANNOUNCED: &str = "victor_agent_migrations_announced";

plane_tests!(an_announced_migration_reaches_every_agents_relay_table);

/// Waits until every agent's `victor_agent_migrations_announced` is `want`.
fn wait_announced(lab: &Lab, want: f64, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got: Vec<f64> = (1..=3).map(|n| lab.agent_metric(n, ANNOUNCED)).collect::<anyhow::Result<_>>()?;
        if got.iter().all(|g| *g == want) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: {ANNOUNCED} per agent is {got:?}, not {want} everywhere");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn an_announced_migration_reaches_every_agents_relay_table(plane: Plane) -> anyhow::Result<()> {
    let (lab, ctl) = Lab::with_agents(plane).await?;
    send_garp(&lab.vm, "eth0", VM_MAC, VM)?;
    ctl.wait_bound(VM, "fe2", Duration::from_secs(5)).await?;
    let mut client = ctl.client().await?;
    let announce =
        |commit| AnnounceMigrationRequest { vm_ip: VM.to_string(), target_fe_id: "fe3".into(), commit, ttl_seconds: 0 };

    client.announce_migration(announce(false)).await?;
    match plane {
        Plane::Tun => {
            wait_announced(&lab, 1.0, "announced")?;
            let series = "victor_agent_reconcile_ops_total{op=\"migration_set\",result=\"ok\"}";
            for n in 1..=3 {
                assert_eq!(lab.agent_metric(n, series)?, 1.0, "agent {n}: {series}");
                let (_, body) = lab.agent_get(n, "/metrics")?;
                assert!(body.contains("victor_agent_migration_relay_packets_total{what=\"copied\"}"), "agent {n}");
            }
        }
        Plane::Kernel => {
            let said = "needs the userspace data plane";
            let deadline = Instant::now() + Duration::from_secs(5);
            while !(1..=3).all(|n| lab.agent_log(n).contains(said)) {
                anyhow::ensure!(Instant::now() < deadline, "the kernel agents did not log {said:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
            let (_, body) = lab.agent_get(1, "/metrics")?;
            assert!(!body.contains(ANNOUNCED), "the kernel backend keeps no relay table");
        }
    }

    // Cancelled: the relay goes everywhere; announced again and committed: the VM moves, no relay.
    client.cancel_migration(CancelMigrationRequest { vm_ip: VM.to_string(), target_fe_id: "fe3".into() }).await?;
    wait_announced(&lab, 0.0, "cancelled")?;
    if plane == Plane::Tun {
        client.announce_migration(announce(false)).await?;
        wait_announced(&lab, 1.0, "announced again")?;
    }
    client.announce_migration(announce(true)).await?;
    ctl.wait_bound(VM, "fe3", Duration::from_secs(5)).await?;
    wait_announced(&lab, 0.0, "committed")?;
    Ok(())
}
