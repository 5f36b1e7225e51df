//! Unit and property tests of the binding rules.

use super::*;
use proptest::prelude::*;

const S: i64 = 1_000_000_000;
const MAC: Mac = Mac([2, 0, 0, 0, 0, 0x0b]);

fn rules() -> Rules {
    Rules::default()
}

/// A LEARNED by `fe` at `at` (its clock) that does not say what it knew (arrival order).
fn learned<'a>(fe: &'a str, at: i64) -> Observation<'a> {
    Observation {
        kind: Observed::Learned,
        fe_id: fe,
        fe_site: "site-a",
        mac: MAC,
        observed_at: at,
        known: Knowledge::Unstated,
    }
}

/// The same, made knowing revision `known`.
fn learned_knowing<'a>(fe: &'a str, at: i64, known: Revision) -> Observation<'a> {
    Observation { known: Knowledge::Upto(known), ..learned(fe, at) }
}

fn gone<'a>(fe: &'a str, at: i64, known: Revision) -> Observation<'a> {
    Observation { kind: Observed::Gone, ..learned_knowing(fe, at, known) }
}

/// One VM's key in a store: every write commits at the next revision.
#[derive(Default)]
struct Key {
    state: State,
    revision: Revision,
}

impl Key {
    fn with(record: BindingRecord, revision: Revision) -> Key {
        Key { state: State::stored(Some(record), revision, 0), revision }
    }

    /// Decides `obs` and commits what it writes.
    fn observe(&mut self, rules: &Rules, vm: Option<&VmRecord>, obs: &Observation<'_>, now: i64) -> Verdict {
        let (write, mut verdicts) = decide_batch(rules, &self.state, vm, std::slice::from_ref(obs), now);
        self.commit(write);
        verdicts.remove(0)
    }

    /// Decides a batch of observations of one report and commits the result.
    fn report(&mut self, obs: &[Observation<'_>], now: i64) -> Vec<Verdict> {
        let (write, verdicts) = decide_batch(&rules(), &self.state, None, obs, now);
        self.commit(write);
        verdicts
    }

    fn commit(&mut self, write: Option<BindingRecord>) {
        if let Some(record) = write {
            self.revision += 1;
            self.state = State::stored(Some(record), self.revision, self.state.horizon);
        }
    }

    fn binding(&self) -> Option<&BindingRecord> {
        self.state.binding()
    }

    fn bound_to(&self) -> Option<&str> {
        self.binding().map(|b| b.fe_id.as_str())
    }
}

fn rejection(v: Verdict) -> Rejection {
    match v {
        Verdict::Reject(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn first_claim_binds_then_move_increments_seq() {
    let mut key = Key::default();
    let v = key.observe(&rules(), None, &learned("fe2", 10 * S), 10 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Bound)));
    assert_eq!(key.binding().unwrap().move_seq, 0);
    let v = key.observe(&rules(), None, &learned_knowing("fe3", 11 * S, 1), 11 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: false })));
    let b = key.binding().unwrap();
    assert_eq!((b.fe_id.as_str(), b.move_seq, b.observed_revision), ("fe3", 1, 0));
    assert_eq!(b.recent_moves_unix_nanos, vec![11 * S]);
}

#[test]
fn refresh_from_same_fe_writes_only_newer_observations() {
    let cur = BindingRecord {
        fe_id: "fe2".into(),
        mac: MAC.octets().to_vec(),
        observed_at_unix_nanos: 5 * S,
        source: BindingSource::Arp as i32,
        ..Default::default()
    };
    let state = State::stored(Some(cur), 7, 0);
    assert_eq!(decide_observation(&rules(), &state, None, &learned("fe2", 5 * S), 9 * S), Verdict::Unchanged);
    assert_eq!(decide_observation(&rules(), &state, None, &learned("fe2", 4 * S), 9 * S), Verdict::Unchanged);
    assert_eq!(
        decide_observation(&rules(), &state, None, &learned_knowing("fe2", 4 * S, 6), 9 * S),
        Verdict::Unchanged,
        "older by its clock and made before the record was committed"
    );
    // A newer observation is kept (and its revision orders other FEs' reports after it).
    let Verdict::Write(next, Change::Updated) =
        decide_observation(&rules(), &state, None, &learned("fe2", 9 * S), 9 * S)
    else {
        panic!()
    };
    assert_eq!((next.observed_at_unix_nanos, next.move_seq, next.observed_revision), (9 * S, 0, 0));
    // Made knowing the record: newer whatever this FE's clock said (it was stepped back).
    let Verdict::Write(next, Change::Updated) =
        decide_observation(&rules(), &state, None, &learned_knowing("fe2", 2 * S, 7), 9 * S)
    else {
        panic!()
    };
    assert_eq!(next.observed_at_unix_nanos, 2 * S);
}

