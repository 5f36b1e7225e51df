//! The registry on a real (embedded) store with its replica cache, in the registry's own terms:
//! observations in, [`Claim`]s, [`Rejection`]s and [`RegistryError`]s out — no wire types.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use victor_store::embedded::{EmbeddedOptions, EmbeddedStore};

use super::*;
use crate::cache::loader;
use crate::keys::Keys;
use crate::lease::KeptLease;
use crate::metrics::{FamilyLabel, ReasonLabel};

const S: i64 = 1_000_000_000;

/// A registry over a fresh embedded store, its cache fed by the replica's loader.
struct Rig {
    registry: Registry<EmbeddedStore>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    timelines: Arc<MoveTimelines>,
    reachable: Arc<AtomicBool>,
    _shutdown: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"), EmbeddedOptions::default()).await.unwrap();
        let cache = Cache::new(Keys::new("/t"), 10_000);
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let presence = loader::Presence {
            replica_id: "r1".into(),
            grpc_addr: String::new(),
            lease: KeptLease::new(store.clone(), Duration::from_secs(5)),
        };
        tokio::spawn(loader::run(store.clone(), cache.clone(), presence, shutdown_rx));
        while !cache.is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let metrics = Arc::new(Metrics::new());
        let timelines = Arc::new(MoveTimelines::new(64));
        let reachable = Arc::new(AtomicBool::new(true));
        let registry = Registry::new(store, cache.clone(), Rules::default(), metrics.clone(), timelines.clone())
            .with_reachability(reachable.clone());
        Rig { registry, cache, metrics, timelines, reachable, _shutdown: shutdown, _dir: dir }
    }

    /// Registers FE `fe_id` (underlay 192.0.2.`n`, site `site`) and returns it as the cache sees it.
    async fn fe(&self, fe_id: &str, n: u8, site: &str) -> FeView {
        let reg = FeRegistration {
            fe_id: fe_id.into(),
            underlay: IpAddr::from([192, 0, 2, n]),
            site: site.into(),
            mobile_prefixes: vec!["10.10.0.0/16".into()],
            agent_version: "test".into(),
        };
        let revision = self.registry.register_fe(reg, Duration::from_secs(30), "r1").await.unwrap();
        self.settle(revision).await;
        self.registry.registered_fe(fe_id).await.unwrap().expect("registered")
    }

    async fn settle(&self, revision: Revision) {
        assert!(self.cache.wait_for(revision, Duration::from_secs(5)).await, "cache reached {revision}");
    }

    /// Reports one observation by `fe` and waits until the cache shows what it wrote.
    async fn observe(&self, fe: &FeView, obs: ValidObservation) -> RegistryResult<Claim> {
        let claim = self.registry.observe(fe, obs, monotonic_ns()).await;
        if let Ok(c) = &claim {
            self.settle(c.revision).await;
        }
        claim
    }

    fn bound_fe(&self, ip: IpAddr) -> Option<String> {
        self.cache.read(|s| s.bindings.get(&ip).map(|b| b.fe_id.to_string()))
    }

    fn rejected(&self, reason: Reason) -> u64 {
        let count =
            |family| self.metrics.claims_rejected.get_or_create(&ReasonLabel { reason: reason.label(), family }).get();
        count("ipv4") + count("ipv6")
    }
}

fn vm(last: u8) -> IpAddr {
    IpAddr::from([10, 10, 0, last])
}

fn mac(last: u8) -> Mac {
    Mac([2, 0, 0, 0, 0, last])
}

/// A LEARNED that does not say what its FE knew (other FEs' reports order by arrival).
fn learned(last: u8, observed_at: i64) -> ValidObservation {
    ValidObservation { ip: vm(last), mac: mac(last), kind: Observed::Learned, observed_at, known_revision: None }
}

/// A LEARNED made knowing revision `known`.
fn learned_knowing(last: u8, observed_at: i64, known: Revision) -> ValidObservation {
    ValidObservation { known_revision: Some(known), ..learned(last, observed_at) }
}

fn gone(last: u8, observed_at: i64) -> ValidObservation {
    ValidObservation { kind: Observed::Gone, ..learned(last, observed_at) }
}

