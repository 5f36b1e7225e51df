# shellcheck shell=bash
# The VM runner's building blocks, sourced by tests/vm/run and tests/vm/ci.sh (and usable by any
# other script that needs the same guest, e.g. a QEMU live-migration or systemd experiment):
#
#   vm_prepare          fetch and cache the stock kernel and busybox-static, build the initramfs;
#                       sets VM_CACHE VM_KPKG VM_KPKG_VERSION VM_KVER VM_KERNEL VM_MODULES VM_INITRD;
#                       prints `SKIPPED: <reason>` and returns 77 when they cannot be had
#   vm_print_assets     prints those variables as KEY=value lines
#   vm_detect_accel     prints kvm when hardware virtualisation works (vmx/svm and a probe boot), else tcg
#   vm_qemu_args ...    the QEMU command line of a guest (see the function)
#   vm_boot ...         boots a guest, streams its progress, returns QEMU's exit status
#
# Nothing here is committed as a binary: everything comes from the distribution's archive through
# apt and is cached under $VICTOR_VM_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/victor-vm), keyed
# by package name and version (the initramfs by a hash of what goes into it).

# The QEMU binary ($VICTOR_VM_QEMU overrides it, e.g. a self-built one).
VM_QEMU=${VICTOR_VM_QEMU:-qemu-system-x86_64}
VM_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The initramfs's /init and the modules it loads (the runner's: PCI virtio transport, 9p over
# virtio, overlayfs to reach the host). Another guest sets both before vm_prepare (tests/vm/lab-guest).
VM_INITRD_INIT=${VM_INITRD_INIT:-$VM_LIB_DIR/initramfs-init}
[[ -n ${VM_INITRD_MODULES+set} ]] || VM_INITRD_MODULES=(virtio_pci 9pnet_virtio 9p overlay)

# The guest mounts fresh tmpfs on these: host files below them are not visible there.
vm_hidden_path() { [[ $1 =~ ^/(tmp|run|dev|proc|sys)(/|$) ]]; }

vm_skip() {
    echo "SKIPPED: $*"
    return 77
}

vm_log() { echo "vm: $*" >&2; }

# apt as root downloads into directories its _apt user cannot read: say so instead of warning.
vm_apt_opts() { [[ $(id -u) -eq 0 ]] && echo "-o APT::Sandbox::User=root"; }

# `apt-cache show` field of the candidate version of a package. apt-cache takes ~1 s a call on a
# busy machine, so answers are remembered in $VM_CACHE/apt-answers until apt's lists change.
vm_apt_field() { # package field
    local stamp memo=$VM_CACHE/apt-answers value
    stamp=$(stat -c '%n %Y' /var/lib/apt/lists/* /etc/apt/preferences* 2>/dev/null | md5sum | cut -c1-16)
    [[ -f $memo && $(head -n 1 "$memo") == "$stamp" ]] || echo "$stamp" >"$memo"
    value=$(awk -v k="$1 $2" 'index($0, k "\t") == 1 { print substr($0, length(k) + 2); exit }' "$memo")
    if [[ -z $value ]]; then
        value=$(apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n "s/^$2: //p" | head -n 1)
        [[ -n $value ]] && printf '%s %s\t%s\n' "$1" "$2" "$value" >>"$memo"
    fi
    echo "$value"
}

# The newest cached, complete entry of a cache subdirectory (when apt cannot tell or fetch).
vm_newest_cached() { # subdir
    local d
    # shellcheck disable=SC2012 # the cache's own names, newest first
    d=$(ls -1dt "$VM_CACHE/$1"/*/.ready 2>/dev/null | head -n 1)
    [[ -n $d ]] && dirname "$d"
}