#[test]
fn a_report_made_before_the_binding_never_takes_it_whatever_the_clocks() {
    // fe3 took the VM at revision 20; fe2's clock runs 100 s fast.
    let mut key = Key::with(
        BindingRecord { fe_id: "fe3".into(), mac: MAC.octets().to_vec(), move_seq: 4, ..Default::default() },
        20,
    );
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe2", 1_000 * S, 19), 21 * S));
    assert_eq!((r.reason, r.refusal, r.revision), (Reason::Stale, Refusal::Precondition, 20));
    assert!(r.message.contains("revision 20") && r.message.contains("revision 19"), "{}", r.message);
    // Made knowing revision 20 — even by a clock 100 s slow — it is newer: the VM moves.
    let v = key.observe(&rules(), None, &learned_knowing("fe2", S, 20), 21 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Moved { .. })), "{v:?}");
    assert_eq!((key.bound_to(), key.binding().unwrap().move_seq), (Some("fe2"), 5));
    // fe3's report made before that move is now the stale one.
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe3", 9_999 * S, 20), 22 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 21));
}

#[test]
fn a_refresh_by_the_owner_orders_concurrent_claims_after_it() {
    let mut key = Key::default();
    key.observe(&rules(), None, &learned_knowing("fe2", 10 * S, 0), 10 * S);
    // fe2 sees the VM again (it came back before fe3's claim arrived): recorded at revision 2.
    key.observe(&rules(), None, &learned_knowing("fe2", 20 * S, 1), 20 * S);
    assert_eq!(key.state.observed_revision(), Some(2));
    // fe3's claim was made knowing only revision 1: it may be older than fe2's sighting.
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe3", 30 * S, 1), 21 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 2));
    // A pending announcement or damping change keeps the observation's revision.
    let Verdict::Write(pending, _) = decide_announcement(&rules(), &key.state, None, "fe4", "x", false, 99 * S, 22 * S)
    else {
        panic!()
    };
    assert_eq!(pending.observed_revision, 2);
}

#[test]
fn declared_mac_and_site_are_enforced() {
    let vm = VmRecord { mac: vec![2, 0, 0, 0, 0, 0x99], allowed_sites: vec![], description: String::new() };
    let Verdict::Reject(r) = decide_observation(&rules(), &State::default(), Some(&vm), &learned("fe2", S), S) else {
        panic!()
    };
    assert_eq!((r.reason, r.refusal), (Reason::MacMismatch, Refusal::Forbidden));
    assert!(r.message.contains("02:00:00:00:00:99") && r.message.contains("02:00:00:00:00:0b"), "{}", r.message);

    let vm = VmRecord { mac: MAC.octets().to_vec(), allowed_sites: vec!["site-b".into()], description: String::new() };
    let Verdict::Reject(r) = decide_observation(&rules(), &State::default(), Some(&vm), &learned("fe2", S), S) else {
        panic!()
    };
    assert_eq!((r.reason, r.refusal), (Reason::SitePolicy, Refusal::Forbidden));
    assert!(r.message.contains("site-a"), "{}", r.message);

    let strict = Rules { require_declared: true, ..rules() };
    let r = rejection(decide_observation(&strict, &State::default(), None, &learned("fe2", S), S));
    assert_eq!(r.reason, Reason::Undeclared);
}

#[test]
fn bad_timestamps_and_macs_are_refused_but_future_times_are_no_concern() {
    let empty = State::default();
    let r = rejection(decide_observation(&rules(), &empty, None, &learned("fe2", 0), S));
    assert_eq!(r.reason, Reason::BadTimestamp);
    // An FE's clock far ahead of the controller's is its own business.
    assert!(matches!(
        decide_observation(&rules(), &empty, None, &learned("fe2", 3600 * S), S),
        Verdict::Write(_, Change::Bound)
    ));
    let obs = Observation { mac: Mac::BROADCAST, ..learned("fe2", S) };
    let r = rejection(decide_observation(&rules(), &empty, None, &obs, S));
    assert_eq!((r.reason, r.refusal), (Reason::Malformed, Refusal::Invalid));
}

