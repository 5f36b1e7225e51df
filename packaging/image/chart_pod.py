#!/usr/bin/env python3
"""Prints how the Helm chart runs the controller container, as JSON, for the image test
(packaging/image/run-test.sh): renders helm/victor with the real Helm engine (the chart tests'
helm/tests/chartlib.py and their virtualenv) and the given etcd endpoint, and picks out the
controller container's command, args, env, ports and security settings.

    chart_pod.py ETCD_ENDPOINT POD_NAME
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "helm" / "tests"))

from chartlib import render  # noqa: E402


def main() -> None:
    endpoint, pod_name = sys.argv[1], sys.argv[2]
    values = {"controller": {"mobilePrefixes": ["10.10.0.0/16"]}, "etcd": {"external": {"endpoints": [endpoint]}}}
    rendered = render(values)
    spec = rendered.controller()["spec"]["template"]["spec"]
    c = rendered.controller_container()
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        else:
            raise SystemExit(f"chart_pod.py: env {e['name']}: teach this script how Kubernetes fills {e}")
    print(
        json.dumps(
            {
                "command": c.get("command", []),
                "args": c.get("args", []),
                "env": env,
                "ports": {p["name"]: p["containerPort"] for p in c.get("ports", [])},
                "readiness": c["readinessProbe"]["httpGet"],
                "securityContext": c.get("securityContext", {}),
                "podSecurityContext": spec.get("securityContext", {}),
                "volumeMounts": c.get("volumeMounts", []),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
