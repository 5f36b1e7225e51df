//! Stream messages and stream admission (embedded store, real sockets):
//! * snapshot messages of `Sync` and `WatchBindings` are bounded by bytes whatever the entries'
//!   size (20,000 bindings of an FE with a 63-character id used to make one 3.97 MB message);
//! * a snapshot read while bindings move (its parts come from successive revisions) still ends
//!   in exactly the cluster state at the revision of its last message;
//! * streams over the per-connection or per-replica limits are refused with RESOURCE_EXHAUSTED
//!   naming the limit, and a closed stream frees its place.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use prost::Message;
use tonic::Code;
use victor_proto::clock::unix_nanos;
use victor_proto::v1::*;

/// An FE id of the longest allowed length.
fn long_fe(c: char) -> String {
    std::iter::repeat_n(c, 63).collect()
}

/// Largest snapshot message accepted here: the controller's part size (64 KiB) plus one entry
/// and the FE list.
const PART_LIMIT: usize = 80 << 10;

fn vm_ip(i: u32) -> String {
    format!("10.10.{}.{}", i / 250, 1 + i % 250)
}

/// Binds `n` VMs to `fe` (reports of 1024 observations).
async fn bind_many(c: &mut Clients, fe: &str, n: u32, at: i64) {
    let ips: Vec<u32> = (0..n).collect();
    for batch in ips.chunks(1024) {
        let observations = batch
            .iter()
            .map(|&i| {
                let mac = victor_proto::Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
                observation(&vm_ip(i), mac, ObservationKind::Learned, at)
            })
            .collect();
        let results = c.agent.report(ReportRequest { fe_id: fe.into(), observations }).await.unwrap().into_inner();
        assert!(results.results.iter().all(|r| r.code == 0), "{:?}", results.results.iter().find(|r| r.code != 0));
    }
}

/// Every binding (vm_ip text → fe_id) and the revision of the last page.
async fn listing(c: &mut Clients) -> (BTreeMap<String, String>, u64) {
    let (mut all, mut token, mut revision) = (BTreeMap::new(), String::new(), 0);
    loop {
        let page = c
            .binding
            .list_bindings(ListBindingsRequest { page_size: 10_000, page_token: token, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.bindings.into_iter().map(|b| (b.vm_ip, b.fe_id)));
        revision = revision.max(page.revision);
        if page.next_page_token.is_empty() {
            return (all, revision);
        }
        token = page.next_page_token;
    }
}

/// An agent's view of the stream: per VM, the entry with the highest revision.
#[derive(Default)]
struct AgentView {
    bindings: BTreeMap<String, (u64, Option<String>)>,
    revision: u64,
    largest_message: usize,
    messages: usize,
}

impl AgentView {
    fn apply(&mut self, m: &SyncUpdate) {
        self.largest_message = self.largest_message.max(m.encoded_len());
        self.messages += 1;
        if m.reset {
            self.bindings.clear();
        }
        let ip = |b: &[u8]| victor_proto::types::ip_from_bytes(b).unwrap().to_string();
        let mut keep = |key: String, revision: u64, value: Option<String>| {
            let slot = self.bindings.entry(key).or_insert((0, None));
            if revision > slot.0 {
                *slot = (revision, value);
            }
        };
        for b in &m.binding_upserts {
            keep(ip(&b.vm_ip), b.revision, Some(b.fe_id.clone()));
        }
        for r in &m.binding_removals {
            keep(ip(&r.vm_ip), r.revision, None);
        }
        self.revision = self.revision.max(m.revision);
    }

    fn state(&self) -> BTreeMap<String, String> {
        self.bindings.iter().filter_map(|(ip, (_, fe))| fe.clone().map(|fe| (ip.clone(), fe))).collect()
    }
}

/// Compares two binding maps, naming a few differences rather than printing 20,000 entries.
fn assert_same(what: &str, got: &BTreeMap<String, String>, expected: &BTreeMap<String, String>) {
    let keys: std::collections::BTreeSet<&String> = got.keys().chain(expected.keys()).collect();
    let differ: Vec<_> = keys.into_iter().filter(|k| got.get(*k) != expected.get(*k)).collect();
    assert!(
        differ.is_empty(),
        "{what} differs from the cluster's in {} bindings, e.g. {:?}",
        differ.len(),
        differ
            .iter()
            .take(3)
            .map(|k| (k, got.get(*k).map(|f| &f[..3]), expected.get(*k).map(|f| &f[..3])))
            .collect::<Vec<_>>()
    );
}

async fn next(stream: &mut tonic::Streaming<SyncUpdate>) -> SyncUpdate {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("stream message in time")
        .expect("stream error")
        .expect("stream ended")
}

#[tokio::test]
async fn snapshot_messages_are_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;
    let fe = long_fe('a');
    register(&mut c, &fe, 1, "site-with-a-name").await;
    bind_many(&mut c, &fe, 20_000, unix_nanos()).await;

    let mut stream = c.agent.sync(SyncRequest { fe_id: fe.clone(), from_revision: 0 }).await.unwrap().into_inner();
    let mut view = AgentView::default();
    loop {
        let m = next(&mut stream).await;
        view.apply(&m);
        if m.phase == SyncPhase::SnapshotEnd as i32 {
            break;
        }
    }
    println!("Sync snapshot: {} messages, largest {} bytes", view.messages, view.largest_message);
    assert_eq!(view.state().len(), 20_000);
    assert!(view.largest_message <= PART_LIMIT, "a {}-byte snapshot message", view.largest_message);
    assert!(view.messages >= 20, "the 2 MB snapshot came in {} messages", view.messages);

    let request = WatchBindingsRequest { include_snapshot: true, ..Default::default() };
    let mut watch = c.binding.watch_bindings(request).await.unwrap().into_inner();
    let (mut events, mut largest, mut messages) = (0, 0, 0);
    loop {
        let m = watch.message().await.unwrap().unwrap();
        largest = largest.max(m.encoded_len());
        messages += 1;
        events += m.events.len();
        if m.snapshot_done {
            break;
        }
    }
    println!("WatchBindings snapshot: {messages} messages, largest {largest} bytes");
    assert_eq!(events, 20_000);
    assert!(largest <= PART_LIMIT, "a {largest}-byte watch snapshot message");
}