#[test]
fn gone_leaves_a_tombstone_that_outlives_late_reports() {
    let mut key = Key::default();
    key.observe(&rules(), None, &learned_knowing("fe2", 5 * S, 0), 5 * S); // revision 1
    let r = rejection(key.observe(&rules(), None, &gone("fe3", 6 * S, 0), 6 * S));
    assert_eq!((r.reason, r.refusal), (Reason::NotBoundHere, Refusal::Precondition));
    let r = rejection(key.observe(&rules(), None, &gone("fe2", 4 * S, 0), 6 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 1));
    let v = key.observe(&rules(), None, &gone("fe2", 7 * S, 1), 7 * S); // revision 2
    assert!(matches!(v, Verdict::Write(ref t, Change::Removed) if t.removed && t.fe_id == "fe2"), "{v:?}");
    assert_eq!(key.binding(), None);
    // fe2's own report from before its GONE (a retry, a re-report): older by fe2's clock.
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe2", 6 * S, 1), 8 * S));
    assert_eq!(r.reason, Reason::Stale);
    // Another FE's report made before the removal was known: it may be older.
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe3", 99 * S, 1), 8 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 2));
    // A GONE for the removed binding changes nothing.
    assert_eq!(key.observe(&rules(), None, &gone("fe2", 6 * S, 1), 8 * S), Verdict::Unchanged);
    // Seen again after the removal (fe2 later by its clock; fe3 knowing revision 2): bound again,
    // continuing move_seq.
    let v = key.observe(&rules(), None, &learned_knowing("fe3", S, 2), 9 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Bound)), "{v:?}");
    assert_eq!((key.bound_to(), key.binding().unwrap().move_seq), (Some("fe3"), 1));
    // No record at all: nothing to remove, but the absence is recorded (this FE's own LEARNED
    // may still be on its way and must not bind the VM after its GONE).
    let mut key = Key::default();
    let v = key.observe(&rules(), None, &gone("fe2", 5 * S, 0), S);
    assert!(matches!(v, Verdict::Write(ref t, Change::Updated) if t.removed), "{v:?}");
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe2", 4 * S, 0), S));
    assert_eq!(r.reason, Reason::Stale);
}

#[test]
fn a_gone_from_another_fe_that_knew_the_binding_orders_its_older_claim_before_it() {
    // fe2 holds the VM (revision 1); fe3 saw it after that (its claim is still on its way), then
    // lost it, and its GONE arrives first.
    let mut key = Key::default();
    key.observe(&rules(), None, &learned_knowing("fe2", 5 * S, 0), 5 * S);
    let v = key.observe(&rules(), None, &gone("fe3", 9 * S, 1), 6 * S); // revision 2
    assert!(matches!(v, Verdict::Write(ref b, Change::Updated) if b.fe_id == "fe2" && !b.removed), "{v:?}");
    assert_eq!(key.state.observed_revision(), Some(2));
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe3", 8 * S, 1), 7 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 2));
    assert_eq!(key.bound_to(), Some("fe2"));
}

#[test]
fn a_gone_on_a_tombstone_orders_that_fes_older_reports_before_it() {
    // fe1 removed it at revision 2; fe2 saw the VM after that (knowing 2) and then lost it.
    let mut key = Key::default();
    key.observe(&rules(), None, &learned_knowing("fe1", 5 * S, 0), 5 * S);
    key.observe(&rules(), None, &gone("fe1", 6 * S, 1), 6 * S);
    let v = key.observe(&rules(), None, &gone("fe2", 50 * S, 2), 7 * S);
    assert!(matches!(v, Verdict::Write(ref t, Change::Updated) if t.removed && t.fe_id == "fe2"), "{v:?}");
    // fe2's LEARNED from before its GONE arrives late: older by fe2's clock.
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe2", 40 * S, 2), 8 * S));
    assert_eq!(r.reason, Reason::Stale);
    // fe1 knew only the first removal: it must learn of fe2's before it can order after it.
    let r = rejection(key.observe(&rules(), None, &learned_knowing("fe1", 60 * S, 2), 8 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 3));
    assert!(matches!(
        key.observe(&rules(), None, &learned_knowing("fe1", 60 * S, 3), 8 * S),
        Verdict::Write(_, Change::Bound)
    ));
}