fn rejection(result: RegistryResult<Revision>) -> Rejection {
    match result {
        Err(RegistryError::Rejected(r)) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn a_claim_binds_a_newer_one_moves_and_a_stale_one_is_refused() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await);
    let now = now_unix_nanos();

    let bound = rig.observe(&fe1, learned(11, now - 10 * S)).await.unwrap();
    assert_eq!((bound.outcome, bound.move_seq), (ClaimOutcome::Bound, 0));
    assert!(bound.revision > 0);
    let moved = rig.observe(&fe2, learned_knowing(11, now - 50 * S, bound.revision)).await.unwrap();
    assert_eq!((moved.outcome, moved.move_seq), (ClaimOutcome::Moved, 1));
    assert!(moved.revision > bound.revision);
    assert_eq!(rig.bound_fe(vm(11)).as_deref(), Some("fe2"));
    // The move's timeline starts at commit.
    let timeline = rig.timelines.list(Some(vm(11))).pop().expect("timeline of the move");
    assert_eq!((timeline.move_seq, timeline.fe_id.as_str(), timeline.revision), (1, "fe2", moved.revision));

    // fe1's report made before the move arrives late (its clock ahead): refused, nothing written;
    // the answer names the revision fe1 must know before it observes again.
    let late = rig.observe(&fe1, learned_knowing(11, now + 60 * S, bound.revision)).await.unwrap();
    let ClaimOutcome::Rejected(r) = &late.outcome else { panic!("{late:?}") };
    assert_eq!((r.reason, r.refusal), (Reason::Stale, Refusal::Precondition));
    assert_eq!((late.move_seq, late.revision), (1, moved.revision), "the current binding's move_seq; no write");
    assert_eq!(rig.bound_fe(vm(11)).as_deref(), Some("fe2"));
    assert_eq!(rig.rejected(Reason::Stale), 1);

    // Only the FE the VM is bound to can remove it.
    let not_here = rig.observe(&fe1, gone(11, now)).await.unwrap();
    assert!(matches!(not_here.outcome, ClaimOutcome::Rejected(Rejection { reason: Reason::NotBoundHere, .. })));
    let removed = rig.observe(&fe2, gone(11, now)).await.unwrap();
    assert_eq!((removed.outcome, removed.move_seq), (ClaimOutcome::Removed, 0));
    assert_eq!(rig.bound_fe(vm(11)), None);
}

#[tokio::test]
async fn removals_leave_tombstones_that_only_the_registry_sees_until_they_are_collected() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await);
    let now = now_unix_nanos();
    let bound = rig.observe(&fe1, learned_knowing(12, now, 0)).await.unwrap();
    let removed =
        rig.observe(&fe1, ValidObservation { known_revision: Some(bound.revision), ..gone(12, now + S) }).await;
    let removed = removed.unwrap();
    assert_eq!(removed.outcome, ClaimOutcome::Removed);
    // No binding to readers and agents; the tombstone stays for the registry.
    assert_eq!(rig.bound_fe(vm(12)), None);
    let tombstone = rig.cache.read(|s| s.tombstones.get(&vm(12)).cloned()).expect("tombstone");
    assert_eq!((tombstone.fe_id.as_ref(), tombstone.revision, tombstone.removed), ("fe1", removed.revision, true));
    // Reports made before the removal cannot bring the binding back.
    let late = rig.observe(&fe1, learned_knowing(12, now + S / 2, bound.revision)).await.unwrap();
    assert!(matches!(late.outcome, ClaimOutcome::Rejected(Rejection { reason: Reason::Stale, .. })), "{late:?}");
    let late = rig.observe(&fe2, learned_knowing(12, now + 99 * S, bound.revision)).await.unwrap();
    assert!(matches!(late.outcome, ClaimOutcome::Rejected(Rejection { reason: Reason::Stale, .. })), "{late:?}");
    assert_eq!(late.revision, removed.revision);

    // Housekeeping collects it (not before its time) and the horizon remembers the removal.
    assert_eq!(rig.registry.collect_tombstones(&[vm(12)], tombstone.committed_at).await.unwrap().0, 0);
    let (n, at) = rig.registry.collect_tombstones(&[vm(12)], tombstone.committed_at + 1).await.unwrap();
    assert_eq!(n, 1);
    rig.settle(at).await;
    assert_eq!(rig.cache.read(|s| (s.tombstones.len(), s.tombstone_horizon.0)), (0, removed.revision));
    assert_eq!(rig.metrics.tombstones_collected.get_or_create(&FamilyLabel { family: "ipv4" }).get(), 1);
    let late = rig.observe(&fe2, learned_knowing(12, now + 99 * S, bound.revision)).await.unwrap();
    let ClaimOutcome::Rejected(r) = &late.outcome else { panic!("{late:?}") };
    assert!(r.message.contains("no longer remembered"), "{}", r.message);
    assert_eq!(late.revision, removed.revision, "wait for the horizon");
    // Observed knowing the horizon: bound again.
    let again = rig.observe(&fe2, learned_knowing(12, now, removed.revision)).await.unwrap();
    assert_eq!(again.outcome, ClaimOutcome::Bound);
    assert_eq!(rig.bound_fe(vm(12)).as_deref(), Some("fe2"));
}

