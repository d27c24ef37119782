#!/bin/sh
# /init of the test guest (busybox sh as PID 1).
#
# Reads its scenario from the kernel command line (e2e.KEY=VALUE):
#   e2e.disk=virtio|nbd   swap on /dev/vda (qemu's NBD client, virtio-blk) or on
#                         /dev/nbd0 attached by the guest kernel's nbd driver
#   e2e.discard=none|pages|once|both   swapon discard policy
#   e2e.hog_mib=N e2e.passes=P e2e.seed=S   the memory hog's arguments
#   e2e.nbd_host, e2e.nbd_port, e2e.nbd_export, e2e.nbd_bs   for e2e.disk=nbd
#   e2e.script=PATH       run this file of the image instead of the hog scenario
# Prints lines starting with "E2E " (and the hog's "HOG ") on the console for
# the host to parse, then powers off. It never returns: PID 1 exiting panics.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /var/run
echo "E2E init uptime=$(cut -d' ' -f1 /proc/uptime) release=$(uname -r)"

disk=virtio discard=none hog_mib=64 passes=1 seed=1
nbd_host=10.0.2.2 nbd_port=10809 nbd_export= nbd_bs=4096 script=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	e2e.*=*)
		key=${arg%%=*}
		key=${key#e2e.}
		value=${arg#*=}
		case "$key" in
		disk | discard | hog_mib | passes | seed | nbd_host | nbd_port | nbd_export | nbd_bs | script)
			eval "$key=\$value" ;;
		*) echo "E2E warning unknown-parameter=$key" ;;
		esac
		;;
	esac
done

finish() {
	# $1: status word for the host
	echo "E2E done status=$1 uptime=$(cut -d' ' -f1 /proc/uptime)"
	sync
	poweroff -f
	sleep 5
	echo o >/proc/sysrq-trigger
}

fail() {
	echo "E2E error $*"
	dmesg | tail -n 30 | sed 's/^/E2E dmesg /'
	finish error
}

vmstat() {
	# $1: label
	set -- "$1" $(awk '$1 == "pswpin" || $1 == "pswpout" || $1 == "pgmajfault" ||
		$1 == "swap_ra" || $1 == "swap_ra_hit" || $1 == "oom_kill" ||
		$1 == "pgsteal_anon" { printf "%s=%s ", $1, $2 }' /proc/vmstat)
	label=$1
	shift
	echo "E2E vmstat label=$label $* uptime=$(cut -d' ' -f1 /proc/uptime)"
}

mods=
while read -r mod; do
	[ -n "$mod" ] || continue
	insmod "/lib/modules/$(uname -r)/$mod" || fail "insmod $mod"
	mods="$mods $(basename "$mod" .ko)"
done </etc/e2e/modules
echo "E2E modules loaded=$(echo $mods | tr ' ' ',')"

wait_for() {
	# $1: path, $2: tenths of a second
	i=0
	while [ ! -e "$1" ]; do
		i=$((i + 1))
		[ "$i" -le "$2" ] || return 1
		sleep 0.1
	done
}

if [ -n "$script" ]; then
	echo "E2E script path=$script"
	sh "$script"
	echo "E2E script-exit status=$?"
	finish script
fi

case "$disk" in
virtio)
	wait_for /sys/block/vda 300 || fail "no /dev/vda"
	dev=/dev/vda
	;;
nbd)
	ip link set lo up
	wait_for /sys/class/net/eth0 300 || fail "no eth0"
	ip link set eth0 up
	# Only the user-mode network's own subnet: no default route.
	ip addr add 10.0.2.15/24 dev eth0
	wait_for /sys/block/nbd0 100 || fail "no /dev/nbd0"
	set -- "$nbd_host" "$nbd_port" /dev/nbd0 -b "$nbd_bs" -swap
	[ -z "$nbd_export" ] || set -- "$@" -N "$nbd_export"
	echo "E2E nbd-client args=$(echo "$@" | tr ' ' ',')"
	nbd-client "$@" || fail "nbd-client exit $?"
	dev=/dev/nbd0
	;;
*) fail "unknown disk $disk" ;;
esac

name=${dev#/dev/}
# virtio-blk reports itself rotational; the kernel then never discards
# freed swap.
echo 0 >"/sys/block/$name/queue/rotational" || fail "rotational"
echo "E2E disk dev=$dev size_bytes=$(($(cat "/sys/block/$name/size") * 512)) rotational=$(cat "/sys/block/$name/queue/rotational") discard_max_bytes=$(cat "/sys/block/$name/queue/discard_max_bytes") logical_block_size=$(cat "/sys/block/$name/queue/logical_block_size")"

mkswap "$dev" >/dev/null || fail "mkswap"
case "$discard" in
none) swapon "$dev" ;;
pages) swapon -dpages "$dev" ;;
once) swapon -donce "$dev" ;;
both) swapon -d "$dev" ;;
*) fail "unknown discard $discard" ;;
esac || fail "swapon"
echo "E2E swapon dev=$dev discard=$discard uptime=$(cut -d' ' -f1 /proc/uptime)"

vmstat before
echo "E2E hog-start mib=$hog_mib passes=$passes uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/hog "$hog_mib" "$passes" "$seed"
status=$?
echo "E2E hog-exit status=$status uptime=$(cut -d' ' -f1 /proc/uptime)"
vmstat after-hog
echo "E2E swap $(awk 'NR > 1 { printf "used_kib=%s size_kib=%s", $4, $3 }' /proc/swaps)"

swapoff "$dev" || fail "swapoff"
vmstat after-swapoff
echo "E2E swapoff uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$disk" = nbd ]; then
	nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d"
fi
[ "$status" -eq 0 ] && finish ok
finish "hog-$status"
