#!/usr/bin/env bash
# The image built by build-image.sh, checked and run as the Helm chart runs it:
#
#  1. its configuration and files (always): the user is the chart's runAsUser:runAsGroup and not
#     root, the command and exposed ports are the Dockerfile's and include the chart's ports, every
#     binary the Dockerfile copies is there and runs on the image's own libc, the user exists in
#     the image's /etc/passwd, CA certificates and `ip` are there;
#  2. a container from it (runc, the OCI runtime Kubernetes' runtimes use): the chart's command
#     line, environment and security settings rendered by the real Helm engine (chart_pod.py):
#     user 10001:10001, read-only root file system, no capabilities, no privilege escalation, an
#     external etcd (the host's etcd, in the pod's network namespace); /readyz must answer 200 on
#     the chart's http port, victorctl must reach the gRPC port, the root must refuse writes.
#
#   packaging/image/run-test.sh [LAYOUT_DIR] [TAG]   (default target/packaging/image/oci, the version)
#
# Prints PASS/FAIL per check and `N passed, M failed`; exit 0 all passed, 1 a check failed, 77
# with `SKIPPED: <reason>` when no container can run here (then step 1 still ran and passed) or
# umoci/runc or the Helm engine (the chart tests' Python tools) cannot be installed.
# Seccomp (the chart's RuntimeDefault profile) is the container runtime's own and not reproduced.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=packaging/lib.sh
. "$here/../lib.sh"
version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
layout=${1:-$repo/target/packaging/image/oci}
tag=${2:-$version}
pk_need umoci jq curl etcd ip python3 || exit
# Without runc the configuration and files are still checked (step 1), then SKIPPED.
no_runtime=$(pk_need runc) || true

passed=0 failed=0
pass() { echo "  PASS $*"; passed=$((passed + 1)); }
fail() { echo "  FAIL $*"; failed=$((failed + 1)); }
check() { # description command...
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; return 1; fi
}