#[tokio::test]
async fn several_observations_of_a_vm_in_one_report_commit_once_in_observation_order() {
    let rig = Rig::new().await;
    let fe1 = rig.fe("fe1", 1, "a").await;
    let t = now_unix_nanos();
    rig.observe(&fe1, learned(13, t)).await.unwrap();
    // Bound at t; [GONE t+2, LEARNED t+1] in one report (listed out of order): removed.
    let report = vec![Ok(gone(13, t + 2 * S)), Ok(learned(14, t)), Ok(learned(13, t + S))];
    let claims: Vec<Claim> =
        rig.registry.report(&fe1, report, monotonic_ns()).await.into_iter().map(|c| c.unwrap()).collect();
    assert_eq!(
        claims.iter().map(|c| c.outcome.clone()).collect::<Vec<_>>(),
        vec![ClaimOutcome::Removed, ClaimOutcome::Bound, ClaimOutcome::Unchanged],
        "answers in request order"
    );
    assert_eq!(claims[0].revision, claims[2].revision, "one write for VM .13");
    rig.settle(claims[0].revision.max(claims[1].revision)).await;
    assert_eq!((rig.bound_fe(vm(13)), rig.bound_fe(vm(14)).as_deref()), (None, Some("fe1")));
    // A new VM with [LEARNED t, GONE t+1]: bound and removed in the same write.
    let report = vec![Ok(learned(15, t)), Ok(gone(15, t + S))];
    let claims: Vec<Claim> =
        rig.registry.report(&fe1, report, monotonic_ns()).await.into_iter().map(|c| c.unwrap()).collect();
    assert_eq!((claims[0].outcome.clone(), claims[1].outcome.clone()), (ClaimOutcome::Bound, ClaimOutcome::Removed));
    rig.settle(claims[1].revision).await;
    assert_eq!(rig.bound_fe(vm(15)), None);
}

#[tokio::test]
async fn a_report_answers_in_order_and_refuses_invalid_observations_without_writing() {
    let rig = Rig::new().await;
    let fe1 = rig.fe("fe1", 1, "a").await;
    let now = now_unix_nanos();
    let invalid = Rejection::new(Reason::OutsideMobilePrefix, Refusal::Invalid, "outside");
    let observations: Vec<Result<ValidObservation, Rejection>> =
        (1..=40u8).map(|i| if i % 10 == 0 { Err(invalid.clone()) } else { Ok(learned(i, now)) }).collect();
    let before = rig.registry.store().current_revision().await.unwrap();
    let claims = rig.registry.report(&fe1, observations, monotonic_ns()).await;
    assert_eq!(claims.len(), 40);
    for (i, claim) in (1..=40u8).zip(&claims) {
        let claim = claim.as_ref().unwrap();
        if i % 10 == 0 {
            assert_eq!(claim, &Claim::refused(invalid.clone()), "observation {i}");
        } else {
            assert_eq!(claim.outcome, ClaimOutcome::Bound, "observation {i}");
        }
    }
    let last = claims.iter().filter_map(|c| c.as_ref().ok()).map(|c| c.revision).max().unwrap();
    rig.settle(last).await;
    assert_eq!(rig.cache.read(|s| s.bindings.len()), 36);
    assert_eq!((rig.bound_fe(vm(10)), rig.bound_fe(vm(9)).as_deref()), (None, Some("fe1")));
    // Refused by validation: the caller counts them (it knows the IPs' family), not the registry.
    assert_eq!(rig.rejected(Reason::OutsideMobilePrefix), 0);
    // Group commit: 36 claims, fewer transactions.
    assert!(rig.registry.store().current_revision().await.unwrap() - before < 36);
}

