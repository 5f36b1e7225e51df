//! Unit and property tests of the binding rules.

use super::*;
use proptest::prelude::*;

const S: i64 = 1_000_000_000;
const MAC: Mac = Mac([2, 0, 0, 0, 0, 0x0b]);

fn rules() -> Rules {
    Rules::default()
}

fn learned<'a>(fe: &'a str, at: i64) -> Observation<'a> {
    Observation { kind: Observed::Learned, fe_id: fe, fe_site: "site-a", mac: MAC, observed_at: at }
}

/// Decides `obs` against `current` and applies the verdict to it, like one committed CAS.
fn step(
    current: &mut Option<BindingRecord>,
    rules: &Rules,
    vm: Option<&VmRecord>,
    obs: &Observation<'_>,
    now: i64,
) -> Verdict {
    let verdict = decide_observation(rules, current.as_ref(), vm, obs, now);
    apply(current, verdict)
}

fn apply(current: &mut Option<BindingRecord>, verdict: Verdict) -> Verdict {
    match &verdict {
        Verdict::Write(r, _) => *current = Some(r.clone()),
        Verdict::Delete => *current = None,
        _ => {}
    }
    verdict
}

#[test]
fn first_claim_binds_then_move_increments_seq() {
    let mut cur = None;
    let v = step(&mut cur, &rules(), None, &learned("fe2", 10 * S), 10 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Bound)));
    assert_eq!(cur.as_ref().unwrap().move_seq, 0);
    let v = step(&mut cur, &rules(), None, &learned("fe3", 11 * S), 11 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: false })));
    let b = cur.unwrap();
    assert_eq!((b.fe_id.as_str(), b.move_seq), ("fe3", 1));
    assert_eq!(b.recent_moves_unix_nanos, vec![11 * S]);
}

#[test]
fn refresh_from_same_fe_writes_only_newer_observations() {
    let cur = BindingRecord {
        fe_id: "fe2".into(),
        mac: MAC.octets().to_vec(),
        observed_at_unix_nanos: 5 * S,
        ..Default::default()
    };
    assert_eq!(decide_observation(&rules(), Some(&cur), None, &learned("fe2", 5 * S), 9 * S), Verdict::Unchanged);
    assert_eq!(decide_observation(&rules(), Some(&cur), None, &learned("fe2", 4 * S), 9 * S), Verdict::Unchanged);
    // A newer observation is kept, so that a delayed report from another FE cannot win.
    let Verdict::Write(next, Change::Updated) =
        decide_observation(&rules(), Some(&cur), None, &learned("fe2", 9 * S), 9 * S)
    else {
        panic!()
    };
    assert_eq!((next.observed_at_unix_nanos, next.move_seq), (9 * S, 0));
}

#[test]
fn stale_report_never_rolls_back() {
    let cur = BindingRecord {
        fe_id: "fe3".into(),
        mac: MAC.octets().to_vec(),
        observed_at_unix_nanos: 20 * S,
        move_seq: 4,
        ..Default::default()
    };
    let Verdict::Reject(r) = decide_observation(&rules(), Some(&cur), None, &learned("fe2", 19 * S), 21 * S) else {
        panic!()
    };
    assert_eq!((r.reason, r.refusal), (Reason::Stale, Refusal::Precondition));
    assert!(r.message.contains("stale"), "{}", r.message);
}

#[test]
fn declared_mac_and_site_are_enforced() {
    let vm = VmRecord { mac: vec![2, 0, 0, 0, 0, 0x99], allowed_sites: vec![], description: String::new() };
    let Verdict::Reject(r) = decide_observation(&rules(), None, Some(&vm), &learned("fe2", S), S) else { panic!() };
    assert_eq!((r.reason, r.refusal), (Reason::MacMismatch, Refusal::Forbidden));
    assert!(r.message.contains("02:00:00:00:00:99") && r.message.contains("02:00:00:00:00:0b"), "{}", r.message);

    let vm = VmRecord { mac: MAC.octets().to_vec(), allowed_sites: vec!["site-b".into()], description: String::new() };
    let Verdict::Reject(r) = decide_observation(&rules(), None, Some(&vm), &learned("fe2", S), S) else { panic!() };
    assert_eq!((r.reason, r.refusal), (Reason::SitePolicy, Refusal::Forbidden));
    assert!(r.message.contains("site-a"), "{}", r.message);

    let strict = Rules { require_declared: true, ..rules() };
    let Verdict::Reject(r) = decide_observation(&strict, None, None, &learned("fe2", S), S) else { panic!() };
    assert_eq!(r.reason, Reason::Undeclared);
}

