#!/usr/bin/env bash
# Installs what the VM test runner needs on the host (run as root): QEMU (qemu-system-x86 with its
# firmware) and kmod (depmod for the unpacked guest kernel; modprobe, which the guest runs from the
# shared host root). Does nothing when both are present.
#
# On Debian images whose qemu-utils came from <codename>-backports, the stable qemu-system-x86
# conflicts with it (installing it would remove qemu-utils). Then QEMU comes from backports too,
# read through a temporary apt source list, so /etc/apt is left as it was.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v depmod >/dev/null || need+=(kmod)
if [[ ${#need[@]} -eq 0 ]]; then
    echo "vm/install: qemu-system-x86_64 and kmod present"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "vm/install: installing ${need[*]} needs root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq

# Would the distribution's own QEMU remove something? Then take it from backports.
if [[ " ${need[*]} " == *" qemu-system-x86 "* ]] &&
    apt-get install -s --no-install-recommends qemu-system-x86 2>/dev/null | grep -q '^Remv '; then
    # shellcheck source=/dev/null
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
    tmp=$(mktemp -d /tmp/victor-vm-apt.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp"   # apt downloads as the _apt user
    mkdir -p "$tmp/parts" "$tmp/lists/partial"
    cp /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list "$tmp/parts/" 2>/dev/null || true
    [[ -f /etc/apt/sources.list ]] && cp /etc/apt/sources.list "$tmp/parts/base.list"
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$codename" >"$tmp/parts/victor-backports.sources"
    apt_tmp=(-o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$tmp/parts" -o "Dir::State::lists=$tmp/lists")
    echo "vm/install: the stable qemu-system-x86 conflicts with installed packages (qemu-utils from backports?); installing QEMU from $codename-backports"
    apt-get "${apt_tmp[@]}" update -qq
    apt-get "${apt_tmp[@]}" install -y -qq --no-install-recommends -t "$codename-backports" \
        qemu-system-x86 qemu-system-common qemu-system-data seabios >/dev/null
    need=("${need[@]/qemu-system-x86/}")
fi
read -ra need <<<"${need[*]}"
if [[ ${#need[@]} -gt 0 ]]; then
    echo "vm/install: installing ${need[*]}"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
qemu-system-x86_64 --version | head -1
