# shellcheck shell=bash
# Building blocks of the packaging checks (sourced by packaging/ci.sh and the scripts under
# packaging/tests and packaging/image):
#
#   pk_rootfs SUITE VARIANT INCLUDE [mmdebstrap options...]
#                      prints the path of a cached root file system tarball (.tar.zst) made by
#                      mmdebstrap from Debian's archive; rebuilt when older than a week, the
#                      stale one used when the archive cannot be reached; returns 77 with
#                      `SKIPPED: <reason>` when there is none
#   pk_unpack TARBALL DIR
#                      unpacks a root file system
#   pk_chroot ROOT CMD...
#                      runs CMD chrooted in ROOT (with Debian's default PATH, not the host's)
#                      with /dev, /proc, /sys, a fresh /run and /tmp,
#                      in a mount namespace of its own (nothing stays mounted afterwards); in the
#                      network namespace $PK_NETNS when set
#   pk_wait_http URL SECONDS [NETNS]
#                      waits until URL answers 200 (curl, inside NETNS when given)
#   pk_need CMD...     installs the Debian packages providing missing commands; when apt cannot,
#                      prints `SKIPPED: <reason>` and returns 77 (callers: `pk_need ... || exit`)
#
# Debian's archive is the only source: nothing binary is committed. The cache is
# $VICTOR_PACKAGING_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/victor/packaging.

PK_CACHE=${VICTOR_PACKAGING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/victor/packaging}
PK_MIRROR=${VICTOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What debian:*-slim leaves out (the official images' dpkg configuration; image/build-image.sh).
# shellcheck disable=SC2034
PK_SLIM_OPTS=(
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/lintian/*'
)

pk_log() { echo "packaging: $*" >&2; }

pk_skip() {
    echo "SKIPPED: $*"
    return 77
}

# The Debian package that provides each command; installs those missing (as root, quietly).
pk_need() {
    local want=() missing=() cmd pkg
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null && continue
        missing+=("$cmd")
        case $cmd in
            dpkg-shlibdeps) pkg=dpkg-dev ;;
            strip) pkg=binutils ;;
            systemd-analyze | systemctl) pkg=systemd ;;
            setpriv | unshare) pkg=util-linux ;;
            capsh) pkg=libcap2-bin ;;
            etcd) pkg=etcd-server ;;
            ip) pkg=iproute2 ;;
            modprobe) pkg=kmod ;;
            *) pkg=$cmd ;; # mmdebstrap, umoci, runc, zstd, curl, jq, python3
        esac
        want+=("$pkg")
    done
    [[ ${#want[@]} -eq 0 ]] && return 0
    pk_log "installing ${want[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Parts of packaging/ci.sh run concurrently: wait for another apt rather than fail.
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
    "${apt[@]}" install -y --no-install-recommends "${want[@]}" >/dev/null 2>&1 && return 0
    # Stale or missing package lists (a fresh machine has none): refresh once.
    "${apt[@]}" update >/dev/null 2>&1
    "${apt[@]}" install -y --no-install-recommends "${want[@]}" >/dev/null 2>&1 ||
        pk_skip "apt-get cannot install ${want[*]} (for ${missing[*]})"
}

pk_rootfs() { # suite variant include [mmdebstrap options...]
    local suite=$1 variant=$2 include=$3
    shift 3
    local key tar tmp log
    key=$(printf '%s\n' "$suite" "$variant" "$include" "$PK_MIRROR" "$@" | sha256sum | cut -c1-16)
    mkdir -p "$PK_CACHE/rootfs"
    tar=$PK_CACHE/rootfs/$suite-$variant-$key.tar.zst
    if [[ -f $tar && -n $(find "$tar" -mtime -7) ]]; then
        echo "$tar"
        return 0
    fi
    tmp=$PK_CACHE/rootfs/tmp.$$.tar.zst
    pk_log "mmdebstrap $suite ($variant${include:+, +$include}): a root file system from Debian's archive"
    # In a private mount namespace: its mounts (/proc, /dev in the new root) neither propagate to
    # other namespaces (whose users could keep them busy at unmount) nor outlive it.
    log=$PK_CACHE/rootfs/mmdebstrap-$suite-$variant.log
    if unshare --mount --propagation private -- mmdebstrap --quiet --mode=root --variant="$variant" \
        ${include:+--include="$include"} "$@" "$suite" "$tmp" "$PK_MIRROR" \
        </dev/null >"$log" 2>&1; then
        mv "$tmp" "$tar"
        # Older roots of the same kind are of no further use.
        find "$PK_CACHE/rootfs" -name "$suite-$variant-*.tar.zst" ! -path "$tar" -mtime +30 -delete
        echo "$tar"
        return 0
    fi
    rm -f "$tmp"
    if [[ -f $tar ]]; then
        pk_log "mmdebstrap failed (tail of $log below); using the cached root of $(date -r "$tar" +%F)"
        tail -n 5 "$log" >&2
        echo "$tar"
        return 0
    fi
    tail -n 5 "$log" >&2
    pk_skip "mmdebstrap cannot fetch $suite from $PK_MIRROR and no root is cached (log: $log)"
}

pk_unpack() { # tarball dir
    mkdir -p "$2" && tar --zstd -xf "$1" -C "$2"
}

# The mount namespace's setup before the chroot ($1 = root, then the command). The root's
# /dev/net/tun gets the mode a Debian system gives it (0666, udev's 50-udev-default.rules): a host
# without udev leaves the kernel's 0600, which the agent's unprivileged user could not open. The
# node is the namespace's own (bind-mounted over the host's /dev/net/tun, which is not changed).
# shellcheck disable=SC2016 # expanded by the bash that runs it
PK_CHROOT_SH='r=$1; shift
mount --rbind /dev "$r/dev" && mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" &&
    mount -t tmpfs -o mode=755 tmpfs "$r/run" && mount -t tmpfs -o mode=1777 tmpfs "$r/tmp" || exit 125
if [ -c /dev/net/tun ]; then
    mknod -m 666 "$r/run/.tun" c 10 200 && mount --bind "$r/run/.tun" "$r/dev/net/tun" || exit 125
fi
exec chroot "$r" /usr/bin/env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"'

# The command line of pk_chroot (every step execs the next: a background job's $! is CMD's PID).
pk_chroot_cmd() { # root cmd...
    local netns=()
    [[ -n ${PK_NETNS:-} ]] && netns=(ip netns exec "$PK_NETNS")
    PK_CMD=("${netns[@]}" unshare --mount --propagation private -- bash -c "$PK_CHROOT_SH" pk_chroot "$@")
}

pk_chroot() { # root cmd...
    pk_chroot_cmd "$@"
    "${PK_CMD[@]}"
}

pk_wait_http() { # url seconds [netns]
    local url=$1 deadline=$((SECONDS + $2)) ns=${3:-}
    local run=()
    [[ -n $ns ]] && run=(ip netns exec "$ns")
    while [[ $SECONDS -lt $deadline ]]; do
        [[ $("${run[@]}" curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url") == 200 ]] && return 0
        sleep 0.2
    done
    return 1
}
