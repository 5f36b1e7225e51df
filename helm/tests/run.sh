#!/usr/bin/env bash
# Tests of the Helm chart helm/victor, run by CI: renders it with the real Helm v4 engine
# (PyPI helm-python-sdk, Helm embedded as a library: no helm binary), lints it, validates every
# object against the Kubernetes schemas (PyPI kubernetes-validate), checks its structure and its
# schema's error messages, and feeds its command lines to the real victor-controller and etcd.
# Exits non-zero on any failure. Extra arguments go to pytest (e.g. -k drift, -x).
#
# Environment:
#   VICTOR_HELM_VENV       virtualenv of the Python tools
#                          (default ~/.cache/victor/helm-tests-venv, reused while requirements.txt
#                          is unchanged)
#   VICTOR_CONTROLLER_BIN  victor-controller to test (default: <target dir>/debug/victor-controller,
#                          built with `cargo build -p victor-controller` when missing)
#   PYTHON                 Python 3.10+ used to create the virtualenv (default python3)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}
venv=${VICTOR_HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/victor/helm-tests-venv}
requirements="$here/requirements.txt"

# ---- Python tools, installed once per requirements.txt content into a virtualenv (under a lock:
# parallel runs), or with `pip install --user` where the venv module is missing.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
want=$(sha256sum "$requirements" | cut -d' ' -f1)
tools_ok() { "$1" -c 'import helm_python, kubernetes_validate, pytest, yaml' 2>/dev/null; }
if [[ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" == "$want" ]] && tools_ok "$venv/bin/python"; then
    py="$venv/bin/python"
else
    echo "helm tests: installing $(grep -v '^#' "$requirements" | xargs) into $venv"
    rm -rf "$venv"
    if "$python" -m venv "$venv"; then
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$want" >"$venv/.requirements.sha256"
        py="$venv/bin/python"
    else
        echo "helm tests: no venv module; installing with pip install --user"
        rm -rf "$venv"
        "$python" -m pip install --quiet --disable-pip-version-check --user -r "$requirements"
        py="$python"
    fi
fi
flock -u 9

# ---- The controller binary whose flags the chart must match.
if [[ -z "${VICTOR_CONTROLLER_BIN:-}" ]]; then
    target=${CARGO_TARGET_DIR:-$repo/target}
    VICTOR_CONTROLLER_BIN="$target/debug/victor-controller"
    if [[ ! -x "$VICTOR_CONTROLLER_BIN" ]]; then
        echo "helm tests: building victor-controller"
        (cd "$repo" && cargo build --quiet -p victor-controller)
    fi
fi
export VICTOR_CONTROLLER_BIN
echo "helm tests: $("$py" -c 'import helm_python as h; print("Helm", h.helm_sdk_version())'), controller $VICTOR_CONTROLLER_BIN"

cd "$here"
export PYTHONDONTWRITEBYTECODE=1
exec "$py" -m pytest -p no:cacheprovider -q -rfE "$@"
