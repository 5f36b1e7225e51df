#!/usr/bin/env python3
"""Writes victor-controller.json, the Grafana dashboard shipped by the chart.

Edit SECTIONS (title, unit, PromQL queries) and run `python3 helm/victor/dashboards/generate.py`;
helm/tests checks that the committed JSON is what this script produces and that every query
only uses `victor_*` metrics (plus `up`).

Metric names are the real ones: the controller's /metrics (controller/src/metrics.rs, prefix
`victor_`) and the fe-agent's /metrics (fe-agent/src/metrics.rs, prefix `victor_agent_`).
prometheus-client exposes counters with a `_total` suffix and histograms as `_bucket`/`_sum`/
`_count`. `$__rate_interval`, `$job` (the controller Service of the release) and `$agent_job` (the
scrape job of the fe-agents, which run outside the chart) are Grafana variables.
"""

import json
import pathlib

C = '{job=~"$job"}'
A = '{job=~"$agent_job"}'
RATE = "[$__rate_interval]"


def quantiles(metric: str, by: str = "", sel: str = C, qs=("50", "99")) -> list:
    """p50/p99 of a histogram, optionally per label `by`."""
    group = f"le, {by}" if by else "le"
    legend = f" {{{{{by}}}}}" if by else ""
    return [
        (f"p{q}{legend}", f"histogram_quantile(0.{q}, sum by ({group}) (rate({metric}_bucket{sel}{RATE})))")
        for q in qs
    ]


CONTROLLER = [
    (
        "Bindings, by address family",
        "short",
        [
            ("bindings {{family}}", f"max by (family) (victor_bindings{C})"),
            ("frozen (damping) {{family}}", f"max by (family) (victor_bindings_frozen{C})"),
            ("declared VMs {{family}}", f"max by (family) (victor_vms_declared{C})"),
        ],
    ),
    (
        "Moves per second, by address family",
        "ops",
        [("moves {{family}}", f"sum by (family) (rate(victor_moves_total{C}{RATE}))")],
    ),
    (
        "Claims per second, by outcome and address family",
        "ops",
        [("{{outcome}} {{family}}", f"sum by (outcome, family) (rate(victor_claims_total{C}{RATE}))")],
    ),
    (
        "Claims rejected per second, by reason",
        "ops",
        [("{{reason}}", f"sum by (reason) (rate(victor_claims_rejected_total{C}{RATE}))")],
    ),
    (
        "Binding watch events sent per second, by address family",
        "ops",
        [("{{family}}", f"sum by (family) (rate(victor_watch_events_total{C}{RATE}))")],
    ),
    (
        "Flap damping",
        "short",
        [
            ("frozen bindings", f"max(victor_bindings_frozen{C})"),
            ("freezes in the interval", f"sum(increase(victor_damping_frozen_total{C}{RATE}))"),
        ],
    ),
    (
        "FEs by health",
        "short",
        [("{{state}}", f"max by (state) (victor_fes{C})")],
    ),
    (
        "Stream clients, by replica",
        "short",
        [
            ("agents {{pod}}", f"sum by (pod) (victor_agent_streams{C})"),
            ("watchers {{pod}}", f"sum by (pod) (victor_binding_watchers{C})"),
            ("status pages {{pod}}", f"sum by (pod) (victor_status_clients{C})"),
        ],
    ),
    ("Agent stream lag (revisions behind when sending)", "short", quantiles("victor_stream_lag_revisions")),
    (
        "Move convergence on the controller (claim received to first agent send)",
        "s",
        quantiles("victor_move_convergence_seconds") + quantiles("victor_commit_to_cache_seconds", qs=("99",)),
    ),
    ("Store request latency", "s", quantiles("victor_store_request_seconds", by="op")),
    (
        "Store health",
        "short",
        [
            ("reachable {{pod}}", f"min by (pod) (victor_store_reachable{C})"),
            ("unavailable/s", f"sum(rate(victor_store_unavailable_total{C}{RATE}))"),
            ("CAS retries/s", f"sum(rate(victor_cas_retries_total{C}{RATE}))"),
            ("cache re-lists", f"max(victor_cache_relists{C})"),
        ],
    ),
    (
        "Refused calls per second (authentication)",
        "ops",
        [("{{service}} {{reason}}", f"sum by (service, reason) (rate(victor_auth_failures_total{C}{RATE}))")],
    ),
    (
        "Replicas",
        "short",
        [
            ("up", f"sum(up{C})"),
            ("housekeeper {{pod}}", f"max by (pod) (victor_housekeeper{C})"),
        ],
    ),
    ("Snapshots sent to agents per second", "ops", [("snapshots", f"sum(rate(victor_snapshots_sent_total{C}{RATE}))")]),
]

