#!/bin/sh
# banger initramfs /init: the boot contract of banger/bootargs.py.
#
# Kernel command line keys: banger.root (read-only ext4, lower layer), banger.overlay
# (ext4 holding upper/ + work/; tmpfs if absent), banger.work (ext4 mounted on /root),
# banger.ip=A.B.C.D/N, banger.gw, banger.dns=A[,B,...], banger.hostname, banger.init (default
# /sbin/init), banger.emergency=shell (debug: a shell instead of rebooting on failure),
# banger.disk_timeout=SECONDS (default 20).
#
# Every program start costs ~57 ms under emulation: use shell builtins wherever one
# exists (read, echo, test, case, redirections) and one modprobe for all modules.
# On failure print "banger-initramfs: ERROR ..." and reboot (the VMM exits: QEMU runs
# with -no-reboot, Firecracker stops on the guest's reset), never hang silently.

PATH=/bin:/sbin
export PATH
set -f

say() { echo "banger-initramfs: $*"; }

fail() {
    echo "banger-initramfs: ERROR $*"
    if [ "$emergency" = shell ]; then
        say "emergency shell; exit it to reboot"
        sh </dev/console >/dev/console 2>&1
    fi
    say "rebooting (the VM stops)"
    reboot -f
    # reboot(2) did not take: make the kernel panic (panic=1 reboots)
    exit 1
}

mount -t devtmpfs devtmpfs /dev 2>/dev/null || fail "cannot mount devtmpfs on /dev"
mount -t proc proc /proc || fail "cannot mount /proc"
read -r t0 _ </proc/uptime
mount -t sysfs sysfs /sys || fail "cannot mount /sys"

root= overlay= work= ip= gw= dns= hostname= init=/sbin/init emergency= disk_timeout=20
read -r cmdline </proc/cmdline
for a in $cmdline; do
    case "$a" in
        banger.root=*) root=${a#*=} ;;
        banger.overlay=*) overlay=${a#*=} ;;
        banger.work=*) work=${a#*=} ;;
        banger.ip=*) ip=${a#*=} ;;
        banger.gw=*) gw=${a#*=} ;;
        banger.dns=*) dns=${a#*=} ;;
        banger.hostname=*) hostname=${a#*=} ;;
        banger.init=*) init=${a#*=} ;;
        banger.emergency=*) emergency=${a#*=} ;;
        banger.disk_timeout=*) disk_timeout=${a#*=} ;;
    esac
done
[ -n "$root" ] || fail "no banger.root= on the kernel command line"

# Modules, in the contract's order, those this initramfs carries (one modprobe process).
read -r rel </proc/sys/kernel/osrelease
mods=
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio \
         virtio_blk failover net_failover virtio_net overlay virtio_rng \
         vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    [ -e "/lib/modules/$rel/$m.ko" ] && mods="$mods $m"
done
if [ -n "$mods" ]; then
    modprobe -a $mods || fail "loading modules:$mods (kernel $rel)"
fi

# Wait (bounded) for a block device node to appear.
wait_dev() {
    n=0
    limit=$((disk_timeout * 20))
    while [ ! -b "$1" ]; do
        n=$((n + 1))
        [ "$n" -gt "$limit" ] && return 1
        sleep 0.05
    done
    return 0
}

wait_dev "$root" || fail "root disk $root did not appear within ${disk_timeout}s (virtio-blk missing?)"
if ! mount -t ext4 -o ro "$root" /mnt/lower 2>/dev/null; then
    # A dirty journal cannot be replayed on a read-only device; say so and try without it.
    say "WARNING: mounting $root read-only failed; retrying without journal replay (noload)"
    mount -t ext4 -o ro,noload "$root" /mnt/lower || fail "cannot mount root disk $root read-only as ext4"
fi

if [ -n "$overlay" ]; then
    wait_dev "$overlay" || fail "overlay disk $overlay did not appear within ${disk_timeout}s"
    mount -t ext4 -o rw "$overlay" /mnt/overlay || fail "cannot mount overlay disk $overlay as ext4"
else
    mount -t tmpfs -o mode=0755 tmpfs /mnt/overlay || fail "cannot mount a tmpfs for the overlay"
fi
[ -d /mnt/overlay/upper ] || mkdir /mnt/overlay/upper || fail "cannot create upper/ on the overlay disk"
[ -d /mnt/overlay/work ] || mkdir /mnt/overlay/work || fail "cannot create work/ on the overlay disk"
mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/overlay/upper,workdir=/mnt/overlay/work /newroot \
    || fail "cannot mount the overlay root (overlay module missing?)"

if [ -n "$work" ]; then
    wait_dev "$work" || fail "work disk $work did not appear within ${disk_timeout}s"
    [ -d /newroot/root ] || mkdir /newroot/root || fail "cannot create /root in the new root"
    mount -t ext4 -o rw "$work" /newroot/root || fail "cannot mount work disk $work on /root"
fi

if [ -n "$hostname" ]; then
    echo "$hostname" >/proc/sys/kernel/hostname || fail "cannot set hostname $hostname"
    echo "$hostname" >/newroot/etc/hostname 2>/dev/null
fi

if [ -n "$ip" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ]; do
        n=$((n + 1))
        [ "$n" -gt 100 ] && fail "network device eth0 did not appear (virtio-net missing?)"
        sleep 0.05
    done
    ip link set lo up || fail "cannot bring lo up"
    ip addr add "$ip" dev eth0 || fail "cannot add address $ip to eth0"
    ip link set eth0 up || fail "cannot bring eth0 up"
    if [ -n "$gw" ]; then
        ip route add default via "$gw" dev eth0 || fail "cannot add default route via $gw"
    fi
fi

if [ -n "$dns" ]; then
    # banger.dns=A[,B[,C]]: one nameserver line each, in order (the host's upstream resolvers)
    [ -L /newroot/etc/resolv.conf ] && rm -f /newroot/etc/resolv.conf
    : >/newroot/etc/resolv.conf || fail "cannot write /etc/resolv.conf"
    ifs=$IFS
    IFS=,
    for s in $dns; do
        [ -n "$s" ] && echo "nameserver $s" >>/newroot/etc/resolv.conf
    done
    IFS=$ifs
fi

[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fail "init $init not found in the image (banger.init=)"

for d in dev proc sys; do
    [ -d "/newroot/$d" ] || mkdir "/newroot/$d" || fail "cannot create /$d in the new root"
done
mount --move /dev /newroot/dev || fail "cannot move /dev into the new root"
mount --move /proc /newroot/proc || fail "cannot move /proc into the new root"
mount --move /sys /newroot/sys || fail "cannot move /sys into the new root"

read -r up _ </newroot/proc/uptime
say "ready at ${up}s, /init started at ${t0}s (modules:$mods)"
echo "banger-initramfs: switching root"
exec switch_root /newroot "$init"
# only reached when exec failed (switch_root prints why)
fail "switch_root to $init failed"