#[tokio::test]
async fn concurrent_claims_from_many_fes_leave_one_winner_and_the_others_wait_for_it() {
    let rig = Rig::new().await;
    let mut fes = Vec::new();
    for n in 1..=6u8 {
        fes.push(rig.fe(&format!("fe{n}"), n, "a").await);
    }
    let known = rig.registry.store().current_revision().await.unwrap();
    // Every FE claims VM .21 at once, none knowing of the others' claims (their clocks disagree
    // wildly): the first to commit wins, every other one is STALE and names the winner's revision
    // (its agent probes the VM once it knows it: only where the VM really is does it answer).
    let claims = futures::future::join_all(fes.iter().enumerate().map(|(n, fe)| {
        let at = now_unix_nanos() + (n as i64 - 3) * 10 * S;
        rig.registry.observe(fe, learned_knowing(21, at, known), monotonic_ns())
    }))
    .await;
    let claims: Vec<Claim> = claims.into_iter().map(|c| c.unwrap()).collect();
    let winners: Vec<usize> = (0..6).filter(|n| claims[*n].outcome == ClaimOutcome::Bound).collect();
    assert_eq!(winners.len(), 1, "{claims:?}");
    let winner = &claims[winners[0]];
    rig.settle(winner.revision).await;
    assert_eq!(rig.bound_fe(vm(21)), Some(format!("fe{}", winners[0] + 1)));
    for (n, claim) in claims.iter().enumerate().filter(|(n, _)| *n != winners[0]) {
        assert!(
            matches!(&claim.outcome, ClaimOutcome::Rejected(r) if r.reason == Reason::Stale)
                && claim.revision == winner.revision,
            "fe{}: {claim:?}",
            n + 1
        );
    }
    // The loser where the VM really is observes again knowing the winner's revision: it moves.
    let loser = (winners[0] + 1) % 6;
    let moved = rig.observe(&fes[loser], learned_knowing(21, now_unix_nanos(), winner.revision)).await.unwrap();
    assert_eq!((moved.outcome, moved.move_seq), (ClaimOutcome::Moved, 1));
}

#[tokio::test]
async fn nothing_is_sent_while_the_store_is_unreachable() {
    let rig = Rig::new().await;
    let fe1 = rig.fe("fe1", 1, "a").await;
    rig.reachable.store(false, Ordering::Relaxed);
    let before = rig.registry.store().current_revision().await.unwrap();
    let err = rig.registry.observe(&fe1, learned(11, now_unix_nanos()), monotonic_ns()).await.unwrap_err();
    assert!(matches!(err, RegistryError::StoreUnreachable), "{err:?}");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    let err = rig.registry.declare(vm(12), VmRecord { mac: mac(12).octets().to_vec(), ..Default::default() }).await;
    assert!(matches!(err, Err(RegistryError::StoreUnreachable)), "{err:?}");
    assert_eq!(rig.registry.store().current_revision().await.unwrap(), before);
    assert_eq!(rig.metrics.store_unavailable.get(), 2);
    assert_eq!(
        rig.metrics.claims.get_or_create(&crate::metrics::OutcomeLabel { outcome: "rejected", family: "ipv4" }).get(),
        1
    );

    rig.reachable.store(true, Ordering::Relaxed);
    let bound = rig.observe(&fe1, learned(11, now_unix_nanos())).await.unwrap();
    assert_eq!(bound.outcome, ClaimOutcome::Bound);
}

#[tokio::test]
async fn declarations_guard_claims_and_cannot_orphan_a_binding() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "b").await);
    let decl = VmRecord { mac: mac(31).octets().to_vec(), allowed_sites: vec!["a".into()], description: "db".into() };
    rig.settle(rig.registry.declare(vm(31), decl.clone()).await.unwrap()).await;

    // A claim with another MAC, or from a site the policy excludes, is refused.
    let spoofed = ValidObservation { mac: mac(99), ..learned(31, now_unix_nanos()) };
    let claim = rig.observe(&fe1, spoofed).await.unwrap();
    assert!(matches!(
        claim.outcome,
        ClaimOutcome::Rejected(Rejection { reason: Reason::MacMismatch, refusal: Refusal::Forbidden, .. })
    ));
    let claim = rig.observe(&fe2, learned(31, now_unix_nanos())).await.unwrap();
    assert!(matches!(claim.outcome, ClaimOutcome::Rejected(Rejection { reason: Reason::SitePolicy, .. })));
    assert_eq!(rig.observe(&fe1, learned(31, now_unix_nanos())).await.unwrap().outcome, ClaimOutcome::Bound);

    // Re-declaring the bound VM with another MAC is refused; the declaration stays.
    let other = VmRecord { mac: mac(32).octets().to_vec(), ..decl.clone() };
    let r = rejection(rig.registry.declare(vm(31), other).await);
    assert_eq!((r.reason, r.refusal), (Reason::MacMismatch, Refusal::Precondition));
    assert_eq!(rig.cache.read(|s| s.vms.get(&vm(31)).map(|v| v.record.clone())), Some(decl));

    // Undeclaring with the binding removes both (a tombstone remains); a second time there is
    // nothing to remove.
    rig.settle(rig.registry.undeclare(vm(31), true).await.unwrap()).await;
    assert_eq!(rig.bound_fe(vm(31)), None);
    let tombstone = rig.cache.read(|s| s.tombstones.get(&vm(31)).cloned()).expect("tombstone");
    assert_eq!(tombstone.fe_id.as_ref(), "", "removed by the controller");
    let r = rejection(rig.registry.undeclare(vm(31), true).await);
    assert_eq!((r.refusal, r.message.as_str()), (Refusal::Absent, "VM 10.10.0.31 is not declared"));
}

