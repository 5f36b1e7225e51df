//! The orchestrator's calls added for issue 19, through a client generated from the proto, against
//! a controller process on the embedded store and on a 1-member etcd: GetVm, CancelMigration,
//! RemoveFe (with and without force, and its refusals), and the server-side filters (ListVms by
//! prefix; ListBindings by frozen state and source, paged; WatchBindings by FE). Every refusal is
//! checked for its code and for a message that says what to fix, and refused writes change
//! nothing.

mod common;

use std::time::Duration;

use common::*;
use tonic::Code;
use victor_proto::v1::*;
use victor_testkit::etcd::EtcdCluster;

/// The replica's flags: one move allowed per damping window (so two moves freeze), short sessions
/// (FEs without heartbeats go down within seconds).
const FLAGS: [&str; 4] = ["--damping-max-moves", "1", "--session-ttl", "2s"];

fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {}", status.message());
    for n in needles {
        assert!(status.message().contains(n), "{what}: the message should say {n:?}: {}", status.message());
    }
}

async fn announce(c: &mut Clients, ip: &str, fe: &str, commit: bool) -> Binding {
    let req = AnnounceMigrationRequest { vm_ip: ip.into(), target_fe_id: fe.into(), commit, ttl_seconds: 0 };
    c.binding
        .announce_migration(req)
        .await
        .unwrap_or_else(|e| panic!("announce {ip} -> {fe}: {e}"))
        .into_inner()
        .binding
        .unwrap()
}

async fn declare(c: &mut Clients, ip: &str, mac_last: u8) {
    let req = DeclareVmRequest { vm_ip: ip.into(), mac: mac(mac_last).to_string(), ..Default::default() };
    c.binding.declare_vm(req).await.expect("declare");
}

/// Every binding matching `req`'s filters, paging with `req.page_size`; returns the IPs and the
/// number of pages.
async fn list_all(c: &mut Clients, req: ListBindingsRequest) -> (Vec<String>, usize) {
    let mut ips = Vec::new();
    let mut pages = 0;
    let mut token = String::new();
    loop {
        let page = c
            .binding
            .list_bindings(ListBindingsRequest { page_token: token, ..req.clone() })
            .await
            .expect("list")
            .into_inner();
        pages += 1;
        ips.extend(page.bindings.into_iter().map(|b| b.vm_ip));
        token = page.next_page_token;
        if token.is_empty() {
            return (ips, pages);
        }
    }
}

/// The next `n` watch events (skipping heartbeats); fails if a message brings more.
async fn next_events(watch: &mut tonic::Streaming<WatchBindingsResponse>, n: usize) -> Vec<BindingEvent> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut events = Vec::new();
        while events.len() < n {
            let msg = watch.message().await.expect("watch error").expect("watch ended");
            events.extend(msg.events);
        }
        assert_eq!(events.len(), n, "more events than expected: {events:?}");
        events
    })
    .await
    .expect("the expected watch events did not arrive within 10 s")
}

async fn next_event(watch: &mut tonic::Streaming<WatchBindingsResponse>) -> BindingEvent {
    next_events(watch, 1).await.remove(0)
}

fn event_of(e: &BindingEvent) -> (&'static str, String, String) {
    let b = e.binding.clone().unwrap_or_default();
    let kind = if e.kind == BindingEventKind::Remove as i32 { "remove" } else { "upsert" };
    (kind, b.vm_ip, b.fe_id)
}

async fn wait_down(c: &mut Clients, fes: &[&str]) {
    victor_testkit::process::wait_for("FEs down", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let listed = c.binding.list_fes(ListFesRequest {}).await.ok()?.into_inner().fes;
            fes.iter()
                .all(|id| listed.iter().any(|f| f.fe_id == *id && f.health == FeHealth::Down as i32))
                .then_some(())
        }
    })
    .await
    .expect("FEs without heartbeats went down");
}

