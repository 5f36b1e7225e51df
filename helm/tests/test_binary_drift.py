"""Chart and binaries cannot drift apart: the command lines the chart renders are fed to the real
programs.

- The controller container's command, args and env from every rendered value set are run with
  the real `victor-controller --check-config` (validates, prints the config as JSON, exits).
  Secret-mounted files do not exist here, so every file the pod would see from a Secret is created
  under a temporary root and the mount path prefix in the flags is rewritten to it; the flags
  themselves are exactly what the chart renders.
- The bundled etcd's flags are checked against the real etcd's --help.
- The Dockerfile installs the binaries the chart runs, as the user the chart expects.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from chartlib import CHART, REPO, RELEASE, container, deep_merge, flag, flags, render, value_set, value_set_names

POD_NAME = f"{RELEASE}-5d8f7c9b6-x2x7q"


def controller_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("VICTOR_CONTROLLER_BIN", REPO / "target" / "debug" / "victor-controller"))
    assert path.is_file(), f"{path} missing: run helm/tests/run.sh (it builds victor-controller)"
    return path


def container_env(c: dict) -> dict[str, str]:
    """The container's environment as Kubernetes would set it for pod POD_NAME."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = POD_NAME
        else:
            pytest.fail(f"env {e['name']}: teach this test how Kubernetes fills {e.get('valueFrom')}")
    return env


def materialise_secret_mounts(workload: dict, name: str, root: pathlib.Path) -> list[str]:
    """Creates every Secret-provided file of the container under root; returns the mount paths."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = []
    for m in container(workload, name).get("volumeMounts", []):
        secret = volumes[m["name"]].get("secret")
        assert secret is not None, f"volume {m['name']}: only Secret volumes are expected"
        target = root / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for item in secret["items"]:
            (target / item["path"]).write_text(f"placeholder for key {item['key']} of Secret {secret['secretName']}\n")
        mounts.append(m["mountPath"])
    return mounts


def check_config(values: dict, tmp_path: pathlib.Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    r = render(values)
    c = r.controller_container()
    mounts = materialise_secret_mounts(r.controller(), "controller", tmp_path)
    args = []
    for arg in c["args"]:
        name, eq, value = arg.partition("=")
        for mount in mounts:
            if eq and value.startswith(mount + "/"):
                value = str(tmp_path) + value
        args.append(f"{name}{eq}{value}")
    (program,) = c["command"]
    assert program == "victor-controller"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **container_env(c)}
    proc = subprocess.run(
        [str(controller_bin()), *args, "--check-config"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc, c["args"]


@pytest.mark.parametrize("name", value_set_names())
def test_controller_accepts_the_rendered_command_line(name, tmp_path):
    proc, args = check_config(value_set(name), tmp_path)
    assert proc.returncode == 0, f"victor-controller rejected the chart's flags:\n{args}\n{proc.stderr}"
    try:
        config = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"victor-controller --check-config must print the config as JSON, printed {proc.stdout!r}")
    rendered = flags(args)
    assert config["replica_id"] == POD_NAME, "VICTOR_REPLICA_ID from the downward API"
    assert config["etcd_endpoints"] == flag(args, "etcd-endpoints").split(",")
    assert config["mobile_prefixes"] == rendered["mobile-prefix"]
    assert config["grpc_listen"] == flag(args, "grpc-listen")
    assert config["http_listen"] == flag(args, "http-listen")
    assert config["etcd_prefix"] == flag(args, "etcd-prefix")
    assert config["log_format"] == flag(args, "log-format")
    assert config["require_declared"] == ("require-declared" in rendered)
    for key in ("session_ttl", "fe_dead_after", "tombstone_retention"):
        assert config[key] == flag(args, key.replace("_", "-")), key
    for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "etcd_ca_file", "etcd_cert_file", "etcd_key_file", "auth_tokens_file"):
        flag_name = key.replace("_", "-")
        if flag_name in rendered:
            assert config[key] == str(tmp_path) + flag(args, flag_name), key
        else:
            assert config[key] is None, key


def test_tombstone_retention_reaches_the_controller(tmp_path):
    values = deep_merge(value_set("external-etcd"), {"controller": {"tombstoneRetention": "45m"}})
    proc, args = check_config(values, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tombstone_retention"] == "45m"


def test_controller_accepts_ipv6_mobile_prefixes(tmp_path):
    prefixes = ["10.10.0.0/16", "fd00:10::/64", "2001:db8:ab::/48"]
    values = deep_merge(value_set("external-etcd"), {"controller": {"mobilePrefixes": prefixes}})
    proc, _ = check_config(values, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mobile_prefixes"] == prefixes
    # An IPv6 prefix with host bits passes the schema; the real binary refuses it, saying what to write.
    values = deep_merge(value_set("external-etcd"), {"controller": {"mobilePrefixes": ["fd00:10::1/64"]}})
    proc, _ = check_config(values, tmp_path)
    assert proc.returncode != 0
    assert "did you mean fd00:10::/64" in proc.stderr, proc.stderr


def test_controller_check_is_not_vacuous(tmp_path):
    """A value the schema lets through but the controller refuses is caught by the real binary."""
    values = deep_merge(value_set("external-etcd"), {"controller": {"mobilePrefixes": ["10.10.0.1/16"]}})
    proc, _ = check_config(values, tmp_path)
    assert proc.returncode != 0
    assert "did you mean 10.10.0.0/16" in proc.stderr, proc.stderr


def test_bundled_etcd_flags_exist_in_etcd():
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    assert pathlib.Path(etcd).is_file(), "etcd is needed (Debian package etcd-server)"
    help_text = subprocess.run([etcd, "--help"], capture_output=True, text=True, timeout=30).stdout
    known = set(re.findall(r"^\s+--([a-z0-9-]+)", help_text, re.M))
    assert len(known) > 50, help_text[:500]
    sts = render(value_set("bundled-etcd")).one("StatefulSet", f"{RELEASE}-etcd")
    used = set(flags(container(sts, "etcd")["args"]))
    assert used <= known, f"flags etcd does not know: {sorted(used - known)}"


def test_dockerfile_ships_what_the_chart_runs():
    dockerfile = (REPO / "Dockerfile").read_text()
    for binary in ("victor-controller", "victor-fe-agent", "victorctl"):
        assert f"--bin {binary}" in dockerfile, f"Dockerfile does not build {binary}"
        assert re.search(rf"COPY --from=build\s+\S*/{binary}\s+/usr/local/bin/", dockerfile), f"{binary} not installed"
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert user, "the runtime stage must not run as root"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert user[-1] == f"{defaults['podSecurityContext']['runAsUser']}:{defaults['podSecurityContext']['runAsGroup']}"
    workspace_bins = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    targets = {t["name"] for p in json.loads(workspace_bins.stdout)["packages"] for t in p["targets"] if "bin" in t["kind"]}
    for binary in ("victor-controller", "victor-fe-agent", "victorctl"):
        assert binary in targets, f"no binary target {binary} in the workspace: {sorted(targets)}"