#[tokio::test]
async fn announcements_pend_commit_and_expire() {
    let rig = Rig::new().await;
    let (fe1, _fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await);
    let hour = Duration::from_secs(3600);
    let r = rejection(rig.registry.announce(vm(41), "fe9", false, hour).await);
    assert_eq!(
        (r.refusal, r.message.as_str()),
        (Refusal::Absent, "FE \"fe9\" is not registered (ListFes shows the registered FEs)")
    );

    rig.observe(&fe1, learned(41, now_unix_nanos())).await.unwrap();
    rig.settle(rig.registry.announce(vm(41), "fe2", false, hour).await.unwrap()).await;
    let pending = |rig: &Rig| rig.cache.read(|s| s.bindings.get(&vm(41)).map(|b| b.pending_fe_id().to_owned()));
    assert_eq!(pending(&rig).as_deref(), Some("fe2"));
    // Not expired yet: housekeeping leaves it.
    assert_eq!(rig.registry.expire_announcement(vm(41)).await.unwrap(), 0);
    assert_eq!(pending(&rig).as_deref(), Some("fe2"));

    // With commit the binding moves now, as the orchestrator's move.
    rig.settle(rig.registry.announce(vm(41), "fe2", true, hour).await.unwrap()).await;
    assert_eq!(rig.bound_fe(vm(41)).as_deref(), Some("fe2"));
    assert_eq!(pending(&rig).as_deref(), Some(""));
    let source = rig.cache.read(|s| s.bindings.get(&vm(41)).map(|b| b.source)).unwrap();
    assert_eq!(i32::from(source), crate::records::BindingSource::Orchestrator as i32);

    // An announcement whose time is up is dropped by housekeeping.
    rig.settle(rig.registry.announce(vm(41), "fe1", false, Duration::ZERO).await.unwrap()).await;
    assert_eq!(pending(&rig).as_deref(), Some("fe1"));
    rig.settle(rig.registry.expire_announcement(vm(41)).await.unwrap()).await;
    assert_eq!(pending(&rig).as_deref(), Some(""));
}

#[tokio::test]
async fn damping_freezes_and_only_a_clear_or_the_hold_thaws() {
    let rig = Rig::new().await;
    let fes = [rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await];
    let r = rejection(rig.registry.clear_damping(vm(51)).await);
    assert_eq!((r.refusal, r.message.as_str()), (Refusal::Absent, "VM 10.10.0.51 has no binding"));

    // The default policy allows 5 moves in the window; the 6th freezes the binding.
    let start = now_unix_nanos() - 60 * S;
    for i in 0..=6 {
        rig.observe(&fes[i % 2], learned(51, start + i as i64 * S)).await.unwrap();
    }
    let frozen = |rig: &Rig| rig.cache.read(|s| s.bindings.get(&vm(51)).map(|b| b.frozen)).unwrap();
    assert!(frozen(&rig));
    assert_eq!(rig.metrics.damping_frozen.get_or_create(&FamilyLabel { family: "ipv4" }).get(), 1);
    let claim = rig.observe(&fes[1], learned(51, start + 10 * S)).await.unwrap();
    assert!(matches!(claim.outcome, ClaimOutcome::Rejected(Rejection { reason: Reason::Damped, .. })));

    rig.settle(rig.registry.clear_damping(vm(51)).await.unwrap()).await;
    assert!(!frozen(&rig));
    let r = rejection(rig.registry.clear_damping(vm(51)).await);
    assert_eq!(r.refusal, Refusal::Precondition, "{}", r.message);
    // Thawing a binding that is not frozen writes nothing.
    assert_eq!(rig.registry.thaw(vm(51)).await.unwrap(), 0);
}