#[tokio::test]
async fn a_snapshot_read_while_bindings_move_ends_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &[]).await;
    let mut c = connect(server.grpc_addr).await;
    let (fe1, fe2) = (long_fe('a'), long_fe('b'));
    register(&mut c, &fe1, 1, "a").await;
    register(&mut c, &fe2, 2, "a").await;
    let t0 = unix_nanos();
    bind_many(&mut c, &fe1, 20_000, t0).await;
    // Moves of every 97th VM, spread over the whole address range, so that some land in parts
    // the stream has already read and some in parts still to come.
    let moves: Vec<u32> = (0..20_000).step_by(97).collect();
    let move_all = |c: Clients| {
        let moves = moves.clone();
        let fe2 = fe2.clone();
        async move {
            let mut c = c;
            for batch in moves.chunks(50) {
                let observations = batch
                    .iter()
                    .map(|&i| {
                        let mac = victor_proto::Mac([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
                        observation(&vm_ip(i), mac, ObservationKind::Learned, t0 + 1_000_000_000)
                    })
                    .collect();
                let r = c.agent.report(ReportRequest { fe_id: fe2.clone(), observations }).await.unwrap();
                assert!(r.into_inner().results.iter().all(|r| r.outcome == ClaimOutcome::Moved as i32));
            }
        }
    };

    // A client with HTTP/2's default 64 KiB windows (tonic's are megabytes), so the server can
    // only run a few parts ahead of what the test has read.
    // (One connection per stream: unread data of one stream would hold the connection window
    // of the other.)
    let slow_channel = || async {
        tonic::transport::Channel::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .unwrap()
    };
    let mut slow_agent = victor_proto::v1::agent_service_client::AgentServiceClient::new(slow_channel().await);
    let mut slow_binding = victor_proto::v1::binding_service_client::BindingServiceClient::new(slow_channel().await);
    // The agent stream: one part read, then the moves, then the rest.
    let request = SyncRequest { fe_id: fe1.clone(), from_revision: 0 };
    let mut stream = slow_agent.sync(request).await.unwrap().into_inner();
    let mut view = AgentView::default();
    let first = next(&mut stream).await;
    assert_eq!(first.phase, SyncPhase::Snapshot as i32, "the snapshot has several parts");
    view.apply(&first);
    // The watch, likewise.
    let request = WatchBindingsRequest { include_snapshot: true, ..Default::default() };
    let mut watch = slow_binding.watch_bindings(request).await.unwrap().into_inner();
    let mut watched: BTreeMap<String, String> = BTreeMap::new();
    let apply_watch = |watched: &mut BTreeMap<String, String>, m: &WatchBindingsResponse| {
        for e in &m.events {
            let b = e.binding.as_ref().unwrap();
            if e.kind == BindingEventKind::Remove as i32 {
                watched.remove(&b.vm_ip);
            } else {
                watched.insert(b.vm_ip.clone(), b.fe_id.clone());
            }
        }
    };
    let m = watch.message().await.unwrap().unwrap();
    assert!(!m.snapshot_done);
    apply_watch(&mut watched, &m);

    move_all(c.clone()).await;
    let (expected, listed_at) = listing(&mut c).await;
    assert_eq!(expected.values().filter(|fe| **fe == fe2).count(), moves.len());

    let end = loop {
        let m = next(&mut stream).await;
        view.apply(&m);
        if m.phase == SyncPhase::SnapshotEnd as i32 {
            break m.revision;
        }
    };
    // Nothing changed after the listing, so the snapshot ends at or after it.
    assert!(end >= listed_at, "snapshot ended at {end}, the listing was at {listed_at}");
    assert_same("the agent's state after SNAPSHOT_END", &view.state(), &expected);

    let done = loop {
        let m = watch.message().await.unwrap().unwrap();
        apply_watch(&mut watched, &m);
        if m.snapshot_done {
            break m.revision;
        }
    };
    assert!(done >= listed_at);
    assert_same("the watcher's state after snapshot_done", &watched, &expected);
}

#[tokio::test]
async fn a_snapshot_waiting_for_its_turn_keeps_its_stream_alive() {
    // At 32 KiB/s every 64 KiB part waits two seconds, longer than an agent's 1.5 s stream
    // timeout: the stream sends empty snapshot parts meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let server = embedded(dir.path(), &["--snapshot-rate", "32KiB"]).await;
    let mut c = connect(server.grpc_addr).await;
    let fe = long_fe('k');
    register(&mut c, &fe, 1, "a").await;
    bind_many(&mut c, &fe, 2_000, unix_nanos()).await;
    let mut stream = c.agent.sync(SyncRequest { fe_id: fe.clone(), from_revision: 0 }).await.unwrap().into_inner();
    let mut view = AgentView::default();
    let (mut empty, mut last, mut longest_gap) = (0, std::time::Instant::now(), Duration::ZERO);
    loop {
        let m = next(&mut stream).await;
        longest_gap = longest_gap.max(last.elapsed());
        last = std::time::Instant::now();
        if m.phase == SyncPhase::Snapshot as i32 && m.binding_upserts.is_empty() && m.fe_upserts.is_empty() {
            empty += 1;
        }
        view.apply(&m);
        if m.phase == SyncPhase::SnapshotEnd as i32 {
            break;
        }
    }
    println!("{} messages, {empty} empty parts, longest silence {longest_gap:?}", view.messages);
    assert!(empty >= 2, "no keep-alive parts while the snapshot waited for the lane");
    assert_eq!(view.state().len(), 2_000, "the keep-alive parts disturbed the snapshot");
}

#[tokio::test]
async fn streams_over_a_limit_are_refused_with_the_limit_named() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ["--max-streams-per-connection", "4", "--max-agent-streams", "6", "--max-watch-streams", "2"];
    let server = embedded(dir.path(), &limits).await;
    let mut a = connect(server.grpc_addr).await;
    register(&mut a, "fe1", 1, "a").await;
    let sync = |c: &Clients| {
        let mut agent = c.agent.clone();
        async move { agent.sync(SyncRequest { fe_id: "fe1".into(), from_revision: 0 }).await }
    };
    let watch = |c: &Clients| {
        let mut binding = c.binding.clone();
        async move { binding.watch_bindings(WatchBindingsRequest::default()).await }
    };
    fn refused<T>(result: Result<T, tonic::Status>, flag: &str) {
        let Err(err) = result else { panic!("{flag}: admitted") };
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        assert!(err.message().contains(flag), "{flag}: {}", err.message());
    }

    let mut on_a = Vec::new();
    for _ in 0..4 {
        on_a.push(sync(&a).await.unwrap().into_inner());
    }
    refused(sync(&a).await, "--max-streams-per-connection=4");
    refused(watch(&a).await, "--max-streams-per-connection=4");

    let b = connect(server.grpc_addr).await;
    let b1 = sync(&b).await.unwrap();
    let _b2 = sync(&b).await.unwrap();
    refused(sync(&b).await, "--max-agent-streams=6");
    let _w1 = watch(&b).await.unwrap();
    let _w2 = watch(&b).await.unwrap();
    let c = connect(server.grpc_addr).await;
    refused(watch(&c).await, "--max-watch-streams=2");

    // A closed stream frees its place (once the server noticed).
    drop(b1);
    let reopened = victor_testkit::process::wait_for("a place freed", Duration::from_secs(5), || {
        let c = c.clone();
        async move { sync(&c).await.ok() }
    })
    .await;
    assert!(reopened.is_ok(), "closing a stream did not free its place");
    let (_, metrics) = victor_testkit::http::get(server.http_addr, "/metrics").await.unwrap();
    for (limit, n) in [("connection", 2.0), ("agent", 1.0), ("watch", 1.0)] {
        let counted =
            victor_testkit::http::metric(&metrics, "victor_streams_refused_total", &format!("limit=\"{limit}\""));
        assert!(counted >= n, "{limit}: {counted}");
    }
    // The streams that were admitted still work.
    let first = next(&mut on_a[0]).await;
    assert_eq!(first.phase, SyncPhase::SnapshotEnd as i32);
}