work=$(mktemp -d -p "$repo/target/packaging" run-test.XXXXXX)
id=victor-image-test-$$
ns=vimg$$
etcd_pid=""
cleanup() {
    runc kill "$id" KILL >/dev/null 2>&1
    runc delete --force "$id" >/dev/null 2>&1
    [[ -n $etcd_pid ]] && kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
    mkdir -p "$repo/target/packaging/logs/image" && cp "$work"/*.log "$work"/*.json "$repo/target/packaging/logs/image/" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# ---- the chart's view of the container
# The Helm engine is the chart tests' (helm/tests/run.sh installs it: a virtualenv, or pip --user
# where there is no venv module).
py=${VICTOR_HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/victor/helm-tests-venv}/bin/python
helm_engine() { "$py" -c 'import helm_python' 2>/dev/null || { py=python3 && "$py" -c 'import helm_python' 2>/dev/null; }; }
if ! helm_engine; then
    echo "run-test: installing the chart tests' Python tools (helm/tests/run.sh --collect-only)"
    bash "$repo/helm/tests/run.sh" --collect-only -q >"$work/helm-tools.log" 2>&1
    py=${VICTOR_HELM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/victor/helm-tests-venv}/bin/python
    helm_engine || {
        tail -n 5 "$work/helm-tools.log"
        pk_skip "the image as the chart runs it: the Helm engine (PyPI helm-python-sdk) cannot be installed (helm/tests/run.sh)"
        exit 77
    }
fi
"$py" "$here/chart_pod.py" http://127.0.0.1:2379 "victor-5d8f7c9b6-x2x7q" >"$work/pod.json" ||
    { echo "run-test: cannot render the chart (chart_pod.py)" >&2; exit 1; }
uid=$(jq -r .podSecurityContext.runAsUser "$work/pod.json")
gid=$(jq -r .podSecurityContext.runAsGroup "$work/pod.json")
fsgroup=$(jq -r '.podSecurityContext.fsGroup // empty' "$work/pod.json")

# ---- 1. configuration and files
umoci stat --image "$layout:$tag" --json >"$work/stat.json" 2>&1
blob() { jq -r '.manifests[0].digest' "$layout/index.json" | sed 's|sha256:|'"$layout"'/blobs/sha256/|'; }
manifest=$(blob)
config_digest=$(jq -r .config.digest "$manifest")
jq .config "$layout/blobs/sha256/${config_digest#sha256:}" >"$work/image-config.json"
plan=$(python3 "$here/dockerfile.py" "$repo/Dockerfile")
config() { jq -c "$@" "$work/image-config.json"; }
check "the image's user is the chart's runAsUser:runAsGroup ($uid:$gid), not root" \
    test "$(config -r .User)" = "$uid:$gid" -a "$uid" != 0
check "the image's command is the Dockerfile's ($(config .Cmd))" test "$(config .Cmd)" = "$(jq -c .config.Cmd <<<"$plan")"
for port in $(jq -r '.ports[]' "$work/pod.json"); do
    check "the image exposes the chart's port $port/tcp" test "$(config ".ExposedPorts | has(\"$port/tcp\")")" = true
done
umoci unpack --image "$layout:$tag" "$work/bundle" >"$work/unpack.log" 2>&1 || { cat "$work/unpack.log"; exit 1; }
rootfs=$work/bundle/rootfs
while read -r _ dest; do
    check "$dest is there, executable, and runs on the image's libc ($(chroot "$rootfs" "$dest" --version 2>&1 | head -n 1))" \
        sh -c "chroot '$rootfs' '$dest' --version >/dev/null"
done < <(jq -r '.copies[] | "\(.binary) \(.dest)"' <<<"$plan")
check "the image's /etc/passwd has the user $uid:$gid" \
    sh -c "awk -F: '\$3 == $uid && \$4 == $gid' '$rootfs/etc/passwd' | grep -q ."
check "CA certificates and ip are installed" test -s "$rootfs/etc/ssl/certs/ca-certificates.crt" -a -x "$rootfs/usr/bin/ip" -o -x "$rootfs/bin/ip"

# ---- 2. a container as the chart runs it
ip netns add "$ns" && ip -n "$ns" link set lo up || exit 1
mkdir -p "$work/etcd"
ip netns exec "$ns" etcd --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:2379 \
    --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 >"$work/etcd.log" 2>&1 &
etcd_pid=$!
config_json=$work/bundle/config.json
jq --slurpfile pod "$work/pod.json" --arg ns "/var/run/netns/$ns" --argjson uid "$uid" --argjson gid "$gid" \
    --arg fsgroup "$fsgroup" '
    $pod[0] as $p
    | .process.terminal = false
    | .process.args = ($p.command + $p.args)
    | .process.env = (.process.env + ($p.env | to_entries | map("\(.key)=\(.value)")))
    | .process.user = {uid: $uid, gid: $gid, additionalGids: (if $fsgroup == "" then [] else [$fsgroup | tonumber] end)}
    | .process.noNewPrivileges = ($p.securityContext.allowPrivilegeEscalation == false)
    | .process.capabilities = (if $p.securityContext.capabilities.drop == ["ALL"]
        then {bounding: [], effective: [], inheritable: [], permitted: [], ambient: []} else .process.capabilities end)
    | .root.readonly = ($p.securityContext.readOnlyRootFilesystem == true)
    | .hostname = "victor-5d8f7c9b6-x2x7q"
    | .linux.namespaces = [.linux.namespaces[] | if .type == "network" then {type: "network", path: $ns} else . end]
    ' "$config_json" >"$work/config.json" && mv "$work/config.json" "$config_json"
cp "$config_json" "$work/runtime-config.json"

# Can a container run here at all? (A probe with the same settings and /bin/true.)
mkdir -p "$work/probe"
jq --arg root "$rootfs" '.process.args = ["/bin/true"] | .root.path = $root' "$config_json" >"$work/probe/config.json"
if [[ -n $no_runtime ]] || ! runc run --bundle "$work/probe" "$id-probe" >"$work/probe.log" 2>&1; then
    runc delete --force "$id-probe" >/dev/null 2>&1
    echo "run-test: $passed passed, $failed failed (the image's configuration and files)"
    [[ $failed -eq 0 ]] || exit 1
    [[ -n $no_runtime ]] && pk_skip "running the image: ${no_runtime#SKIPPED: }"
    [[ -z $no_runtime ]] && pk_skip "running the image: runc cannot start a container here: $(tail -n 1 "$work/probe.log")"
    exit 77
fi

runc run --detach --bundle "$work/bundle" "$id" >"$work/container.log" 2>&1 </dev/null
http=$(jq -r .ports.http "$work/pod.json")
grpc=$(jq -r .ports.grpc "$work/pod.json")
path=$(jq -r .readiness.path "$work/pod.json")
if pk_wait_http "http://127.0.0.1:$http$path" 60 "$ns"; then
    pass "the container answers $path 200 on the chart's http port $http (etcd reachable, cache loaded)"
else
    fail "the container did not become ready on $path (log below)"
    tail -n 20 "$work/container.log"
fi
pid=$(runc state "$id" 2>/dev/null | jq -r .pid)
field() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
check "the controller in the container runs as $uid:$gid with no capability" \
    test "$(field "$pid" Uid) $(field "$pid" Gid) $(field "$pid" CapEff) $(field "$pid" CapBnd)" = \
    "$uid $gid 0000000000000000 0000000000000000"
check "  ... and cannot gain privileges (NoNewPrivs)" test "$(field "$pid" NoNewPrivs)" = 1
runc exec "$id" /bin/sh -c 'touch /probe' >"$work/write.log" 2>&1
check "the root file system is read-only ($(head -c 80 "$work/write.log"))" grep -q "Read-only file system" "$work/write.log"
ip netns exec "$ns" "$repo/target/debug/victorctl" --controller "127.0.0.1:$grpc" -o json status >"$work/status.json" 2>&1
check "victorctl reaches the chart's gRPC port $grpc (store: $(jq -r .store_kind "$work/status.json" 2>/dev/null))" \
    jq -e '.replica_id == "victor-5d8f7c9b6-x2x7q"' "$work/status.json" >/dev/null

echo "run-test: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
