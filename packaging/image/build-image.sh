#!/usr/bin/env bash
# Builds the container image the Helm chart runs without a Docker engine, from what the
# repository's Dockerfile says (packaging/image/dockerfile.py reads its runtime stage):
#
#   FROM debian:<release>-slim   a root file system from Debian's archive (mmdebstrap minbase with
#                                the slim images' dpkg excludes), cached for a week
#   RUN ...                      run in that root (mmdebstrap customize hook: chroot), cached with it
#   COPY --from=build /out/X D/  the compiled binary X (stripped of debug information), one layer
#   EXPOSE, USER, CMD, ENV...    the image configuration
#
# and writes an OCI image layout with umoci (target/packaging/image/oci, tag victor:<version>),
# plus the same as an OCI archive (victor-<version>.oci.tar) for `skopeo copy
# oci-archive:victor-<version>.oci.tar docker://registry.example/victor:<version>` or `podman load`.
#
#   packaging/image/build-image.sh [--profile debug|release] [--out DIR]
#
# The binaries come from the cargo build of --profile (default debug, what CI has built; the
# Dockerfile's own build stage builds release). Exit 77 with `SKIPPED: <reason>` when Debian's
# archive cannot be reached and nothing is cached, or when mmdebstrap or umoci cannot be installed.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=packaging/lib.sh
. "$here/../lib.sh"
profile=debug out=$repo/target/packaging/image
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile=$2; shift ;;
        --out) out=$2; shift ;;
        *) echo "build-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
bindir=${CARGO_TARGET_DIR:-$repo/target}/$profile
version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
pk_need mmdebstrap umoci zstd jq strip python3 || exit

plan=$(python3 "$here/dockerfile.py" "$repo/Dockerfile")
suite=$(jq -r .suite <<<"$plan")
work=$(mktemp -d -p "$repo/target/packaging" image.XXXXXX)
trap 'rm -rf "$work"' EXIT

# Layer 1: the base and the RUN instructions, from one mmdebstrap (cached by their text: the
# scripts live in the cache under their hash, so the hook command line is the key).
runs_key=$(jq -c .runs <<<"$plan" | sha256sum | cut -c1-16)
mkdir -p "$PK_CACHE/runs"
hooks=()
n=0
while IFS= read -r -d '' cmd; do
    n=$((n + 1))
    script=$PK_CACHE/runs/$runs_key-$n.sh
    printf '%s\n' "$cmd" >"$script"
    # Docker runs RUN as /bin/sh -c in the image; the hook does the same inside mmdebstrap's root.
    hooks+=(--customize-hook="chroot \"\$1\" /bin/sh -c \"\$(cat '$script')\"")
done < <(jq -j '.runs[] | ., "\u0000"' <<<"$plan")
base=$(pk_rootfs "$suite" minbase "" "${PK_SLIM_OPTS[@]}" "${hooks[@]}") || exit $?

# Layer 2: the binaries, as COPY puts them (owned by root, mode as built).
mkdir -p "$work/copy"
while read -r binary dest; do
    [[ -x $bindir/$binary ]] || { echo "build-image.sh: $bindir/$binary is missing (cargo build --bins)" >&2; exit 1; }
    mkdir -p "$work/copy$(dirname "$dest")"
    strip --strip-debug -o "$work/copy$dest" "$bindir/$binary"
    chmod 0755 "$work/copy$dest"
done < <(jq -r '.copies[] | "\(.binary) \(.dest)"' <<<"$plan")
tar --owner=0 --group=0 --numeric-owner -C "$work/copy" -cf "$work/copy.tar" .

zstd -q -d "$base" -o "$work/base.tar"
rm -rf "$out" && mkdir -p "$out"
layout=$out/oci
image=$layout:$version
umoci init --layout "$layout"
umoci new --image "$image"
umoci raw add-layer --image "$image" --history.created_by "FROM debian:$suite-slim; RUN (Dockerfile)" "$work/base.tar"
umoci raw add-layer --image "$image" --history.created_by "COPY --from=build (Dockerfile)" "$work/copy.tar"

# The configuration: the Dockerfile's, on top of what debian:*-slim sets (PATH).
config=(--config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
while IFS= read -r -d '' e; do config+=(--config.env "$e"); done < <(jq -j '.config.Env[] | ., "\u0000"' <<<"$plan")
while IFS= read -r -d '' p; do config+=(--config.exposedports "$p"); done < <(jq -j '.config.ExposedPorts[] | ., "\u0000"' <<<"$plan")
while IFS= read -r -d '' a; do config+=(--config.cmd "$a"); done < <(jq -j '(.config.Cmd // [])[] | ., "\u0000"' <<<"$plan")
while IFS= read -r -d '' a; do config+=(--config.entrypoint "$a"); done < <(jq -j '(.config.Entrypoint // [])[] | ., "\u0000"' <<<"$plan")
while IFS= read -r -d '' l; do config+=(--config.label "$l"); done < <(jq -j '.config.Labels | to_entries[] | "\(.key)=\(.value)", "\u0000"' <<<"$plan")
user=$(jq -r '.config.User // empty' <<<"$plan")
workdir=$(jq -r '.config.WorkingDir // empty' <<<"$plan")
[[ -n $user ]] && config+=(--config.user "$user")
[[ -n $workdir ]] && config+=(--config.workingdir "$workdir")
umoci config --image "$image" --author "packaging/image/build-image.sh" "${config[@]}"
umoci gc --layout "$layout"
(cd "$layout" && tar --owner=0 --group=0 --numeric-owner -cf "$out/victor-$version.oci.tar" .)
echo "$image"