#[test]
fn bad_timestamps_and_macs_are_refused() {
    let Verdict::Reject(r) = decide_observation(&rules(), None, None, &learned("fe2", 0), S) else { panic!() };
    assert_eq!(r.reason, Reason::BadTimestamp);
    let Verdict::Reject(r) = decide_observation(&rules(), None, None, &learned("fe2", 100 * S), S) else { panic!() };
    assert_eq!(r.reason, Reason::BadTimestamp);
    let obs = Observation { mac: Mac::BROADCAST, ..learned("fe2", S) };
    let Verdict::Reject(r) = decide_observation(&rules(), None, None, &obs, S) else { panic!() };
    assert_eq!((r.reason, r.refusal), (Reason::Malformed, Refusal::Invalid));
}

#[test]
fn gone_removes_only_own_current_binding() {
    let cur = BindingRecord {
        fe_id: "fe2".into(),
        mac: MAC.octets().to_vec(),
        observed_at_unix_nanos: 5 * S,
        ..Default::default()
    };
    let gone = |fe, at| Observation { kind: Observed::Gone, ..learned(fe, at) };
    assert_eq!(decide_observation(&rules(), Some(&cur), None, &gone("fe2", 6 * S), 6 * S), Verdict::Delete);
    let Verdict::Reject(r) = decide_observation(&rules(), Some(&cur), None, &gone("fe3", 6 * S), 6 * S) else {
        panic!()
    };
    assert_eq!(r.reason, Reason::NotBoundHere);
    let Verdict::Reject(r) = decide_observation(&rules(), Some(&cur), None, &gone("fe2", 4 * S), 6 * S) else {
        panic!()
    };
    assert_eq!(r.reason, Reason::Stale);
}

#[test]
fn sixth_move_in_window_freezes_then_moves_are_refused_until_cleared() {
    let mut cur = None;
    let fes = ["fe2", "fe3"];
    step(&mut cur, &rules(), None, &learned("fe2", S), S);
    for i in 1..=5 {
        let v = step(&mut cur, &rules(), None, &learned(fes[i % 2], (1 + i as i64) * S), (1 + i as i64) * S);
        assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: false })), "move {i}: {v:?}");
    }
    let v = step(&mut cur, &rules(), None, &learned("fe2", 7 * S), 7 * S);
    assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: true })), "{v:?}");
    assert!(cur.as_ref().unwrap().frozen);
    let Verdict::Reject(r) = decide_observation(&rules(), cur.clone().as_ref(), None, &learned("fe3", 8 * S), 8 * S)
    else {
        panic!()
    };
    assert_eq!(r.reason, Reason::Damped);
    assert!(r.message.contains("ClearDamping"));
    let cleared = clear_damping(cur.as_ref().unwrap(), 9 * S).unwrap();
    assert!(!cleared.frozen && cleared.recent_moves_unix_nanos.is_empty());
    assert!(matches!(
        decide_observation(&rules(), Some(&cleared), None, &learned("fe3", 9 * S), 9 * S),
        Verdict::Write(_, Change::Moved { froze: false })
    ));
    assert!(clear_damping(&cleared, 10 * S).is_err());
}

#[test]
fn moves_outside_the_window_do_not_count() {
    let mut cur = None;
    step(&mut cur, &rules(), None, &learned("fe2", S), S);
    for i in 1..=20i64 {
        let at = S + i * 60 * S; // one move a minute: 3 per window at most
        let fe = if i % 2 == 0 { "fe2" } else { "fe3" };
        let v = step(&mut cur, &rules(), None, &learned(fe, at), at);
        assert!(matches!(v, Verdict::Write(_, Change::Moved { froze: false })), "move {i}: {v:?}");
    }
    assert!(cur.unwrap().recent_moves_unix_nanos.len() <= 3);
}