#[test]
fn collected_removals_leave_a_horizon() {
    let absent = State { horizon: 40, ..State::default() };
    let r = rejection(decide_observation(&rules(), &absent, None, &learned_knowing("fe2", S, 39), S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 40));
    assert!(r.message.contains("no longer remembered"), "{}", r.message);
    for known in [Knowledge::Upto(40), Knowledge::Unstated] {
        let obs = Observation { known, ..learned("fe2", S) };
        assert!(matches!(decide_observation(&rules(), &absent, None, &obs, S), Verdict::Write(_, Change::Bound)));
    }
}

#[test]
fn observations_of_one_report_apply_in_observation_order() {
    let t = 100 * S;
    // Bound at t; [LEARNED t+1, GONE t+2] in one report: removed, however they are listed.
    for order in [[0, 1], [1, 0]] {
        let mut key = Key::default();
        key.observe(&rules(), None, &learned_knowing("fe2", t, 0), t);
        let obs = [learned_knowing("fe2", t + S, 1), gone("fe2", t + 2 * S, 1)];
        let listed = [obs[order[0]], obs[order[1]]];
        let verdicts = key.report(&listed, t);
        assert_eq!(key.binding(), None, "order {order:?}: {verdicts:?}");
        let gone_at = order.iter().position(|i| *i == 1).unwrap();
        assert!(matches!(verdicts[gone_at], Verdict::Write(_, Change::Removed)), "{verdicts:?}");
    }
    // A new VM with [LEARNED t, GONE t+1]: bound, then removed, in one write.
    let mut key = Key::default();
    let verdicts = key.report(&[learned_knowing("fe2", t, 0), gone("fe2", t + S, 0)], t);
    assert!(matches!(verdicts[0], Verdict::Write(_, Change::Bound)), "{verdicts:?}");
    assert!(matches!(verdicts[1], Verdict::Write(_, Change::Removed)), "{verdicts:?}");
    assert_eq!((key.revision, key.binding()), (1, None));
    // Equal times keep request order; a GONE not newer than the LEARNED is stale.
    let mut key = Key::default();
    let verdicts = key.report(&[learned_knowing("fe2", t, 0), gone("fe2", t, 0)], t);
    assert_eq!(rejection(verdicts[1].clone()).reason, Reason::Stale);
    assert_eq!(key.bound_to(), Some("fe2"));
}

#[test]
fn sixth_move_in_window_freezes_then_moves_are_refused_until_cleared() {
    let mut key = Key::default();
    let fes = ["fe2", "fe3"];
    key.observe(&rules(), None, &learned("fe2", S), S);
    for i in 1..=5 {
        let v = key.observe(&rules(), None, &learned(fes[i % 2], (1 + i as i64) * S), (1 + i as i64) * S);
        assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: false })), "move {i}: {v:?}");
    }
    let v = key.observe(&rules(), None, &learned("fe2", 7 * S), 7 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: true })), "{v:?}");
    assert!(key.binding().unwrap().frozen);
    let r = rejection(decide_observation(&rules(), &key.state, None, &learned("fe3", 8 * S), 8 * S));
    assert_eq!(r.reason, Reason::Damped);
    assert!(r.message.contains("ClearDamping"));
    let r = rejection(decide_observation(&rules(), &key.state, None, &gone("fe2", 8 * S, 99), 8 * S));
    assert_eq!(r.reason, Reason::Damped, "a frozen binding is not removed by GONE either");
    let cleared = clear_damping(&key.state, 9 * S).unwrap();
    assert!(!cleared.frozen && cleared.recent_moves_unix_nanos.is_empty());
    assert_eq!(cleared.observed_revision, key.revision, "clearing keeps the observation's revision");
    let thawed = State::stored(Some(cleared), key.revision + 1, 0);
    assert!(matches!(
        decide_observation(&rules(), &thawed, None, &learned("fe3", 9 * S), 9 * S),
        Verdict::Write(_, Change::Moved { froze: false })
    ));
    assert!(clear_damping(&thawed, 10 * S).is_err());
}

#[test]
fn moves_outside_the_window_do_not_count() {
    let mut key = Key::default();
    key.observe(&rules(), None, &learned("fe2", S), S);
    for i in 1..=20i64 {
        let at = S + i * 60 * S; // one move a minute: 3 per window at most
        let fe = if i % 2 == 0 { "fe2" } else { "fe3" };
        let v = key.observe(&rules(), None, &learned(fe, at), at);
        assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: false })), "move {i}: {v:?}");
    }
    assert!(key.binding().unwrap().recent_moves_unix_nanos.len() <= 3);
}

