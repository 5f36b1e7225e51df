"""The chart rendered by the real Helm v4 engine: lint, Kubernetes schemas, structure, bad values.

Run through helm/tests/run.sh (it sets up the Python environment and builds the controller).
"""

from __future__ import annotations

import json
import re

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from chartlib import (
    CHART,
    REPO,
    CRD_KINDS,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    container,
    deep_merge,
    flag,
    flags,
    render,
    selector_matches,
    value_set,
    value_set_names,
)

SETS = value_set_names()
ETCD = f"{RELEASE}-etcd"
DNS_SUFFIX = f"{ETCD}.{NAMESPACE}.svc.cluster.local"


def test_every_expected_value_set_exists():
    assert SETS == ["bundled-etcd", "external-etcd", "five-replicas", "monitoring", "tls"]


# ---------------------------------------------------------------- lint and Kubernetes schemas


@pytest.mark.parametrize("name", SETS)
def test_lint_is_clean(name):
    for kube in KUBE_VERSIONS:
        report = helm.lint(CHART, value_set(name), strict=True, namespace=NAMESPACE, kube_version=f"v{kube}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], f"helm lint ({kube}): {report}"


def test_lint_of_bare_defaults_names_the_two_required_settings():
    report = helm.lint(CHART, None, strict=True, namespace=NAMESPACE)
    text = "\n".join(report["errors"])
    assert "at '/controller/mobilePrefixes': minItems: got 0, want 1" in text, text
    assert "at '/etcd/external/endpoints': minItems: got 0, want 1" in text, text


@pytest.mark.parametrize("name", SETS)
def test_every_object_validates_against_kubernetes_schemas(name):
    rendered = render(value_set(name))
    validated = set()
    for obj in rendered.objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_KINDS:
            continue  # a CRD (ServiceMonitor): kubernetes-validate ships no schema for it
        for kube in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, kube, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} against {kube}: {path}: {e.message}")
        validated.add(obj["kind"])
    expected = {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    if value_set(name).get("etcd", {}).get("bundled", {}).get("enabled"):
        expected |= {"StatefulSet"}
    if value_set(name).get("grafanaDashboard", {}).get("enabled"):
        expected |= {"ConfigMap"}
    assert validated == expected


def test_install_dry_run_renders_the_same_manifest_as_template():
    values = value_set("external-etcd")
    with helm.Config(namespace=NAMESPACE, storage_driver="memory") as cfg:
        release = cfg.install(CHART, RELEASE, values, dry_run="client", namespace=NAMESPACE)
    installed = [d for d in yaml.safe_load_all(release["manifest"]) if d]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(installed, key=key) == sorted(render(values).objects, key=key)
    assert "victor-fe-agent --controller" in release["notes"]


# ---------------------------------------------------------------- controller structure


@pytest.mark.parametrize("name", SETS)
def test_controller_workload_shape(name):
    values = value_set(name)
    r = render(values)
    deploy = r.controller()
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    replicas = values.get("replicas", 3)
    assert deploy["spec"]["replicas"] == replicas
    assert selector_matches(deploy["spec"]["selector"]["matchLabels"], pod_labels)
    c = r.controller_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert flag(c["args"], "http-listen") == "0.0.0.0:8080", "probes must reach the HTTP port on the pod IP"
    assert flag(c["args"], "grpc-listen") == "0.0.0.0:50051"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["command"] == ["victor-controller"]
    env = {e["name"]: e for e in c["env"]}
    assert env["VICTOR_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]
    # Anti-affinity spreading the replicas: soft by default, hard when asked.
    anti = spec["affinity"]["podAntiAffinity"]
    if values.get("podAntiAffinity", {}).get("type") == "hard":
        (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    else:
        (weighted,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        term = weighted["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    # PodDisruptionBudget: all replicas but one.
    pdb = r.one("PodDisruptionBudget", RELEASE)
    assert pdb["spec"]["minAvailable"] == replicas - 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    # Two Services selecting the replicas, targeting the named container ports.
    grpc = r.one("Service", f"{RELEASE}-grpc")
    http = r.one("Service", f"{RELEASE}-http")
    for svc, port in ((grpc, "grpc"), (http, "http")):
        assert selector_matches(svc["spec"]["selector"], pod_labels)
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port]


def test_single_replica_has_no_pdb_and_explicit_min_available_is_used():
    base = value_set("external-etcd")
    assert not render(deep_merge(base, {"replicas": 1})).all("PodDisruptionBudget")
    pdb = render(deep_merge(base, {"replicas": 5, "podDisruptionBudget": {"minAvailable": 3}})).one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 3


def test_five_replicas_hard_anti_affinity_and_node_port():
    r = render(value_set("five-replicas"))
    assert r.controller()["spec"]["replicas"] == 5
    assert r.one("PodDisruptionBudget")["spec"]["minAvailable"] == 4
    grpc = r.one("Service", f"{RELEASE}-grpc")
    assert grpc["spec"]["type"] == "NodePort"
    assert grpc["spec"]["ports"][0]["nodePort"] == 30051
    assert "victor-fe-agent --controller <any node address>:$PORT" in r.notes, r.notes


def test_external_etcd_endpoints_and_no_bundled_objects():
    values = value_set("external-etcd")
    r = render(values)
    args = r.controller_container()["args"]
    assert flag(args, "etcd-endpoints").split(",") == values["etcd"]["external"]["endpoints"]
    assert flag(args, "etcd-prefix") == "/victor"
    assert flags(args)["mobile-prefix"] == ["10.10.0.0/16"]
    assert not r.all("StatefulSet")
    assert not any(f.startswith("etcd-") and f.endswith("-file") for f in flags(args)), "no etcd TLS by default"
    assert "volumes" not in r.controller()["spec"]["template"]["spec"], "nothing to mount without TLS"


def test_ipv6_and_dual_stack_mobile_prefixes_render_as_flags():
    for prefixes in (["fd00:10::/64"], ["10.10.0.0/16", "fd00:10::/64", "2001:db8:ab::/48"]):
        values = deep_merge(value_set("external-etcd"), {"controller": {"mobilePrefixes": prefixes}})
        r = render(values)
        assert flags(r.controller_container()["args"])["mobile-prefix"] == prefixes
        assert f"mobile prefixes: {', '.join(prefixes)}" in r.notes, r.notes


def test_notes_tell_how_to_point_fe_agents_at_the_cluster():
    notes = render(value_set("external-etcd")).notes
    assert f"victor-fe-agent --controller {RELEASE}-grpc.{NAMESPACE}.svc.cluster.local:50051" in notes, notes
    assert "plaintext" in notes
    lb = render(value_set("tls")).notes
    assert "victor-fe-agent --controller $ADDR:50051" in lb and "loadBalancer.ingress" in lb, lb


# ---------------------------------------------------------------- bundled etcd


def test_bundled_etcd_statefulset_and_initial_cluster():
    r = render(value_set("bundled-etcd"))
    sts = r.one("StatefulSet", ETCD)
    headless = r.one("Service", ETCD)
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == ETCD
    assert sts["spec"]["podManagementPolicy"] == "Parallel", "members must start together to bootstrap"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(headless["spec"]["selector"], pod_labels)
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]} == {"client": 2379, "peer": 2380}

    etcd = container(sts, "etcd")
    args = etcd["args"]
    members = dict(m.split("=", 1) for m in flag(args, "initial-cluster").split(","))
    names = [f"{ETCD}-{i}" for i in range(3)]
    assert members == {n: f"http://{n}.{DNS_SUFFIX}:2380" for n in names}
    assert flag(args, "initial-cluster-state") == "new"
    assert flag(args, "name") == "$(POD_NAME)"
    env = {e["name"]: e for e in etcd["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # What each member advertises (after Kubernetes expands $(POD_NAME)) is its initial-cluster entry.
    for n in names:
        peer = flag(args, "initial-advertise-peer-urls").replace("$(POD_NAME)", n)
        assert peer == members[n]
        client = flag(args, "advertise-client-urls").replace("$(POD_NAME)", n)
        assert client == f"http://{n}.{DNS_SUFFIX}:2379"
    assert flag(args, "listen-peer-urls") == "http://0.0.0.0:2380"
    assert flag(args, "listen-client-urls") == "http://0.0.0.0:2379"

    # Persistent volumes: one claim per member, mounted where --data-dir lives.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    (mount,) = [m for m in etcd["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert flag(args, "data-dir").startswith(mount["mountPath"] + "/")

    # The controller talks to every member by its stable name; a quorum survives disruptions.
    endpoints = flag(r.controller_container()["args"], "etcd-endpoints").split(",")
    assert endpoints == [f"http://{n}.{DNS_SUFFIX}:2379" for n in names]
    assert r.one("PodDisruptionBudget", ETCD)["spec"]["minAvailable"] == 2


def test_bundled_etcd_member_count_follows_values():
    r = render(deep_merge(value_set("bundled-etcd"), {"etcd": {"bundled": {"replicas": 5}}}))
    sts = r.one("StatefulSet", ETCD)
    members = flag(container(sts, "etcd")["args"], "initial-cluster").split(",")
    assert [m.split("=")[0] for m in members] == [f"{ETCD}-{i}" for i in range(5)]
    assert len(flag(r.controller_container()["args"], "etcd-endpoints").split(",")) == 5
    assert r.one("PodDisruptionBudget", ETCD)["spec"]["minAvailable"] == 3


# ---------------------------------------------------------------- TLS material from Secrets


def secret_files(workload: dict, container_name: str) -> dict[str, tuple[str, str]]:
    """Path of every file the container sees from a Secret -> (secret name, key in the Secret)."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    out = {}
    for m in container(workload, container_name).get("volumeMounts", []):
        secret = volumes[m["name"]].get("secret")
        if secret is None:
            continue
        assert m.get("readOnly") is True, f"secret mount {m['name']} must be read-only"
        for item in secret["items"]:
            out[f"{m['mountPath']}/{item['path']}"] = (secret["secretName"], item["key"])
    return out


def test_tls_files_come_from_the_referenced_secrets():
    r = render(value_set("tls"))
    files = secret_files(r.controller(), "controller")
    args = flags(r.controller_container()["args"])
    expected = {
        "tls-cert-file": ("victor-grpc-tls", "tls.crt"),
        "tls-key-file": ("victor-grpc-tls", "tls.key"),
        "tls-client-ca-file": ("victor-agents-ca", "ca.crt"),
        "etcd-ca-file": ("victor-etcd-client", "ca.crt"),
        "etcd-cert-file": ("victor-etcd-client", "tls.crt"),
        "etcd-key-file": ("victor-etcd-client", "tls.key"),
        "auth-tokens-file": ("victor-api-tokens", "tokens"),
    }
    for name, source in expected.items():
        (path,) = args[name]
        assert files.get(path) == source, f"--{name}={path} is not mounted from {source}: {files}"
    assert len(files) == len(expected), f"unexpected mounted files: {files}"


def test_etcd_tls_without_client_auth_mounts_only_the_ca():
    values = deep_merge(value_set("tls"), {"etcd": {"external": {"tls": {"clientAuth": False}}}})
    r = render(values)
    args = flags(r.controller_container()["args"])
    assert "etcd-ca-file" in args and "etcd-cert-file" not in args and "etcd-key-file" not in args
    files = secret_files(r.controller(), "controller")
    assert [p for p in files if "etcd" in p] == ["/etc/victor/etcd-tls/ca.crt"]


# ---------------------------------------------------------------- monitoring


def test_service_monitor_and_dashboard():
    r = render(value_set("monitoring"))
    sm = r.one("ServiceMonitor", RELEASE)
    http = r.one("Service", f"{RELEASE}-http")
    assert selector_matches(sm["spec"]["selector"]["matchLabels"], http["metadata"]["labels"])
    assert not selector_matches(sm["spec"]["selector"]["matchLabels"], r.one("Service", f"{RELEASE}-grpc")["metadata"]["labels"])
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in http["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    cm = r.one("ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "dashboards" / "victor-controller.json").read_text()
    assert json.loads(cm["data"]["victor-controller.json"]) == json.loads(shipped)
    # Off by default.
    plain = render(value_set("external-etcd"))
    assert not plain.all("ServiceMonitor") and not plain.all("ConfigMap")


def test_dashboard_is_generated_and_queries_victor_metrics():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", CHART / "dashboards" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    shipped = (CHART / "dashboards" / "victor-controller.json").read_text()
    assert gen.render() == shipped, "run python3 helm/victor/dashboards/generate.py and commit the result"
    exprs = [t["expr"] for p in json.loads(shipped)["panels"] for t in p.get("targets", [])]
    metrics = {m for e in exprs for m in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", e)}
    assert metrics and all(m.startswith("victor_") or m == "up" for m in metrics), metrics
    for wanted in (
        "victor_bindings",
        "victor_moves_total",
        "victor_claims_rejected_total",
        "victor_damping_frozen_total",
        "victor_agent_streams",
        "victor_stream_lag_revisions_bucket",
        "victor_store_request_seconds_bucket",
        "victor_move_convergence_seconds_bucket",
        "victor_agent_dataplane_packets_total",
        "victor_agent_dataplane_bytes_total",
        "victor_agent_dataplane_drops_total",
        "victor_agent_bindings",
    ):
        assert wanted in metrics, f"no panel for {wanted}: {sorted(metrics)}"
    exposed = exposed_metrics()
    unknown = sorted(m for m in metrics - {"up"} if m not in exposed)
    assert not unknown, f"the dashboard queries metrics no daemon exposes: {unknown} (exposed: {sorted(exposed)})"


def exposed_metrics() -> set[str]:
    """Metric names the daemons expose, derived from their prometheus-client registrations:
    `registry.register("name", help, m.field.clone())` with the field's type, and the collectors'
    `encode_descriptor("name", ...)` counters. Counters get `_total`, histograms `_bucket`."""
    names = set()
    for source, prefix in (("controller/src/metrics.rs", "victor_"), ("fe-agent/src/metrics.rs", "victor_agent_")):
        text = (REPO / source).read_text()
        fields = dict(re.findall(r"pub (\w+): ((?:Family<[^>]*>)|\w+),", text))
        for name, field in re.findall(r'register\(\s*"(\w+)",\s*"[^"]*",\s*m\.(\w+)\.clone\(\)', text):
            kind = fields.get(field, "")
            suffix = "_bucket" if "Histogram" in kind else "_total" if "Counter" in kind else ""
            names.add(f"{prefix}{name}{suffix}")
        for name in re.findall(r'(?:encode_descriptor\(\s*|\(\s*)"(\w+)",\s*"[^"]*",\s*(?:None|0usize|1)', text):
            names.add(f"{prefix}{name}_total")
    return names


# ---------------------------------------------------------------- bad values


BAD = [
    ("replicas 0", {"replicas": 0}, "at '/replicas': minimum: got 0, want 1"),
    ("no etcd", {"etcd": {"external": {"endpoints": []}}}, "at '/etcd/external/endpoints': minItems: got 0, want 1"),
    ("both etcd modes", {"etcd": {"bundled": {"enabled": True}}}, "at '/etcd/external/endpoints': maxItems: got 3, want 0"),
    (
        "bundled etcd with external etcd TLS",
        {"etcd": {"external": {"endpoints": [], "tls": {"enabled": True, "secretName": "s"}}, "bundled": {"enabled": True}}},
        "at '/etcd/external/tls/enabled': value must be false",
    ),
    ("bad prefix", {"controller": {"etcdPrefix": "victor/"}}, "at '/controller/etcdPrefix': 'victor/' does not match pattern"),
    ("prefix with trailing slash", {"controller": {"etcdPrefix": "/victor/"}}, "at '/controller/etcdPrefix'"),
    ("no mobile prefix", {"controller": {"mobilePrefixes": []}}, "at '/controller/mobilePrefixes': minItems: got 0, want 1"),
    ("mobile prefix not a CIDR", {"controller": {"mobilePrefixes": ["10.10.0.0"]}}, "at '/controller/mobilePrefixes/0': '10.10.0.0' does not match"),
    ("IPv6 mobile prefix too long", {"controller": {"mobilePrefixes": ["fd00:10::/129"]}}, "at '/controller/mobilePrefixes/0': 'fd00:10::/129' does not match"),
    ("IPv6 mobile prefix without a length", {"controller": {"mobilePrefixes": ["fd00:10::"]}}, "at '/controller/mobilePrefixes/0': 'fd00:10::' does not match"),
    ("endpoint not a URL", {"etcd": {"external": {"endpoints": ["10.0.0.1:2379"]}}}, "at '/etcd/external/endpoints/0': '10.0.0.1:2379' does not match"),
    ("grpc TLS without Secret", {"tls": {"enabled": True}}, "at '/tls/secretName': minLength: got 0, want 1"),
    (
        "etcd TLS without Secret",
        {"etcd": {"external": {"endpoints": ["https://e:2379"], "tls": {"enabled": True}}}},
        "at '/etcd/external/tls/secretName': minLength: got 0, want 1",
    ),
    (
        "etcd TLS with http endpoint",
        {"etcd": {"external": {"endpoints": ["http://e:2379"], "tls": {"enabled": True, "secretName": "s"}}}},
        "at '/etcd/external/endpoints/0': 'http://e:2379' does not match pattern '^https://'",
    ),
    ("typo in a key", {"replica": 3}, "additional properties 'replica' not allowed"),
    ("bad duration", {"controller": {"sessionTtl": "10"}}, "at '/controller/sessionTtl': '10' does not match"),
    ("bundled etcd of 2", {"etcd": {"external": {"endpoints": []}, "bundled": {"enabled": True, "replicas": 2}}}, "at '/etcd/bundled/replicas': value must be one of 1, 3, 5"),
    ("bad log format", {"controller": {"logFormat": "xml"}}, "at '/controller/logFormat': value must be one of 'json', 'text'"),
]


@pytest.mark.parametrize("case,override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_fail_with_the_schema_message(case, override, message):
    values = deep_merge(value_set("external-etcd"), override)
    with pytest.raises(helm.HelmValuesError) as err:
        render(values)
    assert "values don't meet the specifications of the schema" in str(err.value)
    assert message in str(err.value), f"{case}: {err.value}"


def test_pdb_that_would_block_every_drain_is_refused():
    values = deep_merge(value_set("external-etcd"), {"podDisruptionBudget": {"minAvailable": 3}})
    with pytest.raises(helm.HelmRenderError) as err:
        render(values)
    assert "podDisruptionBudget.minAvailable (3) must be lower than replicas (3)" in str(err.value)


# ---------------------------------------------------------------- documentation


def value_paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict) and value and not key.endswith(("resources", "SecurityContext", "securityContext", "labels")):
            out.extend(value_paths(value, path + "."))
    return out


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", readme, re.M))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    leaves = {p for p in value_paths(defaults) if not isinstance(_get(defaults, p), dict) or not _get(defaults, p) or p.endswith(("resources", "SecurityContext", "securityContext", "labels"))}
    missing = sorted(leaves - documented)
    assert not missing, f"values missing from helm/victor/README.md: {missing}"
    stale = sorted(documented - set(value_paths(defaults)))
    assert not stale, f"README documents values that do not exist: {stale}"


def _get(tree: dict, path: str):
    for key in path.split("."):
        tree = tree[key]
    return tree


def documented_installs() -> list[tuple[str, list[str]]]:
    """Every `helm install ... --set ...` command in the chart README and docs/deploy.md."""
    import shlex

    from chartlib import REPO

    out = []
    for doc in (CHART / "README.md", REPO / "docs" / "deploy.md"):
        text = doc.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.strip().startswith("helm install "):
                words = shlex.split(line)
                sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
                out.append((f"{doc.name}: {line.strip()[:60]}", sets))
    return out


def test_documented_install_commands_render():
    installs = documented_installs()
    assert len(installs) >= 4, installs
    modes = set()
    for where, sets in installs:
        values: dict = {}
        for expression in sets:
            values = deep_merge(values, helm.parse_set_string(expression))
        r = render(values)
        modes.add("bundled" if r.all("StatefulSet") else "external")
        assert r.controller()["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.example/victor:"), where
    assert modes == {"bundled", "external"}, "the docs show both etcd modes"
