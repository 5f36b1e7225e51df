//! What this agent knew when (pure; times are CLOCK_MONOTONIC ns): the stream revisions its
//! desired state reached, in order, so that an observation can be stamped with the revision known
//! *when the kernel captured the frame* — the `known_revision` the controller orders reports of
//! different FEs by (docs/design.md, section 3). A frame captured before a delta was applied must
//! not claim that delta's knowledge (a late frame from a VM that just left would take it back), so
//! the stamp is the revision applied at or before the capture, never the engine's current one.

use std::collections::VecDeque;

/// How far back the log answers exactly (older captures get the most conservative answer, 0).
const WINDOW_NS: u64 = 60_000_000_000;

/// Revisions applied over time.
#[derive(Debug, Default)]
pub struct KnownRevisions {
    /// (when it was applied, revision), both increasing; the first entry may be older than the
    /// window (it says what was known at the window's start).
    applied: VecDeque<(u64, u64)>,
}

impl KnownRevisions {
    /// The desired state reached `revision` at `mono`.
    pub fn applied(&mut self, revision: u64, mono: u64) {
        if self.applied.back().is_some_and(|(_, r)| *r >= revision) {
            return;
        }
        self.applied.push_back((mono, revision));
        // Keep one entry at or before the window's start.
        let start = mono.saturating_sub(WINDOW_NS);
        while self.applied.len() > 1 && self.applied[1].0 <= start {
            self.applied.pop_front();
        }
    }

    /// The revision known at `mono` (0 if before anything this log holds).
    pub fn at(&self, mono: u64) -> u64 {
        let after = self.applied.partition_point(|(t, _)| *t <= mono);
        if after == 0 { 0 } else { self.applied[after - 1].1 }
    }

    /// The latest revision.
    pub fn now(&self) -> u64 {
        self.applied.back().map_or(0, |(_, r)| *r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_capture_gets_what_was_applied_before_it() {
        let mut k = KnownRevisions::default();
        assert_eq!(k.at(5 * S), 0);
        k.applied(10, 5 * S);
        k.applied(12, 7 * S);
        k.applied(11, 8 * S); // a snapshot of a lagging replica: knowledge does not go back
        assert_eq!((k.at(4 * S), k.at(5 * S), k.at(6 * S), k.at(7 * S), k.at(9 * S)), (0, 10, 10, 12, 12));
        assert_eq!(k.now(), 12);
        // Old entries go, but the one that was current at the window's start stays.
        k.applied(20, 100 * S);
        assert_eq!((k.at(50 * S), k.at(100 * S)), (12, 20));
        k.applied(21, 200 * S);
        assert_eq!((k.at(150 * S), k.at(99 * S)), (20, 0), "older than the log: the conservative 0");
    }
}