async fn orchestrator_calls_and_their_refusals(c: &mut Clients) {
    for (fe, n) in [("fe1", 1), ("fe2", 2), ("fe3", 3)] {
        register(c, fe, n, "site-a").await;
    }
    // fe1 stays up (heartbeats); fe2 and fe3 go down once their sessions expire.
    let heartbeats = {
        let mut agent = c.agent.clone();
        tokio::spawn(async move {
            loop {
                let _ = agent.heartbeat(HeartbeatRequest { fe_id: "fe1".into() }).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut sync = c.agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: 0 }).await.unwrap().into_inner();

    for (ip, fe) in [("10.10.1.1", "fe2"), ("10.10.1.2", "fe2"), ("10.10.1.3", "fe1"), ("10.10.2.1", "fe2")] {
        let last = ip.rsplit('.').next().unwrap().parse().unwrap();
        assert_eq!(outcome(&learn(c, fe, ip, mac(last)).await), ClaimOutcome::Bound, "{ip}");
    }
    // 10.10.2.1 moves to fe1 and back: the second move within the window freezes it.
    assert_eq!(outcome(&learn(c, "fe1", "10.10.2.1", mac(1)).await), ClaimOutcome::Moved);
    assert_eq!(outcome(&learn(c, "fe2", "10.10.2.1", mac(1)).await), ClaimOutcome::Moved);
    // Declared VMs; 10.10.3.1 is placed at fe3 by the orchestrator.
    for (ip, last) in [("10.10.3.1", 31), ("10.10.3.2", 32), ("10.10.4.1", 41)] {
        declare(c, ip, last).await;
    }
    announce(c, "10.10.3.1", "fe3", true).await;

    // ── GetVm ──
    let vm = c.binding.get_vm(GetVmRequest { vm_ip: "10.10.3.2".into() }).await.unwrap().into_inner();
    assert_eq!((vm.vm_ip.as_str(), vm.mac.as_str()), ("10.10.3.2", "02:00:00:00:00:20"));
    assert!(vm.revision > 0);
    let undeclared = c.binding.get_vm(GetVmRequest { vm_ip: "10.10.1.1".into() }).await;
    assert_refused("GetVm of a bound, undeclared VM", undeclared, Code::NotFound, &["VM 10.10.1.1 is not declared"]);
    let outside = c.binding.get_vm(GetVmRequest { vm_ip: "10.11.0.1".into() }).await;
    assert_refused("GetVm outside", outside, Code::InvalidArgument, &["outside the mobile prefixes"]);
    let garbage = c.binding.get_vm(GetVmRequest { vm_ip: "vm-7".into() }).await;
    assert_refused("GetVm garbage", garbage, Code::InvalidArgument, &["is not an IP address"]);

    // ── ListVms by prefix, paged ──
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let req = ListVmsRequest { page_size: 1, page_token: token, prefix: "10.10.3.0/24".into() };
        let page = c.binding.list_vms(req).await.unwrap().into_inner();
        pages.push(page.vms.iter().map(|v| v.vm_ip.clone()).collect::<Vec<_>>());
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, [vec!["10.10.3.1"], vec!["10.10.3.2"]], "one VM per page, only the prefix's");
    let bad = c.binding.list_vms(ListVmsRequest { prefix: "10.10.230.0/33".into(), ..Default::default() }).await;
    assert_refused("ListVms /33", bad, Code::InvalidArgument, &["prefix \"10.10.230.0/33\"", "longer than 32"]);

    // ── ListBindings by frozen state and source, paged exactly ──
    let frozen = ListBindingsRequest { frozen: Some(true), ..Default::default() };
    assert_eq!(list_all(c, frozen).await.0, ["10.10.2.1"]);
    let thawed = ListBindingsRequest { frozen: Some(false), page_size: 2, ..Default::default() };
    let (ips, pages) = list_all(c, thawed).await;
    assert_eq!(ips, ["10.10.1.1", "10.10.1.2", "10.10.1.3", "10.10.3.1"]);
    assert_eq!(pages, 2, "a full page followed by nothing ends the listing");
    let placed = ListBindingsRequest { source: BindingSource::Orchestrator as i32, ..Default::default() };
    assert_eq!(list_all(c, placed).await.0, ["10.10.3.1"]);
    let arp_at_fe2 = ListBindingsRequest {
        source: BindingSource::Arp as i32,
        fe_id: "fe2".into(),
        page_size: 1,
        ..Default::default()
    };
    let (ips, pages) = list_all(c, arp_at_fe2).await;
    assert_eq!((ips.as_slice(), pages), (&["10.10.1.1", "10.10.1.2", "10.10.2.1"].map(String::from)[..], 3));
    let b = binding(c, "10.10.2.1").await.unwrap();
    assert_eq!((b.fe_id.as_str(), b.previous_fe_id.as_str(), b.frozen), ("fe2", "fe1", true));
    let bad = c.binding.list_bindings(ListBindingsRequest { source: 7, ..Default::default() }).await;
    assert_refused("ListBindings source 7", bad, Code::InvalidArgument, &["source 7", "BINDING_SOURCE_ARP"]);
    let bad = c.binding.list_bindings(ListBindingsRequest { prefix: "10.10.0.0".into(), ..Default::default() }).await;
    assert_refused("ListBindings no length", bad, Code::InvalidArgument, &["has no prefix length", "10.10.0.0/32"]);
    let bad = c.binding.list_bindings(ListBindingsRequest { fe_id: "fe 2".into(), ..Default::default() }).await;
    assert_refused("ListBindings fe_id", bad, Code::InvalidArgument, &["fe_id"]);

    // ── CancelMigration ──
    assert_eq!(announce(c, "10.10.1.1", "fe3", false).await.pending_fe_id, "fe3");
    let before = fingerprint(c).await;
    let guarded = CancelMigrationRequest { vm_ip: "10.10.1.1".into(), target_fe_id: "fe1".into() };
    assert_refused(
        "cancel with another target",
        c.binding.cancel_migration(guarded).await,
        Code::FailedPrecondition,
        &["to FE fe3, not fe1", "nothing was cancelled"],
    );
    assert_eq!(binding(c, "10.10.1.1").await.unwrap().pending_fe_id, "fe3", "a refused cancel changes nothing");
    assert_eq!(fingerprint(c).await, before);
    let cancel = CancelMigrationRequest { vm_ip: "10.10.1.1".into(), target_fe_id: String::new() };
    let done = c.binding.cancel_migration(cancel.clone()).await.unwrap().into_inner();
    let b = done.binding.unwrap();
    assert_eq!((done.cancelled_fe_id.as_str(), b.fe_id.as_str(), b.pending_fe_id.as_str()), ("fe3", "fe2", ""));
    assert!(done.revision > 0);
    assert_eq!(binding(c, "10.10.1.1").await.unwrap().pending_fe_id, "", "read-your-writes");
    assert_refused(
        "cancel again",
        c.binding.cancel_migration(cancel).await,
        Code::NotFound,
        &["VM 10.10.1.1 (bound at FE fe2) has no pending migration announcement"],
    );
    let unknown = CancelMigrationRequest { vm_ip: "10.10.9.9".into(), ..Default::default() };
    assert_refused("cancel unknown VM", c.binding.cancel_migration(unknown).await, Code::NotFound, &["has no binding"]);
    let outside = CancelMigrationRequest { vm_ip: "192.168.0.1".into(), ..Default::default() };
    assert_refused("cancel outside", c.binding.cancel_migration(outside).await, Code::InvalidArgument, &["outside"]);

    // ── WatchBindings by FE ──
    let watch_req = |fe: &str, snapshot: bool| WatchBindingsRequest {
        fe_id: fe.into(),
        include_snapshot: snapshot,
        ..Default::default()
    };
    let mut at_fe2 = c.binding.watch_bindings(watch_req("fe2", true)).await.unwrap().into_inner();
    let mut snapshot = Vec::new();
    loop {
        let msg = at_fe2.message().await.unwrap().unwrap();
        snapshot.extend(msg.events.iter().map(event_of));
        if msg.snapshot_done {
            break;
        }
    }
    let held = |ips: &[&str]| ips.iter().map(|ip| ("upsert", ip.to_string(), "fe2".to_string())).collect::<Vec<_>>();
    assert_eq!(snapshot, held(&["10.10.1.1", "10.10.1.2", "10.10.2.1"]), "the snapshot holds fe2's bindings");
    // Without snapshot, from now: fe3 holds 10.10.3.1.
    let mut at_fe3 = c.binding.watch_bindings(watch_req("fe3", false)).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await; // the watch has started from "now"
    let before_moves = status(c).await.cache_revision;
    // 10.10.1.2 leaves fe2 (to fe3): fe2's watcher sees it once more, at its new FE.
    announce(c, "10.10.1.2", "fe3", true).await;
    assert_eq!(event_of(&next_event(&mut at_fe2).await), ("upsert", "10.10.1.2".into(), "fe3".into()));
    assert_eq!(event_of(&next_event(&mut at_fe3).await), ("upsert", "10.10.1.2".into(), "fe3".into()));
    // It moves on to fe1: no longer fe2's business; it leaves fe3.
    announce(c, "10.10.1.2", "fe1", true).await;
    assert_eq!(event_of(&next_event(&mut at_fe3).await), ("upsert", "10.10.1.2".into(), "fe1".into()));
    // 10.10.3.1 (held by fe3's watcher since it started) comes to fe2: both see it.
    announce(c, "10.10.3.1", "fe2", true).await;
    assert_eq!(event_of(&next_event(&mut at_fe2).await), ("upsert", "10.10.3.1".into(), "fe2".into()));
    assert_eq!(event_of(&next_event(&mut at_fe3).await), ("upsert", "10.10.3.1".into(), "fe2".into()));
    // Resumed from before those moves without a snapshot: the server cannot know what the client
    // held then, so every change since is sent (the client ignores bindings it does not hold).
    let resumed = WatchBindingsRequest { from_revision: before_moves, ..watch_req("fe3", false) };
    let mut resumed = c.binding.watch_bindings(resumed).await.unwrap().into_inner();
    let replayed: Vec<_> = next_events(&mut resumed, 3).await.iter().map(event_of).collect();
    let want = [("10.10.1.2", "fe3"), ("10.10.1.2", "fe1"), ("10.10.3.1", "fe2")];
    assert_eq!(replayed, want.map(|(ip, fe)| ("upsert", ip.to_string(), fe.to_string())));
    let bad = c.binding.watch_bindings(WatchBindingsRequest { fe_id: "fe/2".into(), ..Default::default() }).await;
    assert_refused("watch bad fe_id", bad.map(|_| ()), Code::InvalidArgument, &["fe_id"]);
    let bad =
        c.binding.watch_bindings(WatchBindingsRequest { prefix: "10.10.0.0/x".into(), ..Default::default() }).await;
    assert_refused("watch bad prefix", bad.map(|_| ()), Code::InvalidArgument, &["not a number", "from 0 to 32"]);

    // ── RemoveFe ──
    let remove = |fe: &str, force: bool| RemoveFeRequest { fe_id: fe.into(), force };
    assert_refused(
        "remove unknown FE",
        c.binding.remove_fe(remove("fe9", true)).await,
        Code::NotFound,
        &["FE fe9 is not registered"],
    );
    assert_refused("remove bad id", c.binding.remove_fe(remove("", false)).await, Code::InvalidArgument, &["fe_id"]);
    for force in [false, true] {
        assert_refused(
            "remove a live FE",
            c.binding.remove_fe(remove("fe1", force)).await,
            Code::FailedPrecondition,
            &["FE fe1 holds a live session", "stop its agent", "force does not override"],
        );
    }
    wait_down(c, &["fe2", "fe3"]).await;
    // fe3 (down, no binding) has an announcement naming it: removed, the announcement cancelled.
    assert_eq!(announce(c, "10.10.1.3", "fe3", false).await.pending_fe_id, "fe3");
    let before = fingerprint(c).await;
    assert_refused(
        "remove an FE with bindings",
        c.binding.remove_fe(remove("fe2", false)).await,
        Code::FailedPrecondition,
        &["FE fe2 still holds 3 binding(s)", "force", "also removes every binding pointing at the FE"],
    );
    assert_eq!(fingerprint(c).await, before, "a refused removal writes nothing");
    let gone = c.binding.remove_fe(remove("fe3", false)).await.unwrap().into_inner();
    assert_eq!((gone.removed_bindings, gone.cancelled_announcements), (0, 1));
    assert_eq!(binding(c, "10.10.1.3").await.unwrap().pending_fe_id, "");
    assert_refused(
        "announce to a removed FE",
        c.binding
            .announce_migration(AnnounceMigrationRequest {
                vm_ip: "10.10.1.3".into(),
                target_fe_id: "fe3".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        &["fe3"],
    );
    // fe2 with force: its three bindings go with it; its watcher sees each removal.
    let forced = c.binding.remove_fe(remove("fe2", true)).await.unwrap().into_inner();
    assert_eq!((forced.removed_bindings, forced.cancelled_announcements), (3, 0));
    assert!(forced.revision > gone.revision);
    let mut removed: Vec<_> = next_events(&mut at_fe2, 3).await.iter().map(event_of).collect();
    removed.sort();
    let expected: Vec<_> =
        ["10.10.1.1", "10.10.2.1", "10.10.3.1"].iter().map(|ip| ("remove", ip.to_string(), String::new())).collect();
    assert_eq!(removed, expected);
    for ip in ["10.10.1.1", "10.10.2.1", "10.10.3.1"] {
        assert_eq!(binding(c, ip).await.unwrap_err().code(), Code::NotFound, "{ip} went with fe2");
    }
    let listed: Vec<String> =
        c.binding.list_fes(ListFesRequest {}).await.unwrap().into_inner().fes.into_iter().map(|f| f.fe_id).collect();
    assert_eq!(listed, ["fe1"]);
    assert_refused("remove twice", c.binding.remove_fe(remove("fe2", true)).await, Code::NotFound, &["fe2"]);
    // The agents hear of both removals.
    let mut removals = std::collections::BTreeSet::new();
    while removals.len() < 2 {
        let msg = next_matching(&mut sync, Duration::from_secs(10), |m| !m.fe_removals.is_empty()).await;
        removals.extend(msg.fe_removals.into_iter().map(|r| r.fe_id));
    }
    assert_eq!(removals.into_iter().collect::<Vec<_>>(), ["fe2", "fe3"]);
    heartbeats.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_calls_on_the_embedded_store() {
    let replica = Replica::spawn_embedded("orch-embedded", &FLAGS).await;
    orchestrator_calls_and_their_refusals(&mut replica.clients().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_calls_on_etcd() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let replica = Replica::spawn("orch-etcd", &etcd.endpoints(), &FLAGS).await;
    orchestrator_calls_and_their_refusals(&mut replica.clients().await).await;
}

/// The binding entry for `ip` in a stream message (the newest, if the message holds several).
fn entry<'a>(msg: &'a SyncUpdate, ip: &str) -> Option<&'a BindingEntry> {
    let ip = ip_bytes(ip);
    msg.binding_upserts.iter().filter(|e| e.vm_ip == ip).max_by_key(|e| e.revision)
}

/// The next stream message with an upsert of `ip`; returns (binding FE, announced FE, revision).
async fn next_entry(sync: &mut tonic::Streaming<SyncUpdate>, ip: &str, within: Duration) -> (String, String, u64) {
    let msg = next_matching(sync, within, |m| entry(m, ip).is_some()).await;
    let e = entry(&msg, ip).unwrap();
    (e.fe_id.clone(), e.pending_fe_id.clone(), e.revision)
}

/// The agents' stream carries an orchestrator's announced migration (issue 18: the data plane
/// relays the VM's packets to the announced FE meanwhile): AnnounceMigration without commit
/// sends the binding with `pending_fe_id` and without moving it, in deltas and in a new stream's
/// snapshot; CancelMigration, the committed move and the announcement's expiry each send it
/// again without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_migration_reaches_the_agents_stream_on_etcd() {
    let etcd = EtcdCluster::start(1).await.unwrap();
    let replica = Replica::spawn("migration-stream", &etcd.endpoints(), &[]).await;
    let c = &mut replica.clients().await;
    for (fe, n) in [("fe1", 1), ("fe2", 2), ("fe3", 3)] {
        register(c, fe, n, "site-a").await;
    }
    let heartbeats = {
        let mut agent = c.agent.clone();
        tokio::spawn(async move {
            loop {
                for fe in ["fe1", "fe2", "fe3"] {
                    let _ = agent.heartbeat(HeartbeatRequest { fe_id: fe.into() }).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let vm = "10.10.5.1";
    assert_eq!(outcome(&learn(c, "fe2", vm, mac(51)).await), ClaimOutcome::Bound);
    let sync_from = |from_revision| SyncRequest { fe_id: "fe1".into(), from_revision };
    let mut sync = c.agent.sync(sync_from(0)).await.unwrap().into_inner();
    let end = next_matching(&mut sync, Duration::from_secs(10), |m| m.phase == SyncPhase::SnapshotEnd as i32).await;
    let within = Duration::from_secs(10);

    // Announced: the binding stays at fe2 and names fe3.
    let announced = announce(c, vm, "fe3", false).await;
    assert_eq!((announced.fe_id.as_str(), announced.pending_fe_id.as_str()), ("fe2", "fe3"));
    let (fe, pending, rev_announced) = next_entry(&mut sync, vm, within).await;
    assert_eq!((fe.as_str(), pending.as_str()), ("fe2", "fe3"), "the delta carries the announcement");
    assert_eq!(rev_announced, announced.revision);
    // A new stream's snapshot carries it too, and so does one resumed from before it.
    let mut fresh = c.agent.sync(sync_from(0)).await.unwrap().into_inner();
    let snap = next_matching(&mut fresh, within, |m| entry(m, vm).is_some()).await;
    assert_eq!(entry(&snap, vm).unwrap().pending_fe_id, "fe3", "snapshot phase {}", snap.phase);
    let mut resumed = c.agent.sync(sync_from(end.revision)).await.unwrap().into_inner();
    assert_eq!(next_entry(&mut resumed, vm, within).await.1, "fe3", "a resumed stream's deltas carry it");
    drop((fresh, resumed));

    // Cancelled: sent again without it.
    let cancel = CancelMigrationRequest { vm_ip: vm.into(), target_fe_id: "fe3".into() };
    let cancelled = c.binding.cancel_migration(cancel).await.unwrap().into_inner();
    let (fe, pending, rev) = next_entry(&mut sync, vm, within).await;
    assert_eq!((fe.as_str(), pending.as_str(), rev), ("fe2", "", cancelled.revision));

    // Announced again, then committed: the move to fe3 ends the announcement.
    announce(c, vm, "fe3", false).await;
    assert_eq!(next_entry(&mut sync, vm, within).await.1, "fe3");
    let moved = announce(c, vm, "fe3", true).await;
    let (fe, pending, rev) = next_entry(&mut sync, vm, within).await;
    assert_eq!((fe.as_str(), pending.as_str(), rev), ("fe3", "", moved.revision), "committed: moved, not pending");

    // The VM itself arrives at the announced FE (its agent's claim commits the move).
    announce(c, vm, "fe1", false).await;
    assert_eq!(next_entry(&mut sync, vm, within).await.1, "fe1");
    assert_eq!(outcome(&learn(c, "fe1", vm, mac(51)).await), ClaimOutcome::Moved);
    let (fe, pending, _) = next_entry(&mut sync, vm, within).await;
    assert_eq!((fe.as_str(), pending.as_str()), ("fe1", ""), "claimed at the announced FE: moved, not pending");

    // Expired: housekeeping withdraws it, and the agents hear so.
    let req = AnnounceMigrationRequest { vm_ip: vm.into(), target_fe_id: "fe2".into(), commit: false, ttl_seconds: 1 };
    c.binding.announce_migration(req).await.unwrap();
    assert_eq!(next_entry(&mut sync, vm, within).await.1, "fe2");
    let (fe, pending, _) = next_entry(&mut sync, vm, Duration::from_secs(30)).await;
    assert_eq!((fe.as_str(), pending.as_str()), ("fe1", ""), "expired");
    assert_eq!(binding(c, vm).await.unwrap().pending_fe_id, "");
    heartbeats.abort();
}
