//! Read-your-writes for a client of one replica (a controller process, driven by a client built
//! from the generated proto only): right after `Report` answers BOUND, `GetBinding` finds the
//! binding and `AnnounceMigration(commit)` can move it — on the embedded store and on a 1-member
//! etcd. Each write settles on this replica's cache before it is answered
//! (`victor_controller::replica::Replica::settle`).

mod common;

use common::*;
use victor_proto::v1::*;
use victor_testkit::etcd::EtcdCluster;

/// Rounds of each sequence; the issue that found the gap saw it 2 times in 200.
const ROUNDS: u32 = 200;

fn vm(i: u32) -> (String, victor_proto::Mac) {
    (
        format!("10.10.{}.{}", 1 + i / 250, 1 + i % 250),
        victor_proto::Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
    )
}

/// Report → GetBinding and Report → AnnounceMigration(commit), each `ROUNDS` times on fresh VMs.
async fn report_then_read_and_migrate(c: &mut Clients) {
    register(c, "fe1", 1, "a").await;
    register(c, "fe2", 2, "a").await;
    for i in 0..ROUNDS {
        let (ip, mac) = vm(2 * i);
        let claim = learn(c, "fe1", &ip, mac).await;
        assert_eq!(outcome(&claim), ClaimOutcome::Bound, "round {i}: {claim:?}");
        let b = binding(c, &ip).await.unwrap_or_else(|e| panic!("round {i}: GetBinding({ip}) right after BOUND: {e}"));
        assert_eq!(b.fe_id, "fe1", "round {i}");
        assert!(
            b.revision >= claim.revision,
            "round {i}: binding at {} older than the claim's {}",
            b.revision,
            claim.revision
        );

        let (ip, mac) = vm(2 * i + 1);
        let claim = learn(c, "fe1", &ip, mac).await;
        assert_eq!(outcome(&claim), ClaimOutcome::Bound, "round {i}: {claim:?}");
        let moved = c
            .binding
            .announce_migration(AnnounceMigrationRequest {
                vm_ip: ip.clone(),
                target_fe_id: "fe2".into(),
                commit: true,
                ttl_seconds: 0,
            })
            .await
            .unwrap_or_else(|e| panic!("round {i}: AnnounceMigration(commit) of {ip} right after BOUND: {e}"))
            .into_inner()
            .binding
            .expect("binding");
        assert_eq!((moved.fe_id.as_str(), moved.move_seq), ("fe2", claim.move_seq + 1), "round {i}");
        // And the move itself is visible at once.
        assert_eq!(binding(c, &ip).await.unwrap().fe_id, "fe2", "round {i}");
    }
}

#[tokio::test]
async fn reads_and_conditional_writes_see_an_acknowledged_report_on_the_embedded_store() {
    let replica = Replica::spawn_embedded("ryw-embedded", &[]).await;
    report_then_read_and_migrate(&mut replica.clients().await).await;
}

#[tokio::test]
async fn reads_and_conditional_writes_see_an_acknowledged_report_on_etcd() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let replica = Replica::spawn("ryw-etcd", &etcd.endpoints(), &[]).await;
    report_then_read_and_migrate(&mut replica.clients().await).await;
}
