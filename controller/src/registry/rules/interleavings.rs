//! Property test of the ordering rules (docs/design.md, section 3) against a model of the world:
//! one VM wanders between FEs (or vanishes) while each FE — with its own clock, up to ±10 s off —
//! reports what it sees the way an fe-agent does, over a network that delays, duplicates and
//! reorders reports, with tombstones collected underneath. Whatever happens, once everything is
//! delivered the binding is where the VM really is (none if it is nowhere).
//!
//! The world, in real time (ns):
//! * the controller applies each report on arrival with [`decide_batch`] (one key: compare-and-
//!   swap is sequential application) and commits at the next revision; each FE's stream delivers
//!   revisions in order after a delay of its own, which sets the FE's `known_revision`;
//! * when the VM arrives at an FE, that FE reports LEARNED (its clock, its known revision); when
//!   it left and has not come back by the FE's ageing check, the FE reports GONE;
//! * a report may be delayed, delivered several times (retries, re-reports on reconnect), or sent
//!   together with a copy of that FE's previous report (several observations in one Report);
//! * a STALE answer naming revision R makes the FE wait until its stream has R, then probe the
//!   VM: if it is there, that is a new LEARNED;
//! * housekeeping collects tombstones after a short retention, raising the horizon.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use proptest::prelude::*;

use super::*;

const MS: i64 = 1_000_000;
const S: i64 = 1_000_000_000;
const FES: [&str; 3] = ["fe1", "fe2", "fe3"];
const MAC: Mac = Mac([2, 0, 0, 0, 0, 0x0b]);

/// Deterministic choices from one seed (xorshift64*).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi`.
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One observation as an FE reports it.
#[derive(Debug, Clone, Copy)]
struct Report {
    kind: Observed,
    observed_at: i64,
    known: Revision,
}

#[derive(Debug, Clone)]
enum Event {
    /// The VM appears at this FE (None: it vanishes).
    VmAt(Option<usize>),
    /// A report from an FE reaches the controller.
    Deliver(usize, Vec<Report>),
    /// An FE's stream delivers a revision.
    Stream(usize, Revision),
    /// An FE's ageing check for a VM that left it.
    AgeCheck(usize),
    /// Housekeeping collects tombstones older than the retention.
    Collect,
}

struct Fe {
    skew: i64,
    last_stamp: i64,
    known: Revision,
    /// Revisions delivered to this FE are in order: the next one not before this time.
    stream_free_at: i64,
    /// The FE believes the VM is here (reported LEARNED and no GONE since).
    tracking: bool,
    /// Waiting for this revision after a STALE answer, to probe the VM.
    reverify: Option<Revision>,
    /// Its previous report (for duplicates and two-observation reports).
    previous: Option<Report>,
}

/// How often each path of the world was taken (to check the histories exercise them all).
#[derive(Debug, Default, Clone, Copy)]
struct Paths {
    stale: u32,
    reverified: u32,
    duplicates: u32,
    two_in_one_report: u32,
    gone: u32,
    collected: u32,
    stale_on_horizon: u32,
}

struct World {
    paths: Paths,
    dice: Dice,
    rules: Rules,
    now: i64,
    seq: u64,
    queue: BinaryHeap<Reverse<(i64, u64, usize)>>,
    events: Vec<Event>,
    fes: Vec<Fe>,
    vm_at: Option<usize>,
    state: State,
    revision: Revision,
    committed_at: i64,
    retention: i64,
    max_delay: i64,
}