#[test]
fn announcement_checks_policy_before_the_move() {
    let vm = VmRecord { mac: MAC.octets().to_vec(), allowed_sites: vec!["site-a".into()], description: String::new() };
    let cur = BindingRecord {
        fe_id: "fe2".into(),
        mac: MAC.octets().to_vec(),
        observed_at_unix_nanos: S,
        ..Default::default()
    };
    let Verdict::Reject(r) = decide_announcement(&rules(), Some(&cur), Some(&vm), "fe9", "site-z", false, 0, 2 * S)
    else {
        panic!()
    };
    assert_eq!((r.reason, r.refusal), (Reason::SitePolicy, Refusal::Forbidden));
    let Verdict::Write(pending, Change::Updated) =
        decide_announcement(&rules(), Some(&cur), Some(&vm), "fe3", "site-a", false, 100 * S, 2 * S)
    else {
        panic!()
    };
    assert_eq!((pending.fe_id.as_str(), pending.pending_fe_id.as_str()), ("fe2", "fe3"));
    // The VM's ARP at the announced FE clears the announcement as part of the move.
    let Verdict::Write(moved, Change::Moved { .. }) =
        decide_observation(&rules(), Some(&pending), Some(&vm), &learned("fe3", 3 * S), 3 * S)
    else {
        panic!()
    };
    assert!(moved.pending_fe_id.is_empty());
    assert_eq!(expire_pending(&pending, 99 * S), None);
    assert!(expire_pending(&pending, 100 * S).unwrap().pending_fe_id.is_empty());
    // Commit moves now, with an observation time that beats the old one.
    let Verdict::Write(committed, Change::Moved { .. }) =
        decide_announcement(&rules(), Some(&cur), Some(&vm), "fe3", "site-a", true, 0, 2 * S)
    else {
        panic!()
    };
    assert_eq!(
        (committed.fe_id.as_str(), committed.move_seq, committed.source),
        ("fe3", 1, BindingSource::Orchestrator as i32)
    );
    // A late ARP from the old FE does not roll the orchestrator's move back.
    assert!(matches!(
        decide_observation(&rules(), Some(&committed), Some(&vm), &learned("fe2", S + 1), 2 * S),
        Verdict::Reject(_)
    ));
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
    /// Claims from several FEs with distinct observation times, committed in any order, end with
    /// the binding at the newest observation; the held observation never goes backwards; every
    /// accepted move increments move_seq by exactly one.
    #[test]
    fn claims_converge_to_newest_in_any_order(
        claims in proptest::collection::vec((0usize..4, 1i64..1_000_000), 1..40),
    ) {
        let fes = ["fe1", "fe2", "fe3", "fe4"];
        let now = 2_000_000;
        let mut cur: Option<BindingRecord> = None;
        let mut moves = 0u64;
        for (fe, at) in &claims {
            let before = cur.clone();
            let v = step(&mut cur, &no_damping(), None, &learned(fes[*fe], *at), now);
            if let (Some(b), Some(a)) = (&before, &cur) {
                prop_assert!(a.observed_at_unix_nanos >= b.observed_at_unix_nanos, "rolled back");
            }
            if let Verdict::Write(_, Change::Moved { .. }) = v {
                moves += 1;
            }
            prop_assert_eq!(cur.as_ref().unwrap().move_seq, moves);
        }
        let newest = claims.iter().map(|(fe, at)| (*at, fes[*fe])).max().unwrap();
        let b = cur.unwrap();
        prop_assert_eq!((b.observed_at_unix_nanos, b.fe_id.as_str()), newest);
    }

    /// Two replicas interleave the same set of claims in different orders: both reach the same
    /// binding (the newest), which is what compare-and-swap retries rely on to converge.
    #[test]
    fn order_does_not_change_the_winner(
        claims in proptest::collection::vec((0usize..3, 1i64..1000), 1..12),
        seed in any::<u64>(),
    ) {
        let fes = ["fe1", "fe2", "fe3"];
        let run = |order: &[(usize, i64)]| {
            let mut cur: Option<BindingRecord> = None;
            for (fe, at) in order {
                step(&mut cur, &no_damping(), None, &learned(fes[*fe], *at), 5000);
            }
            cur.map(|b| (b.fe_id, b.observed_at_unix_nanos))
        };
        let mut shuffled = claims.clone();
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(run(&claims), run(&shuffled));
    }

    /// Damping: however claims arrive, no binding moves more than max_moves + 1 times within one
    /// window (the move that trips damping is the last one).
    #[test]
    fn damping_bounds_moves_per_window(gaps in proptest::collection::vec(1i64..120, 1..60)) {
        let r = rules();
        let mut cur: Option<BindingRecord> = None;
        let mut t = S;
        let mut move_times = Vec::new();
        for (i, gap) in gaps.iter().enumerate() {
            t += gap * S;
            let fe = ["fe2", "fe3"][i % 2];
            if let Verdict::Write(_, Change::Moved { .. }) = step(&mut cur, &r, None, &learned(fe, t), t) {
                move_times.push(t);
            }
        }
        for (i, start) in move_times.iter().enumerate() {
            let in_window = move_times[i..].iter().take_while(|m| **m - start < r.damping.window_ns).count();
            prop_assert!(in_window <= r.damping.max_moves as usize + 1, "{in_window} moves in one window");
        }
    }
}
