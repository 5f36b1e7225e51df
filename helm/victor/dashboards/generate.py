#!/usr/bin/env python3
"""Writes victor-controller.json, the Grafana dashboard shipped by the chart.

Edit PANELS (title, unit, PromQL queries) and run `python3 helm/victor/dashboards/generate.py`;
helm/tests checks that the committed JSON is what this script produces and that every query
only uses `victor_*` metrics (plus `up`).
"""

import json
import pathlib

# Metric names follow the controller's /metrics. `$__rate_interval` and `$job` are Grafana
# variables; each query is filtered by the job (the Service of the release).
SEL = '{job=~"$job"}'
PANELS = [
    ("Bindings", "short", [("bindings", f"max(victor_bindings{SEL})")]),
    ("Moves per second", "ops", [("moves", f"sum(rate(victor_binding_moves_total{SEL}[$__rate_interval]))")]),
    (
        "Claims rejected per second, by reason",
        "ops",
        [("{{reason}}", f"sum by (reason) (rate(victor_claims_rejected_total{SEL}[$__rate_interval]))")],
    ),
    ("Agent stream clients, by replica", "short", [("{{pod}}", f"sum by (pod) (victor_stream_clients{SEL})")]),
    (
        "Store request latency",
        "s",
        [
            (
                f"p{q} {{{{op}}}}",
                f"histogram_quantile(0.{q}, sum by (le, op) "
                f"(rate(victor_store_request_duration_seconds_bucket{SEL}[$__rate_interval])))",
            )
            for q in ("50", "99")
        ],
    ),
    ("Replicas up", "short", [("up", f"sum(up{SEL})")]),
]


def dashboard() -> dict:
    panels = []
    for n, (title, unit, queries) in enumerate(PANELS):
        panels.append(
            {
                "id": n + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": (n % 2) * 12, "y": (n // 2) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (legend, expr) in enumerate(queries)
                ],
            }
        )
    return {
        "uid": "victor-controller",
        "title": "VICTOR controller",
        "tags": ["victor"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(victor_bindings, job)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("victor-controller.json")
    out.write_text(render())
    print(f"wrote {out}")
