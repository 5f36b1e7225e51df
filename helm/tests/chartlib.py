"""Helpers for the chart tests: render helm/victor with the real Helm v4 engine (helm-python-sdk)
and pick objects, containers and flags out of the result."""

from __future__ import annotations

import functools
import pathlib
from dataclasses import dataclass
from typing import Any

import helm_python as helm
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "victor"
CI_VALUES = CHART / "ci"
RELEASE = "victor"
NAMESPACE = "vic"
# Kubernetes versions the manifests are validated against: the chart's kubeVersion floor and a
# recent release (both shipped by kubernetes-validate).
KUBE_VERSIONS = ("1.27.0", "1.34.0")
# Kinds that are CRDs: kubernetes-validate has no schema for them.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def value_set_names() -> list[str]:
    return sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES.glob("*-values.yaml"))


def value_set(name: str) -> dict[str, Any]:
    return yaml.safe_load((CI_VALUES / f"{name}-values.yaml").read_text()) or {}


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Rendered:
    """One rendering: the manifests by template and the parsed objects."""

    templates: dict[str, str]
    objects: list[dict[str, Any]]

    @property
    def notes(self) -> str:
        return next((text for path, text in self.templates.items() if path.endswith("NOTES.txt")), "")

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def controller(self) -> dict[str, Any]:
        return self.one("Deployment", RELEASE)

    def controller_container(self) -> dict[str, Any]:
        return container(self.controller(), "controller")


def render(values: dict[str, Any]) -> Rendered:
    """Renders like `helm template`: the values are validated against values.schema.json first."""
    templates = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(templates.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(templates, objects)


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"container {name} in {[c['name'] for c in containers]}"
    return found[0]


def flags(args: list[str]) -> dict[str, list[str]]:
    """`--name=value` / `--name` arguments as {name: [values...]} ("" for a bare switch)."""
    out: dict[str, list[str]] = {}
    for arg in args:
        assert arg.startswith("--"), f"argument {arg!r} is not a --flag"
        name, _, value = arg[2:].partition("=")
        out.setdefault(name, []).append(value)
    return out


def flag(args: list[str], name: str) -> str:
    values = flags(args).get(name, [])
    assert len(values) == 1, f"--{name} given {len(values)} times in {args}"
    return values[0]


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