#[tokio::test]
async fn housekeeping_removes_a_binding_only_from_the_fe_it_names() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await);
    rig.observe(&fe1, learned(61, now_unix_nanos())).await.unwrap();
    rig.observe(&fe2, learned(62, now_unix_nanos())).await.unwrap();
    assert_eq!(rig.registry.remove_if_bound_to(vm(61), "fe2").await.unwrap(), 0);
    rig.settle(rig.registry.remove_if_bound_to(vm(62), "fe2").await.unwrap()).await;
    assert_eq!((rig.bound_fe(vm(61)).as_deref(), rig.bound_fe(vm(62))), (Some("fe1"), None));
    assert!(rig.cache.read(|s| s.tombstones.contains_key(&vm(62))), "the removal is remembered");
    // fe2's report from before it went down does not bring it back.
    let known = rig.cache.read(|s| s.tombstones[&vm(62)].revision) - 1;
    let late = rig.observe(&fe2, learned_knowing(62, now_unix_nanos(), known)).await.unwrap();
    assert!(matches!(late.outcome, ClaimOutcome::Rejected(Rejection { reason: Reason::Stale, .. })), "{late:?}");
}

#[tokio::test]
async fn fes_need_their_own_underlay_and_a_live_session() {
    let rig = Rig::new().await;
    let fe1 = rig.fe("fe1", 1, "a").await;
    assert_eq!(rig.registry.registered_fe("fe9").await.unwrap(), None);
    let clash = FeRegistration {
        fe_id: "fe2".into(),
        underlay: fe1.underlay,
        site: "a".into(),
        mobile_prefixes: vec![],
        agent_version: String::new(),
    };
    let r = rejection(rig.registry.register_fe(clash, Duration::from_secs(30), "r1").await);
    assert_eq!(r.refusal, Refusal::Precondition);
    assert!(r.message.contains("already registered by FE fe1"), "{}", r.message);

    assert_eq!(rig.registry.keep_session_alive(&fe1).await.unwrap(), Some(Duration::from_secs(30)));
    rig.registry.store().lease_revoke(fe1.record.session_lease).await.unwrap();
    assert_eq!(rig.registry.keep_session_alive(&fe1).await.unwrap(), None, "the session expired");
}

/// A MAC claim by `fe` of `m`, made knowing `known`, admitting every IP; waits for its write.
async fn claim_mac(rig: &Rig, fe: &FeView, m: Mac, at: i64, known: Option<Revision>) -> Claim {
    let claim = ValidMacClaim { mac: m, observed_at: at, known_revision: known };
    let answer = rig.registry.claim_mac(fe, claim, |_| Ok(()), monotonic_ns()).await.unwrap();
    rig.settle(answer.revision).await;
    answer
}

fn expanded(claim: &Claim) -> Vec<(IpAddr, ClaimOutcome, Revision)> {
    match &claim.outcome {
        ClaimOutcome::Expanded(ips) => ips.iter().map(|(ip, c)| (*ip, c.outcome.clone(), c.revision)).collect(),
        other => panic!("expected an expanded MAC claim, got {other:?}"),
    }
}

/// An IPv6 VM address.
fn vm6(last: u8) -> IpAddr {
    IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, u16::from(last)])
}

#[tokio::test]
async fn a_mac_claim_moves_every_ip_bound_or_declared_with_the_mac_in_one_commit() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await);
    let t = now_unix_nanos();
    // A dual-stack VM bound at fe1 (IPv4 and IPv6), an address declared with its MAC but never
    // seen, and another VM.
    rig.observe(&fe1, learned(11, t)).await.unwrap();
    let v6 = ValidObservation { ip: vm6(11), ..learned(11, t) };
    let last = rig.observe(&fe1, v6).await.unwrap();
    let decl = VmRecord { mac: mac(11).octets().to_vec(), ..Default::default() };
    rig.settle(rig.registry.declare(vm(12), decl).await.unwrap()).await;
    rig.observe(&fe1, learned(13, t)).await.unwrap();

    let claim = claim_mac(&rig, &fe2, mac(11), t + S, Some(last.revision.max(rig.cache.revision()))).await;
    let r = claim.revision;
    assert!(r > 0);
    assert_eq!(
        expanded(&claim),
        vec![(vm(11), ClaimOutcome::Moved, r), (vm(12), ClaimOutcome::Bound, r), (vm6(11), ClaimOutcome::Moved, r)],
        "IPv4 first, every write at one revision"
    );
    for ip in [vm(11), vm(12), vm6(11)] {
        assert_eq!(rig.bound_fe(ip).as_deref(), Some("fe2"), "{ip}");
    }
    assert_eq!(rig.bound_fe(vm(13)).as_deref(), Some("fe1"), "another MAC's VM stays");
    // Claimed again at the same FE: nothing moves.
    let again = claim_mac(&rig, &fe2, mac(11), t + 2 * S, Some(r)).await;
    assert!(expanded(&again).iter().all(|(_, o, _)| *o == ClaimOutcome::Unchanged), "{again:?}");
    assert_eq!(rig.timelines.list(Some(vm6(11))).len(), 2, "the bind's and the move's timelines, not the refresh's");
}