impl World {
    fn schedule(&mut self, at: i64, event: Event) {
        self.events.push(event);
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, self.events.len() - 1)));
    }

    /// The FE's clock now: real time + its skew, strictly increasing (as the agent stamps).
    fn stamp(&mut self, fe: usize) -> i64 {
        let f = &mut self.fes[fe];
        f.last_stamp = (self.now + f.skew).max(f.last_stamp + 1);
        f.last_stamp
    }

    fn report(&mut self, fe: usize, kind: Observed) {
        let observed_at = self.stamp(fe);
        let report = Report { kind, observed_at, known: self.fes[fe].known };
        let mut batch = vec![report];
        if let Some(previous) = self.fes[fe].previous
            && self.dice.chance(15)
        {
            batch.insert(0, previous);
            self.paths.two_in_one_report += 1;
        }
        self.fes[fe].previous = Some(report);
        let delay = self.dice.between(0, self.max_delay);
        self.schedule(self.now + delay, Event::Deliver(fe, batch.clone()));
        // Retries and re-reports: the same observations again, later.
        while self.dice.chance(30) {
            self.paths.duplicates += 1;
            // A retry soon, or a re-report after a reconnection seconds later.
            let later = if self.dice.chance(50) {
                self.dice.between(0, 4 * self.max_delay)
            } else {
                self.dice.between(0, 5 * S)
            };
            self.schedule(self.now + later, Event::Deliver(fe, batch.clone()));
        }
    }

    fn commit(&mut self, record: BindingRecord) {
        self.revision += 1;
        self.state = State::stored(Some(record), self.revision, self.state.horizon);
        self.committed_at = self.now;
        for fe in 0..self.fes.len() {
            let at = (self.now + self.dice.between(0, 30 * MS)).max(self.fes[fe].stream_free_at);
            self.fes[fe].stream_free_at = at;
            self.schedule(at, Event::Stream(fe, self.revision));
        }
    }

    fn deliver(&mut self, fe: usize, batch: &[Report]) {
        let obs: Vec<Observation<'_>> = batch
            .iter()
            .map(|r| Observation {
                kind: r.kind,
                fe_id: FES[fe],
                fe_site: "site",
                mac: MAC,
                observed_at: r.observed_at,
                known: Knowledge::Upto(r.known),
            })
            .collect();
        let (write, mut verdicts) = decide_batch(&self.rules, &self.state, None, &obs, self.now);
        if let Some(record) = write {
            self.commit(record);
            name_commit_revision(&mut verdicts, self.revision);
        }
        for (report, verdict) in batch.iter().zip(verdicts) {
            if let (Observed::Learned, Verdict::Reject(r)) = (report.kind, verdict) {
                assert_eq!(r.reason, Reason::Stale, "{}", r.message);
                self.paths.stale += 1;
                if self.state.record.is_none() {
                    self.paths.stale_on_horizon += 1;
                }
                assert!(r.revision > 0, "a STALE answer names the revision to wait for: {}", r.message);
                let needed = self.fes[fe].reverify.map_or(r.revision, |w| w.max(r.revision));
                self.fes[fe].reverify = Some(needed);
                self.maybe_reverify(fe);
            }
        }
    }

    /// After a STALE answer, once the stream has the named revision: probe; a reply is a new
    /// observation.
    fn maybe_reverify(&mut self, fe: usize) {
        if self.fes[fe].reverify.is_some_and(|r| self.fes[fe].known >= r) {
            self.fes[fe].reverify = None;
            if self.vm_at == Some(fe) {
                self.paths.reverified += 1;
                self.fes[fe].tracking = true;
                self.report(fe, Observed::Learned);
            }
        }
    }

    /// Runs until nothing is left to happen; false if that never came (reports kept coming:
    /// the rules do not settle).
    fn run(&mut self) -> bool {
        const MOST_EVENTS: usize = 100_000;
        while let Some(Reverse((at, _, index))) = self.queue.pop() {
            if self.events.len() > MOST_EVENTS {
                return false;
            }
            self.now = at;
            match self.events[index].clone() {
                Event::VmAt(to) => {
                    if let Some(from) = self.vm_at.filter(|f| Some(*f) != to) {
                        let age = self.dice.between(100 * MS, 2 * S);
                        self.schedule(self.now + age, Event::AgeCheck(from));
                    }
                    self.vm_at = to;
                    if let Some(fe) = to {
                        self.fes[fe].tracking = true;
                        self.report(fe, Observed::Learned);
                    }
                }
                Event::Deliver(fe, batch) => self.deliver(fe, &batch),
                Event::Stream(fe, revision) => {
                    self.fes[fe].known = self.fes[fe].known.max(revision);
                    self.maybe_reverify(fe);
                }
                Event::AgeCheck(fe) => {
                    if self.fes[fe].tracking && self.vm_at != Some(fe) {
                        self.fes[fe].tracking = false;
                        self.paths.gone += 1;
                        self.report(fe, Observed::Gone);
                    }
                }
                Event::Collect => {
                    if let Some(t) = self.state.tombstone()
                        && self.now - self.committed_at >= self.retention
                    {
                        assert!(t.removed);
                        let removed_at = self.state.observed_revision().expect("committed");
                        self.state = State::stored(None, 0, self.state.horizon.max(removed_at));
                        self.paths.collected += 1;
                    }
                }
            }
        }
        true
    }
}

fn world(skews: &[i64], retention_ms: i64, max_delay_ms: i64, seed: u64) -> World {
    World {
        dice: Dice(seed | 1),
        rules: Rules { damping: DampingPolicy { max_moves: u32::MAX, window_ns: 1 }, require_declared: false },
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        paths: Paths::default(),
        fes: skews
            .iter()
            .map(|skew| Fe {
                skew: 1_700_000_000 * S + skew,
                last_stamp: 0,
                known: 0,
                stream_free_at: 0,
                tracking: false,
                reverify: None,
                previous: None,
            })
            .collect(),
        vm_at: None,
        state: State::default(),
        revision: 0,
        committed_at: 0,
        retention: retention_ms * MS,
        max_delay: max_delay_ms * MS,
    }
}