#[test]
fn announcement_checks_policy_before_the_move() {
    let vm = VmRecord { mac: MAC.octets().to_vec(), allowed_sites: vec!["site-a".into()], description: String::new() };
    let cur = BindingRecord {
        fe_id: "fe2".into(),
        mac: MAC.octets().to_vec(),
        observed_at_unix_nanos: S,
        source: BindingSource::Arp as i32,
        ..Default::default()
    };
    let state = State::stored(Some(cur), 5, 0);
    let r = rejection(decide_announcement(&rules(), &state, Some(&vm), "fe9", "site-z", false, 0, 2 * S));
    assert_eq!((r.reason, r.refusal), (Reason::SitePolicy, Refusal::Forbidden));
    let Verdict::Write(pending, Change::Updated) =
        decide_announcement(&rules(), &state, Some(&vm), "fe3", "site-a", false, 100 * S, 2 * S)
    else {
        panic!()
    };
    assert_eq!((pending.fe_id.as_str(), pending.pending_fe_id.as_str()), ("fe2", "fe3"));
    let pending = State::stored(Some(pending), 6, 0);
    // The VM's ARP at the announced FE clears the announcement as part of the move.
    let Verdict::Write(moved, Change::Moved { .. }) =
        decide_observation(&rules(), &pending, Some(&vm), &learned_knowing("fe3", 3 * S, 6), 3 * S)
    else {
        panic!()
    };
    assert!(moved.pending_fe_id.is_empty());
    assert_eq!(expire_pending(&pending, 99 * S), None);
    assert!(expire_pending(&pending, 100 * S).unwrap().pending_fe_id.is_empty());
    // Commit moves now.
    let mut key = Key::with(state.record.clone().unwrap(), 5);
    let v = decide_announcement(&rules(), &key.state, Some(&vm), "fe3", "site-a", true, 0, 2 * S);
    let Verdict::Write(committed, Change::Moved { .. }) = v else { panic!("{v:?}") };
    assert_eq!(
        (committed.fe_id.as_str(), committed.move_seq, committed.source),
        ("fe3", 1, BindingSource::Orchestrator as i32)
    );
    key.commit(Some(committed)); // revision 6
    // A late ARP from the old FE, made before the commit, does not roll the move back, whatever
    // its clock says.
    let r = rejection(key.observe(&rules(), Some(&vm), &learned_knowing("fe2", 1_000 * S, 5), 3 * S));
    assert_eq!((r.reason, r.revision), (Reason::Stale, 6));
    // The target FE's own first observation (its clock is not the controller's) confirms it.
    let v = key.observe(&rules(), Some(&vm), &learned_knowing("fe3", S, 6), 3 * S);
    assert!(matches!(v, Verdict::Write(ref b, Change::Updated) if b.source == BindingSource::Arp as i32), "{v:?}");
    assert_eq!(key.binding().unwrap().observed_at_unix_nanos, S);
    // Placing a VM whose binding was removed continues its move_seq.
    let removed = State::stored(Some(tombstone(key.binding().unwrap(), "", 0, 4 * S)), 9, 0);
    let v = decide_announcement(&rules(), &removed, Some(&vm), "fe2", "site-a", true, 0, 5 * S);
    assert!(matches!(v, Verdict::Write(ref b, Change::Bound) if b.move_seq == 2 && !b.removed), "{v:?}");
}

#[test]
fn declaration_cannot_orphan_a_bound_vm() {
    let cur = BindingRecord { fe_id: "fe2".into(), mac: MAC.octets().to_vec(), ..Default::default() };
    let other_mac = VmRecord { mac: vec![2, 0, 0, 0, 0, 1], ..Default::default() };
    assert_eq!(check_declaration(Some((&cur, "site-a")), &other_mac).unwrap_err().refusal, Refusal::Precondition);
    let wrong_site =
        VmRecord { mac: MAC.octets().to_vec(), allowed_sites: vec!["site-b".into()], ..Default::default() };
    assert_eq!(check_declaration(Some((&cur, "site-a")), &wrong_site).unwrap_err().reason, Reason::SitePolicy);
    let ok = VmRecord { mac: MAC.octets().to_vec(), allowed_sites: vec!["site-a".into()], ..Default::default() };
    assert!(check_declaration(Some((&cur, "site-a")), &ok).is_ok());
    assert!(check_declaration(None, &other_mac).is_ok());
}