#[tokio::test]
async fn a_stale_mac_claim_is_refused_per_ip_and_writes_nothing() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await);
    let t = now_unix_nanos();
    let first = rig.observe(&fe1, learned(21, t)).await.unwrap();
    let v6 = rig.observe(&fe1, ValidObservation { ip: vm6(21), ..learned(21, t) }).await.unwrap();
    // Made knowing only the IPv4 binding's revision: the IPv4 address moves, the IPv6 one (bound
    // later) is STALE with its revision — and the whole claim is one commit.
    let claim = claim_mac(&rig, &fe2, mac(21), t + S, Some(first.revision)).await;
    let answers = expanded(&claim);
    assert_eq!(answers[0], (vm(21), ClaimOutcome::Moved, claim.revision));
    let ClaimOutcome::Rejected(stale) = &answers[1].1 else { panic!("{answers:?}") };
    assert_eq!((stale.reason, answers[1].2), (Reason::Stale, v6.revision));
    // A third FE that knew too little for both: nothing is written, each names what to wait for.
    let fe3 = rig.fe("fe3", 3, "a").await;
    let back = claim_mac(&rig, &fe3, mac(21), t + 2 * S, Some(first.revision)).await;
    assert_eq!(back.revision, 0);
    assert!(
        expanded(&back).iter().all(|(_, o, _)| matches!(o, ClaimOutcome::Rejected(r) if r.reason == Reason::Stale)),
        "{back:?}"
    );
    assert_eq!(rig.bound_fe(vm(21)).as_deref(), Some("fe2"));
    assert_eq!(rig.bound_fe(vm6(21)).as_deref(), Some("fe1"));
    assert_eq!(rig.rejected(Reason::Stale), 3);
}

#[tokio::test]
async fn declared_vms_pin_their_mac_and_policy_and_unknown_macs_are_refused() {
    let rig = Rig::new().await;
    let (fe1, fe2) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "b").await);
    let t = now_unix_nanos();
    // 10.10.0.31 is declared with MAC 31 (site a only), 10.10.0.32 with MAC 31 anywhere;
    // 10.10.0.33 is bound with MAC 33 and declared with it.
    let pinned = VmRecord { mac: mac(31).octets().to_vec(), allowed_sites: vec!["a".into()], ..Default::default() };
    rig.settle(rig.registry.declare(vm(31), pinned).await.unwrap()).await;
    let anywhere = VmRecord { mac: mac(31).octets().to_vec(), ..Default::default() };
    rig.settle(rig.registry.declare(vm(32), anywhere).await.unwrap()).await;
    let known = rig.observe(&fe1, learned(33, t)).await.unwrap().revision;

    // fe2 is at site b: the pinned address is refused by policy, the other one binds.
    let claim = claim_mac(&rig, &fe2, mac(31), t, Some(known)).await;
    let answers = expanded(&claim);
    assert!(matches!(&answers[0].1, ClaimOutcome::Rejected(r) if r.reason == Reason::SitePolicy), "{answers:?}");
    assert_eq!(answers[1].1, ClaimOutcome::Bound);
    // Another MAC never moves 10.10.0.33; a MAC nobody has is refused as unknown, writing nothing.
    let unknown = claim_mac(&rig, &fe2, mac(99), t, Some(known)).await;
    assert!(
        matches!(&unknown.outcome, ClaimOutcome::Rejected(r) if (r.reason, r.refusal) == (Reason::UnknownMac, Refusal::Absent)),
        "{unknown:?}"
    );
    assert_eq!(rig.bound_fe(vm(33)).as_deref(), Some("fe1"));
    // An address the FE may not serve is refused alone.
    let outside = |ip: IpAddr| {
        if ip == vm(32) {
            Err(Rejection::new(Reason::OutsideMobilePrefix, Refusal::Invalid, "outside"))
        } else {
            Ok(())
        }
    };
    let claim = ValidMacClaim { mac: mac(33), observed_at: t + S, known_revision: Some(rig.cache.revision()) };
    let answer = rig.registry.claim_mac(&fe2, claim, outside, monotonic_ns()).await.unwrap();
    assert_eq!(expanded(&answer), vec![(vm(33), ClaimOutcome::Moved, answer.revision)]);
    let claim = ValidMacClaim { mac: mac(31), observed_at: t + S, known_revision: Some(answer.revision) };
    let answer = rig.registry.claim_mac(&fe1, claim, outside, monotonic_ns()).await.unwrap();
    let answers = expanded(&answer);
    assert_eq!(answers[0], (vm(31), ClaimOutcome::Bound, answer.revision));
    assert!(matches!(&answers[1].1, ClaimOutcome::Rejected(r) if r.reason == Reason::OutsideMobilePrefix));
}