/// Runs one history: the VM's path (gap before each step, its FE or None for "gone"), housekeeping
/// every `collect_every_ms` (0 = never) for 10 s. Returns where the VM ends, the final state and
/// the paths taken. Panics if the world never settles.
fn history(
    skews: &[i64],
    path: &[(i64, Option<usize>)],
    collect_every_ms: i64,
    retention_ms: i64,
    max_delay_ms: i64,
    seed: u64,
) -> (Option<usize>, State, Paths) {
    let mut w = world(skews, retention_ms, max_delay_ms, seed);
    let mut t = 0;
    for (gap_ms, to) in path {
        t += gap_ms * MS;
        w.schedule(t, Event::VmAt(*to));
    }
    if collect_every_ms > 0 {
        for k in 1..=(10_000 / collect_every_ms) {
            w.schedule(k * collect_every_ms * MS, Event::Collect);
        }
    }
    assert!(w.run(), "reports never stopped coming (the rules do not settle): {:?} after {:?}", w.state, w.paths);
    (w.vm_at, w.state, w.paths)
}

fn skews() -> impl Strategy<Value = Vec<i64>> {
    proptest::collection::vec(-10 * S..=10 * S, FES.len())
}

fn path() -> impl Strategy<Value = Vec<(i64, Option<usize>)>> {
    proptest::collection::vec((0i64..400, proptest::option::weighted(0.85, 0..FES.len())), 1..14)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// The final binding is where the VM is, whatever the clocks, delays, duplicates and
    /// collections.
    #[test]
    fn the_binding_ends_where_the_vm_is(
        skews in skews(),
        path in path(),
        collect_every_ms in 0i64..500,
        retention_ms in 1i64..2000,
        max_delay_ms in 1i64..300,
        seed in any::<u64>(),
    ) {
        let (vm_at, state, _) = history(&skews, &path, collect_every_ms, retention_ms, max_delay_ms, seed);
        let bound = state.binding().map(|b| b.fe_id.clone());
        prop_assert_eq!(bound, vm_at.map(|fe| FES[fe].to_owned()), "final state {:?}", state);
    }

    /// Skew changes nothing: the same history with every clock shifted differently ends the same.
    #[test]
    fn clock_skew_changes_nothing(
        skews in skews(),
        other in skews(),
        path in path(),
        max_delay_ms in 1i64..300,
        seed in any::<u64>(),
    ) {
        let a = history(&skews, &path, 0, 1000, max_delay_ms, seed);
        let b = history(&other, &path, 0, 1000, max_delay_ms, seed);
        prop_assert_eq!(a.0, b.0);
        let at = |s: &State| s.binding().map(|b| (b.fe_id.clone(), b.move_seq));
        prop_assert_eq!(at(&a.1), at(&b.1));
    }
}

/// The clock trap, as a history: the VM moves fe2 → fe3 and back within a second while
/// fe2's clock is 5 s behind and fe3's 5 s ahead; the binding follows it at once.
#[test]
fn five_seconds_of_skew_do_not_hold_a_move_back() {
    let skews = [0, -5 * S, 5 * S];
    let path = [(0, Some(1)), (300, Some(2)), (300, Some(1)), (300, Some(2)), (300, Some(1))];
    let (vm_at, state, _) = history(&skews, &path, 0, 10_000, 5, 7);
    assert_eq!(vm_at, Some(1));
    let b = state.binding().expect("bound");
    assert_eq!((b.fe_id.as_str(), b.move_seq), ("fe2", 4), "every move committed: {state:?}");
}

/// The histories the property tests draw take every path of the world: STALE answers and the
/// probes after them, horizons, duplicates, two observations in one report, GONE, collections.
#[test]
fn the_histories_exercise_every_path() {
    let mut dice = Dice(0x5eed);
    let mut total = Paths::default();
    for _ in 0..400 {
        let skews: Vec<i64> = (0..FES.len()).map(|_| dice.between(-10 * S, 10 * S)).collect();
        let path: Vec<(i64, Option<usize>)> = (0..dice.between(1, 14))
            .map(|_| (dice.between(0, 400), (!dice.chance(15)).then(|| dice.between(0, 3) as usize)))
            .collect();
        let every = dice.between(0, 500);
        let (_, _, p) = history(&skews, &path, every, dice.between(1, 2000), dice.between(1, 300), dice.next());
        total.stale += p.stale;
        total.reverified += p.reverified;
        total.duplicates += p.duplicates;
        total.two_in_one_report += p.two_in_one_report;
        total.gone += p.gone;
        total.collected += p.collected;
        total.stale_on_horizon += p.stale_on_horizon;
    }
    println!("{total:?}");
    let Paths { stale, reverified, duplicates, two_in_one_report, gone, collected, stale_on_horizon } = total;
    for (name, n) in [
        ("stale", stale),
        ("reverified", reverified),
        ("duplicates", duplicates),
        ("two_in_one_report", two_in_one_report),
        ("gone", gone),
        ("collected", collected),
        ("stale_on_horizon", stale_on_horizon),
    ] {
        assert!(n > 0, "no history took the path {name}: {total:?}");
    }
}