# Downloads a package into a fresh directory of the cache and unpacks it there (dpkg -x).
vm_fetch_unpack() { # package version destdir
    local tmp
    tmp=$(mktemp -d "$VM_CACHE/tmp.XXXXXX") || return 1
    chmod 755 "$tmp"
    # shellcheck disable=SC2046
    if ! (cd "$tmp" && apt-get download -q $(vm_apt_opts) "$1=$2" >/dev/null); then
        rm -rf "$tmp"
        return 1
    fi
    mkdir -p "$(dirname "$3")" && rm -rf "$3" &&
        dpkg -x "$tmp"/*.deb "$tmp/root" && mv "$tmp/root" "$3"
    local ok=$?
    rm -rf "$tmp"
    return $ok
}

# Under TCG, decompressing the xz-compressed bzImage takes the guest ~6 s. A kernel built with
# CONFIG_PVH boots from its uncompressed ELF image directly (QEMU's -kernel takes it), so the
# image is decompressed once on the host, into boot/vmlinux-<version>. Without PVH, or when the
# payload is not found, the guest boots the bzImage as shipped.
vm_extract_vmlinux() { # kernel dir
    local kver bz off out
    kver=$(ls "$1/lib/modules")
    bz=$1/boot/vmlinuz-$kver out=$1/boot/vmlinux-$kver
    touch "$1/.bzimage-only"
    grep -q '^CONFIG_PVH=y' "$1/boot/config-$kver" 2>/dev/null || return 0
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -n 1 | cut -d: -f1)
    # (xz stops after its stream: tail's SIGPIPE is expected)
    [[ -n $off ]] && { tail -c +$((off + 1)) "$bz" || true; } | xz -dc --single-stream >"$out.tmp" 2>/dev/null &&
        [[ $(head -c 4 "$out.tmp" | od -An -c | tr -d ' ') == 177ELF ]] && mv "$out.tmp" "$out" &&
        rm -f "$1/.bzimage-only"
    rm -f "$out.tmp"
    return 0
}

# The kernel: the package linux-image-amd64 depends on (or $VICTOR_VM_KERNEL_PKG), unpacked and
# depmod'ed in $VM_CACHE/kernel/<package>_<version>/.
vm_kernel() {
    local pkg ver="" dep dir=""
    if [[ -n ${VICTOR_VM_KERNEL_PKG:-} ]]; then
        pkg=$VICTOR_VM_KERNEL_PKG
    else
        dep=$(vm_apt_field linux-image-amd64 Depends)
        pkg=${dep%% *}
    fi
    [[ -n $pkg ]] && ver=$(vm_apt_field "$pkg" Version)
    if [[ -n $pkg && -n $ver ]]; then
        dir=$VM_CACHE/kernel/${pkg}_$ver
        if [[ ! -f $dir/.ready ]]; then
            vm_log "fetching the stock kernel $pkg $ver (apt-get download, dpkg -x, depmod)"
            if vm_fetch_unpack "$pkg" "$ver" "$dir"; then
                # Newer packages ship /usr/lib/modules; depmod -b and the guest use lib/modules.
                if [[ ! -d $dir/lib/modules && -d $dir/usr/lib/modules ]]; then
                    mkdir -p "$dir/lib" && mv "$dir/usr/lib/modules" "$dir/lib/modules"
                fi
                depmod -b "$dir" "$(ls "$dir/lib/modules")" && touch "$dir/.ready"
            fi
        fi
    fi
    if [[ -z ${dir:-} || ! -f $dir/.ready ]]; then
        dir=$(vm_newest_cached kernel) ||
            vm_skip "no stock kernel: apt cannot fetch ${pkg:-linux-image-amd64} ${ver:-} and none is cached in $VM_CACHE/kernel (apt-get update?)" ||
            return
        vm_log "apt could not fetch ${pkg:-linux-image-amd64}; using the cached $(basename "$dir")"
    fi
    VM_KPKG=$(basename "$dir")
    # shellcheck disable=SC2034 # for the scripts that source this file
    VM_KPKG_VERSION=${VM_KPKG#*_}
    VM_KPKG=${VM_KPKG%%_*}
    VM_KVER=$(ls "$dir/lib/modules")
    VM_KERNEL=$dir/boot/vmlinux-$VM_KVER
    [[ -f $VM_KERNEL || -f $dir/.bzimage-only ]] || vm_extract_vmlinux "$dir"
    [[ -f $VM_KERNEL ]] || VM_KERNEL=$dir/boot/vmlinuz-$VM_KVER
    VM_MODULES=$dir/lib/modules/$VM_KVER
    [[ -f $VM_KERNEL ]] || vm_skip "the kernel package $VM_KPKG has no /boot/vmlinuz-$VM_KVER"
}

# busybox-static, in $VM_CACHE/busybox/<version>/.
vm_busybox() {
    local ver dir
    ver=$(vm_apt_field busybox-static Version)
    if [[ -n $ver ]]; then
        dir=$VM_CACHE/busybox/$ver
        if [[ ! -f $dir/.ready ]]; then
            vm_log "fetching busybox-static $ver"
            vm_fetch_unpack busybox-static "$ver" "$dir" && [[ -x $dir/bin/busybox ]] && touch "$dir/.ready"
        fi
    fi
    if [[ -z ${dir:-} || ! -f $dir/.ready ]]; then
        dir=$(vm_newest_cached busybox) ||
            vm_skip "no busybox-static: apt cannot fetch it and none is cached in $VM_CACHE/busybox" || return
    fi
    VM_BUSYBOX=$dir/bin/busybox
}

# The initramfs: busybox, $VM_INITRD_INIT (tests/vm/initramfs-init) as /init, and the modules of
# VM_INITRD_MODULES with their dependencies (in the order modprobe would load them, listed in
# /modules.list), in $VM_CACHE/initramfs/<hash>.cpio.gz.
vm_initramfs() {
    local mods key tmp m rel
    mods=$(modprobe -d "${VM_MODULES%/lib/modules/*}" -S "$VM_KVER" --show-depends -a "${VM_INITRD_MODULES[@]}" |
        awk '$1 == "insmod" && !seen[$2]++ { print $2 }') || return 1
    key=$( (cat "$VM_INITRD_INIT" && echo "$VM_BUSYBOX $VM_KVER $mods") | sha256sum | cut -c1-16)
    VM_INITRD=$VM_CACHE/initramfs/$key.cpio.gz
    [[ -f $VM_INITRD ]] && touch "$VM_INITRD" && return 0
    vm_log "building the initramfs ($VM_INITRD)"
    mkdir -p "$VM_CACHE/initramfs"
    tmp=$(mktemp -d "$VM_CACHE/tmp.XXXXXX") || return 1
    mkdir -p "$tmp/root/bin"
    cp "$VM_BUSYBOX" "$tmp/root/bin/busybox"
    cp "$VM_INITRD_INIT" "$tmp/root/init"
    chmod 755 "$tmp/root/init"
    for m in $mods; do
        rel=${m#"${VM_MODULES%/lib/modules/*}"/}
        mkdir -p "$tmp/root/$(dirname "$rel")"
        cp "$m" "$tmp/root/$rel"
        echo "$rel" >>"$tmp/root/modules.list"
    done
    (cd "$tmp/root" && find . | "$VM_BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) >"$tmp/initrd" &&
        mv "$tmp/initrd" "$VM_INITRD"
    local ok=$?
    rm -rf "$tmp"
    return $ok
}

vm_prepare() {
    command -v "$VM_QEMU" >/dev/null ||
        vm_skip "$VM_QEMU is not installed (tests/vm/install.sh installs qemu-system-x86)" || return
    command -v depmod >/dev/null && command -v modprobe >/dev/null ||
        vm_skip "kmod (depmod, modprobe) is not installed (tests/vm/install.sh installs it)" || return
    command -v apt-get >/dev/null && command -v dpkg >/dev/null ||
        vm_skip "no apt/dpkg to fetch Debian's stock kernel on this host" || return
    VM_CACHE=${VICTOR_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/victor-vm}
    mkdir -p "$VM_CACHE" || vm_skip "cannot create the cache directory $VM_CACHE" || return
    VM_CACHE=$(cd "$VM_CACHE" && pwd -P)
    if vm_hidden_path "$VM_CACHE"; then
        echo "tests/vm: VICTOR_VM_CACHE=$VM_CACHE is not visible in the guest (fresh tmpfs there): choose another" >&2
        return 2
    fi
    local lock status=0
    exec {lock}>"$VM_CACHE/.lock"
    flock "$lock"
    # Leftovers of an interrupted run (every tmp.* is made under this lock); initramfs images
    # unused for 30 days (other checkouts may use other versions of initramfs-init).
    rm -rf "$VM_CACHE"/tmp.*
    find "$VM_CACHE/initramfs" -name '*.cpio.gz' -mtime +30 -delete 2>/dev/null
    vm_kernel && vm_busybox && vm_initramfs || status=$?
    exec {lock}>&-
    if [[ $status -ne 0 && $status -ne 77 ]]; then
        vm_skip "could not build the guest's assets in $VM_CACHE (status $status)"
        return
    fi
    return $status
}

vm_print_assets() {
    local v
    for v in VM_CACHE VM_KPKG VM_KPKG_VERSION VM_KVER VM_KERNEL VM_MODULES VM_INITRD VM_BUSYBOX; do
        echo "$v=${!v:-}"
    done
}

# QEMU's command line for a guest that boots the stock kernel with the initramfs, shares the host
# root read-only (9p tag hostroot) and $out writable (tag out, mounted at /run/victor-vm/out),
# writes its serial console to $out/console.log and exits through isa-debug-exit. No network
# device (-nodefaults, no -nic). Extra kernel parameters in $VM_APPEND, extra QEMU arguments in
# the array VM_QEMU_EXTRA.
vm_qemu_args() { # out accel cpus mem init
    local out=$1 accel=$2 cpus=$3 mem=$4 init=$5 cpu=max
    [[ $accel == kvm ]] && cpu=host
    # shellcheck disable=SC2054 # QEMU's option values contain commas
    VM_QEMU_ARGS=(
        -nodefaults -no-user-config -display none -no-reboot
        -M pc -accel "$accel" -cpu "$cpu" -smp "$cpus" -m "$mem"
        -kernel "$VM_KERNEL" -initrd "$VM_INITRD"
        -append "console=ttyS0 quiet panic=-1 victor.init=$init victor.modules=$VM_MODULES ${VM_APPEND:-}"
        -device isa-debug-exit,iobase=0xf4,iosize=0x04
        -chardev "file,id=con,path=$out/console.log" -serial chardev:con
        -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
        -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
        -fsdev "local,id=out,path=$out,security_model=none,multidevs=remap"
        -device virtio-9p-pci,fsdev=out,mount_tag=out
        "${VM_QEMU_EXTRA[@]+"${VM_QEMU_EXTRA[@]}"}"
    )
}

# Boots a guest and waits for it, printing its `vm:` progress lines (or, verbose, its whole
# console) as they come. Returns QEMU's exit status (isa-debug-exit: code*2+1; 124 on timeout).
vm_boot() { # out accel cpus mem limit init verbose
    local out=$1 limit=$5 verbose=$7 qemu tailer status
    vm_qemu_args "$1" "$2" "$3" "$4" "$6"
    : >"$out/console.log"
    timeout -k 5 "$limit" "$VM_QEMU" "${VM_QEMU_ARGS[@]}" 2>"$out/qemu.stderr" &
    qemu=$!
    # shellcheck disable=SC2064
    trap "kill $qemu 2>/dev/null" INT TERM
    if [[ $verbose -eq 1 ]]; then
        tail -n +1 -F --pid="$qemu" "$out/console.log" 2>/dev/null | tr -d '\r' &
    else
        tail -n +1 -F --pid="$qemu" "$out/console.log" 2>/dev/null | tr -d '\r' |
            grep --line-buffered -E '^vm: |Kernel panic|BUG:|Oops' &
    fi
    tailer=$!
    wait "$qemu"
    status=$?
    wait "$tailer" 2>/dev/null
    trap - INT TERM
    [[ -s $out/qemu.stderr ]] && sed 's/^/qemu: /' "$out/qemu.stderr" >&2
    return "$status"
}

# kvm when /dev/kvm is usable, the CPU advertises vmx or svm, and a probe guest boots to its
# initramfs and exits within 30 s under KVM (cached per host boot); tcg otherwise. Says why.
vm_detect_accel() {
    if [[ ! -w /dev/kvm ]]; then
        vm_log "no usable /dev/kvm: software emulation (TCG)"
        echo tcg
        return
    fi
    if ! grep -qwE 'vmx|svm' /proc/cpuinfo; then
        vm_log "/dev/kvm exists but the CPU has no vmx/svm (no hardware virtualisation): software emulation (TCG)"
        echo tcg
        return
    fi
    local probe status
    probe=$VM_CACHE/kvm-probe-$(cat /proc/sys/kernel/random/boot_id)
    if [[ ! -f $probe ]]; then
        local dir
        dir=$(mktemp -d /tmp/victor-vm-probe.XXXXXX)
        VM_APPEND="victor.probe=1" vm_qemu_args "$dir" kvm 1 512 /bin/true
        timeout -k 2 30 "$VM_QEMU" "${VM_QEMU_ARGS[@]}" >/dev/null 2>&1
        status=$?
        rm -rf "$dir"
        # The probe's initramfs writes 42 to isa-debug-exit: status 85.
        if [[ $status -eq 85 ]]; then echo kvm >"$probe"; else echo "tcg (probe status $status)" >"$probe"; fi
    fi
    if [[ $(cat "$probe") == kvm ]]; then
        echo kvm
    else
        vm_log "KVM probe boot failed ($(cat "$probe")): software emulation (TCG)"
        echo tcg
    fi
}