#[tokio::test]
async fn a_mac_with_more_ips_than_one_claim_moves_is_refused_whole() {
    let rig = Rig::new().await;
    let fe1 = rig.fe("fe1", 1, "a").await;
    let t = now_unix_nanos();
    for i in 0..=MAX_MAC_IPS as u8 {
        let obs = ValidObservation { ip: vm(100 + i), mac: mac(7), ..learned(7, t) };
        rig.observe(&fe1, obs).await.unwrap();
    }
    let fe2 = rig.fe("fe2", 2, "a").await;
    let claim = claim_mac(&rig, &fe2, mac(7), t + S, Some(rig.cache.revision())).await;
    assert!(matches!(&claim.outcome, ClaimOutcome::Rejected(r) if r.reason == Reason::TooManyIps), "{claim:?}");
    assert_eq!(rig.bound_fe(vm(100)).as_deref(), Some("fe1"));
}

/// A MAC claim decided on a cache that has not seen the latest move yet (a second replica whose
/// cache stopped following the store): its transaction fails on the changed binding, the IP is
/// decided again on what the store holds, and the claim — made before that move was known — is
/// STALE naming the move's revision, never a move back.
#[tokio::test]
async fn a_mac_claim_decided_on_a_stale_cache_is_decided_again_on_the_store() {
    let rig = Rig::new().await;
    let (fe1, fe2, fe3) = (rig.fe("fe1", 1, "a").await, rig.fe("fe2", 2, "a").await, rig.fe("fe3", 3, "a").await);
    let t = now_unix_nanos();
    let first = rig.observe(&fe1, learned(41, t)).await.unwrap();
    // The second replica's cache has the binding at fe1, then stops following.
    let store = rig.registry.store().clone();
    let behind = Cache::new(Keys::new("/t"), 10_000);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let presence = loader::Presence {
        replica_id: "r2".into(),
        grpc_addr: String::new(),
        lease: KeptLease::new(store.clone(), Duration::from_secs(5)),
    };
    let following = tokio::spawn(loader::run(store.clone(), behind.clone(), presence, stopped));
    assert!(behind.wait_for(first.revision, Duration::from_secs(5)).await);
    stop.send(true).unwrap();
    let _ = following.await;
    let metrics = Arc::new(Metrics::new());
    let timelines = Arc::new(MoveTimelines::new(8));
    let replica2 = Registry::new(store, behind, Rules::default(), metrics.clone(), timelines);

    // fe2 takes the VM through the first replica.
    let moved = rig.observe(&fe2, learned_knowing(41, t, first.revision)).await.unwrap();
    assert_eq!(moved.outcome, ClaimOutcome::Moved);
    // fe3's RARP from before it knew that move, through the replica that does not know it either.
    let claim = ValidMacClaim { mac: mac(41), observed_at: t + S, known_revision: Some(first.revision) };
    let answer = replica2.claim_mac(&fe3, claim, |_| Ok(()), monotonic_ns()).await.unwrap();
    let answers = expanded(&answer);
    let ClaimOutcome::Rejected(r) = &answers[0].1 else { panic!("{answers:?}") };
    assert_eq!((r.reason, answers[0].2, answer.revision), (Reason::Stale, moved.revision, 0));
    assert_eq!(metrics.cas_retries.get(), 1, "decided on the cache, then once more on the store");
    assert_eq!(rig.bound_fe(vm(41)).as_deref(), Some("fe2"));
    // Knowing the move, the same claim moves it (decided on the store's values again).
    let claim = ValidMacClaim { mac: mac(41), observed_at: t + 2 * S, known_revision: Some(moved.revision) };
    let answer = replica2.claim_mac(&fe3, claim, |_| Ok(()), monotonic_ns()).await.unwrap();
    assert_eq!(expanded(&answer), vec![(vm(41), ClaimOutcome::Moved, answer.revision)]);
    rig.settle(answer.revision).await;
    assert_eq!(rig.bound_fe(vm(41)).as_deref(), Some("fe3"));
}