fn no_damping() -> Rules {
    Rules { damping: DampingPolicy { max_moves: u32::MAX, window_ns: 1 }, ..rules() }
}

proptest! {
    /// Claims from several FEs, each made knowing some revision, committed in any order: one that
    /// knew the revision of the binding's observation moves it (move_seq + 1), one that did not is
    /// STALE and names that revision; the observation revision a binding holds never goes
    /// backwards.
    #[test]
    fn claims_that_knew_the_binding_move_it_the_others_wait(
        claims in proptest::collection::vec((0usize..4, 0u64..30), 1..40),
    ) {
        let fes = ["fe1", "fe2", "fe3", "fe4"];
        let mut key = Key::default();
        let mut moves = 0u64;
        let mut at = 0;
        for (fe, known) in &claims {
            at += S;
            let before = key.state.clone();
            let held = before.observed_revision();
            let v = key.observe(&no_damping(), None, &learned_knowing(fes[*fe], at, *known), at);
            match (&v, before.binding()) {
                (Verdict::Write(_, Change::Bound), None) => {}
                (Verdict::Write(_, Change::Moved { .. }), Some(b)) => {
                    prop_assert!(b.fe_id != fes[*fe] && held.is_some_and(|h| *known >= h));
                    moves += 1;
                }
                (Verdict::Write(_, Change::Updated), Some(b)) => prop_assert_eq!(b.fe_id.as_str(), fes[*fe]),
                (Verdict::Reject(r), Some(b)) => {
                    prop_assert!(b.fe_id != fes[*fe] && held.is_some_and(|h| *known < h && r.revision == h));
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            prop_assert!(key.state.observed_revision() >= held, "the observation went backwards");
            prop_assert_eq!(key.binding().unwrap().move_seq, moves);
        }
    }

    /// One FE's observations seen in different orders, one report each or all in one report: the
    /// same end (that FE's newest observation decides).
    #[test]
    fn one_fes_reports_end_the_same_in_any_order(
        obs in proptest::collection::vec((any::<bool>(), 1i64..1000), 1..12),
        seed in any::<u64>(),
    ) {
        let make = |(learn, at): (bool, i64)| {
            if learn { learned_knowing("fe2", at, 0) } else { gone("fe2", at, 0) }
        };
        let all: Vec<Observation<'_>> = obs.iter().map(|o| make(*o)).collect();
        let mut shuffled = all.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let one_by_one = |list: &[Observation<'_>]| {
            let mut key = Key::default();
            for o in list {
                key.observe(&no_damping(), None, o, 5000);
            }
            key.binding().map(|b| b.observed_at_unix_nanos)
        };
        let mut batched = Key::default();
        batched.report(&shuffled, 5000);
        let newest = obs.iter().map(|(_, at)| *at).max().unwrap();
        // A LEARNED and a GONE at the very same time go by order; otherwise the newest decides.
        let kinds: std::collections::HashSet<bool> =
            obs.iter().filter(|(_, at)| *at == newest).map(|(learn, _)| *learn).collect();
        if kinds.len() == 1 {
            let expected = obs.iter().find(|(_, at)| *at == newest).unwrap().0.then_some(newest);
            prop_assert_eq!(one_by_one(&all), expected);
            prop_assert_eq!(one_by_one(&shuffled), expected);
            prop_assert_eq!(batched.binding().map(|b| b.observed_at_unix_nanos), expected);
        }
    }

    /// Damping: however claims arrive, no binding moves more than max_moves + 1 times within one
    /// window (the move that trips damping is the last one).
    #[test]
    fn damping_bounds_moves_per_window(gaps in proptest::collection::vec(1i64..120, 1..60)) {
        let r = rules();
        let mut key = Key::default();
        let mut t = S;
        let mut move_times = Vec::new();
        for (i, gap) in gaps.iter().enumerate() {
            t += gap * S;
            let fe = ["fe2", "fe3"][i % 2];
            if let Verdict::Write(_, Change::Moved { .. }) = key.observe(&r, None, &learned(fe, t), t) {
                move_times.push(t);
            }
        }
        for (i, start) in move_times.iter().enumerate() {
            let in_window = move_times[i..].iter().take_while(|m| **m - start < r.damping.window_ns).count();
            prop_assert!(in_window <= r.damping.max_moves as usize + 1, "{in_window} moves in one window");
        }
    }
}
