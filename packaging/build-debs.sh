#!/usr/bin/env bash
# Builds VICTOR's Debian packages from compiled binaries with dpkg-deb:
#
#   victorctl          /usr/bin/victorctl
#   victor-fe-agent    /usr/bin/victor-fe-agent, its systemd unit, /etc/victor/fe-agent.toml
#   victor-controller  /usr/bin/victor-controller, its systemd unit, /etc/victor/controller.toml
#
# Each package is described by packaging/debian/<package>.control (a template) and
# <package>.install (what goes where); a package with a systemd unit gets the maintainer scripts
# of packaging/debian/daemon.{postinst,prerm,postrm} (service user, unit state). Binaries are
# stripped of debug information (symbols stay, for backtraces); Depends gets the shared
# libraries dpkg-shlibdeps finds.
#
#   packaging/build-debs.sh [--profile debug|release] [--out DIR] [--version VERSION]
#
#   --profile   which cargo build to package (default debug: what CI has built already;
#               release for a real distribution: cargo build --release --bins first)
#   --out       where the .deb files go (default target/packaging/debs); it is emptied first
#   --version   package version (default: the workspace's version in Cargo.toml)
#
# Environment: CARGO_TARGET_DIR (default target/), VICTOR_DEB_COMPRESSION (dpkg-deb -Z: zstd by
# default, fast and read by dpkg >= 1.21.18, i.e. Debian 12 and later; xz for older systems).
# Prints the paths of the packages it built, one a line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
profile=debug out=$repo/target/packaging/debs version=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --profile) profile=$2; shift ;;
        --out) out=$2; shift ;;
        --version) version=$2; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
        *) echo "build-debs.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[[ -n $version ]] || version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")
bindir=${CARGO_TARGET_DIR:-$repo/target}/$profile
arch=$(dpkg --print-architecture)
compression=${VICTOR_DEB_COMPRESSION:-zstd}
packages=(victorctl victor-fe-agent victor-controller)

for tool in dpkg-deb dpkg-shlibdeps strip; do
    command -v "$tool" >/dev/null || { echo "build-debs.sh: $tool is missing (apt-get install dpkg-dev binutils)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
rm -f "$out"/*.deb

# Fills the package tree $1 from the manifest of package $2; sets unit and conffile (or "").
fill_tree() { # root package
    local root=$1 pkg=$2 kind src dest
    unit="" conffile=""
    while read -r kind src dest; do
        [[ -z $kind || $kind == \#* ]] && continue
        mkdir -p "$root/$(dirname "$dest")"
        case $kind in
            bin)
                [[ -x $bindir/$src ]] || { echo "build-debs.sh: $bindir/$src is missing (cargo build${profile/debug/} --bins)" >&2; return 1; }
                strip --strip-debug -o "$root/$dest" "$bindir/$src"
                chmod 0755 "$root/$dest"
                ;;
            unit | conffile | doc)
                install -m 0644 "$here/$src" "$root/$dest"
                [[ $kind == unit ]] && unit=$(basename "$dest")
                [[ $kind == conffile ]] && conffile=/$dest && echo "/$dest" >>"$root/DEBIAN/conffiles"
                ;;
            *) echo "build-debs.sh: $pkg.install: unknown kind $kind" >&2; return 1 ;;
        esac
    done <"$here/debian/$pkg.install"
    install -D -m 0644 "$here/debian/copyright" "$root/usr/share/doc/$pkg/copyright"
}

for pkg in "${packages[@]}"; do
    root=$work/$pkg
    mkdir -p "$root/DEBIAN"
    fill_tree "$root" "$pkg"
    if [[ -n $unit ]]; then
        for script in postinst prerm postrm; do
            sed -e "s|@PACKAGE@|$pkg|g" -e "s|@UNIT@|$unit|g" -e "s|@CONFIG@|$conffile|g" \
                "$here/debian/daemon.$script" >"$root/DEBIAN/$script"
            chmod 0755 "$root/DEBIAN/$script"
        done
    fi
    # Shared-library dependencies as dpkg-shlibdeps computes them (it wants a debian/ directory).
    mkdir -p "$work/shlibs/debian" && touch "$work/shlibs/debian/control"
    mapfile -t elves < <(find "$root/usr/bin" -type f)
    shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O "${elves[@]/#/-e}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    sed -e "s|@VERSION@|$version|g" -e "s|@ARCH@|$arch|g" -e "s|@SHLIBS@|$shlibs|g" \
        -e "s|@INSTALLED_SIZE@|$size|g" "$here/debian/$pkg.control" >"$root/DEBIAN/control"
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
    deb=$out/${pkg}_${version}_$arch.deb
    dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >/dev/null
    echo "$deb"
done
