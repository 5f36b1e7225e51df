//! `victor-lab bench --repeats N`: the whole benchmark N times, each run on a fresh cluster, and
//! the min / median / max of its key figures ([`FIGURES`]). A run that fails is recorded with its
//! error and the others still run; runs whose delivery checks failed are counted apart.

use std::collections::BTreeMap;

use serde::Serialize;

use super::BenchReport;
use super::stats::Spread;

/// One figure of a run: its name in the summary and how to read it.
type Figure = (&'static str, fn(&BenchReport) -> f64);

/// The figures summarised over the runs, in the order the human summary prints them.
pub const FIGURES: &[Figure] = &[
    ("updates_per_s", |r| r.updates_per_s),
    ("churn.committed_per_s", |r| r.churn.committed_per_s),
    ("convergence_ms.p50", |r| r.convergence_ms.p50),
    ("convergence_ms.p99", |r| r.convergence_ms.p99),
    ("convergence_ms.max", |r| r.convergence_ms.max),
    ("controller_cost.us_per_message", |r| r.controller_cost.us_per_message),
    ("controller_cost.us_per_entry", |r| r.controller_cost.us_per_entry),
    ("controller_cost.us_per_move", |r| r.controller_cost.us_per_move),
    ("controller_cost.us_per_heartbeat", |r| r.controller_cost.us_per_heartbeat),
    ("controller_cost.churn_cores", |r| r.controller_cost.churn_cores),
    ("cpu_during_churn_s.controllers", |r| r.cpu_during_churn_s.controllers.iter().sum()),
    ("cpu_during_churn_s.etcd", |r| r.cpu_during_churn_s.etcd),
    ("cpu_during_churn_s.bench", |r| r.cpu_during_churn_s.bench),
    ("preload.claims_per_s", |r| r.preload.claims_per_s),
    ("preload.delivered_s", |r| r.preload.delivered_s),
    ("controller_bytes_per_binding", |r| r.controller_bytes_per_binding),
    ("controller_cold_start_s", |r| r.controller_cold_start_s),
    ("agent_full_sync_s", |r| r.agent_full_sync_s),
    ("delivery.stream_drops", |r| r.delivery.stream_drops as f64),
    ("delivery.reregistered", |r| r.delivery.reregistered as f64),
    ("delivery.heartbeat_rtt_ms.p99", |r| r.delivery.heartbeat_rtt_ms.p99),
    ("delivery.heartbeat_late_ms.p99", |r| r.delivery.heartbeat_late_ms.p99),
    ("etcd_floor.cas_txn_ms.p50", |r| r.etcd_floor.cas_txn_ms.p50),
    ("etcd_floor.watch_ms.p50", |r| r.etcd_floor.watch_ms.p50),
    ("machine.loadavg_start_1m", |r| r.machine.loadavg_start[0]),
];

/// A run that did not complete.
#[derive(Debug, Clone, Serialize)]
pub struct RunFailure {
    /// Its number (from 1).
    pub run: usize,
    /// Why.
    pub error: String,
}

/// The result of `--repeats N` (printed with `--json`, always written to the output file).
#[derive(Debug, Clone, Serialize)]
pub struct RepeatedReport {
    /// Runs asked for.
    pub repeats: usize,
    /// Runs that completed (their figures are in `summary` and `runs`).
    pub completed: usize,
    /// Completed runs whose delivery checks failed (an agent differing from the truth, an
    /// undelivered move or a stream not reopened): counted in `summary` all the same.
    pub checks_failed: usize,
    /// Runs that did not complete.
    pub failed: Vec<RunFailure>,
    /// min / median / max over the completed runs, by figure ([`FIGURES`]).
    pub summary: BTreeMap<&'static str, Spread>,
    /// Every completed run in full.
    pub runs: Vec<BenchReport>,
}

impl RepeatedReport {
    /// Summarises `runs` out of `repeats`, `failed` being the others.
    pub fn new(repeats: usize, runs: Vec<BenchReport>, failed: Vec<RunFailure>) -> RepeatedReport {
        let summary = FIGURES
            .iter()
            .map(|(name, read)| (*name, Spread::of(&runs.iter().map(read).collect::<Vec<_>>())))
            .collect();
        RepeatedReport {
            repeats,
            completed: runs.len(),
            checks_failed: runs.iter().filter(|r| !r.checks_pass()).count(),
            failed,
            summary,
            runs,
        }
    }

    /// Prints the spread of every figure.
    pub fn print(&self) {
        let Some(first) = self.runs.first() else {
            println!("victor-lab bench: none of {} runs completed", self.repeats);
            return;
        };
        println!(
            "victor-lab bench: {} FEs, {} bindings, {} replica(s), {} of {} runs completed ({} with failed checks)",
            first.fes, first.bindings, first.replicas, self.completed, self.repeats, self.checks_failed
        );
        println!("  {:<36} {:>12} {:>12} {:>12}", "figure", "min", "median", "max");
        for (name, _) in FIGURES {
            let s = self.summary[name];
            println!("  {name:<36} {:>12} {:>12} {:>12}", s.min, s.median, s.max);
        }
        for f in &self.failed {
            println!("  run {} failed: {}", f.run, f.error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_names_are_unique() {
        let mut names: Vec<_> = FIGURES.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FIGURES.len());
    }
}