AGENTS = [
    (
        "Data plane packets per second, by FE and direction",
        "pps",
        [("{{instance}} {{direction}}", f"sum by (instance, direction) (rate(victor_agent_dataplane_packets_total{A}{RATE}))")],
    ),
    (
        "Data plane bytes per second, by FE and direction",
        "Bps",
        [("{{instance}} {{direction}}", f"sum by (instance, direction) (rate(victor_agent_dataplane_bytes_total{A}{RATE}))")],
    ),
    (
        "Data plane drops per second, by reason",
        "pps",
        [("{{instance}} {{reason}}", f"sum by (instance, reason) (rate(victor_agent_dataplane_drops_total{A}{RATE}))")],
    ),
    (
        "Bindings per FE (remote = tunnelled to a peer FE)",
        "short",
        [("{{instance}} {{kind}}", f"max by (instance, kind) (victor_agent_bindings{A})")],
    ),
    (
        "Claims rejected per second, by FE and reason",
        "ops",
        [("{{instance}} {{reason}}", f"sum by (instance, reason) (rate(victor_agent_claims_rejected_total{A}{RATE}))")],
    ),
    (
        "Controller link",
        "short",
        [
            ("connected {{instance}}", f"max by (instance) (victor_agent_controller_connected{A})"),
            ("sessions opened {{instance}}", f"sum by (instance) (increase(victor_agent_controller_sessions_total{A}{RATE}))"),
            ("reports queued {{instance}}", f"max by (instance) (victor_agent_reports_queued{A})"),
        ],
    ),
    (
        "Stream lag (agent receipt minus controller send)",
        "µs",
        [("{{instance}}", f"max by (instance) (victor_agent_stream_lag_microseconds{A})")],
    ),
    (
        "Kernel and data-plane operations per second",
        "ops",
        [("{{op}} {{result}}", f"sum by (op, result) (rate(victor_agent_reconcile_ops_total{A}{RATE}))")],
    ),
    (
        "ARP frames per second",
        "pps",
        [
            ("received {{kind}}", f"sum by (kind) (rate(victor_agent_arp_frames_total{A}{RATE}))"),
            ("sent {{kind}}", f"sum by (kind) (rate(victor_agent_arp_sent_total{A}{RATE}))"),
            ("rate-limited", f"sum(rate(victor_agent_neigh_rate_limited_total{A}{RATE}))"),
            ("dropped by the kernel (capture buffer full)", f"sum(rate(victor_agent_neigh_kernel_dropped_total{A}{RATE}))"),
        ],
    ),
    (
        "Table memory per FE",
        "bytes",
        [
            ("desired {{instance}}", f"max by (instance) (victor_agent_desired_bytes{A})"),
            ("FIB {{instance}}", f"max by (instance) (victor_agent_fib_bytes{A})"),
        ],
    ),
]

SECTIONS = [("Controller cluster", CONTROLLER), ("FE agents", AGENTS)]


def prometheus() -> dict:
    return {"type": "prometheus", "uid": "${datasource}"}


def job_variable(name: str, label: str, metric: str) -> dict:
    """A multi-select variable over the `job` label of `metric`."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": prometheus(),
        "query": f"label_values({metric}, job)",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
    }


def dashboard() -> dict:
    panels = []
    y = 0
    next_id = 1
    for section, rows in SECTIONS:
        panels.append(
            {"id": next_id, "type": "row", "title": section, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []}
        )
        next_id += 1
        y += 1
        for n, (title, unit, queries) in enumerate(rows):
            panels.append(
                {
                    "id": next_id,
                    "type": "timeseries",
                    "title": title,
                    "datasource": prometheus(),
                    "gridPos": {"h": 8, "w": 12, "x": (n % 2) * 12, "y": y + (n // 2) * 8},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                    "targets": [
                        {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                        for i, (legend, expr) in enumerate(queries)
                    ],
                }
            )
            next_id += 1
        y += ((len(rows) + 1) // 2) * 8
    return {
        "uid": "victor-controller",
        "title": "VICTOR",
        "description": "VICTOR controller cluster and FE agents (generated by helm/victor/dashboards/generate.py)",
        "tags": ["victor"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 2,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                job_variable("job", "Controller job", "victor_bindings"),
                job_variable("agent_job", "FE agent job", "victor_agent_stream_revision"),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("victor-controller.json")
    out.write_text(render())
    print(f"wrote {out}")
