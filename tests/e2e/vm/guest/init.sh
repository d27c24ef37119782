#!/bin/sh
# /init of the test guest (PID 1; /bin/sh is dash, the rest busybox).
#
# Reads its scenario from the kernel command line (e2e.KEY=VALUE):
#   e2e.disk=virtio|nbd|attach
#                         virtio: swap on /dev/vda (qemu's NBD client, virtio-blk);
#                         nbd: on /dev/nbd0, attached here with nbd-client;
#                         attach: on whatever attach-swap.sh (deploy/, in the
#                         image as /usr/local/sbin) sets up, undone with
#                         detach-swap.sh: the way users attach
#   e2e.attach_args=A,B   more arguments for attach-swap.sh (commas for spaces)
#   e2e.layout=single|stripe|mirror   with e2e.disk=virtio: swap on /dev/vda;
#                         striped over /dev/vda.. (e2e.disks of them, one per
#                         server, equal priority); or on /dev/md0, an md RAID1
#                         over /dev/vda and /dev/vdb
#   e2e.disks=N           the number of virtio disks (stripe, mirror)
#   e2e.readd=1           mirror: after the hog, wait (pause point "readd")
#                         while the host hotplugs a fresh disk, add it to the
#                         mirror in place of the failed member and resync
#   e2e.attach_targets=T,T   attach: HOST:PORT[/EXPORT] targets for
#                         attach-swap.sh instead of the one e2e.nbd_* server
#   e2e.discard=none|pages|once|both   swapon discard policy
#   e2e.hog_mib=N e2e.passes=P e2e.seed=S   the memory hog's arguments
#   e2e.nbd_host, e2e.nbd_port, e2e.nbd_export, e2e.nbd_bs   the server, for
#                         e2e.disk=nbd and attach (reached over the network)
#   e2e.script=PATH       run this file of the image instead of the hog scenario
#   e2e.pause=POINT,...   at each POINT (swapon: swap enabled, before the hog;
#                         hog-exit: the hog has exited, swap still on), print
#                         "E2E paused at=POINT" and wait for a line on the
#                         console while the host inspects the server
# Prints lines starting with "E2E " (and the hog's "HOG ") on the console for
# the host to parse, then powers off. It never returns: PID 1 exiting panics.

export PATH=/usr/local/sbin:/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /var/run
echo "E2E init uptime=$(cut -d' ' -f1 /proc/uptime) release=$(uname -r)"

disk=virtio discard=none hog_mib=64 passes=1 seed=1
nbd_host=10.0.2.2 nbd_port=10809 nbd_export= nbd_bs=4096 script= pause= attach_args=
layout=single disks=1 readd=0 attach_targets=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	e2e.*=*)
		key=${arg%%=*}
		key=${key#e2e.}
		value=${arg#*=}
		case "$key" in
		disk | discard | hog_mib | passes | seed | nbd_host | nbd_port | nbd_export | nbd_bs | script | pause | attach_args | layout | disks | readd | attach_targets)
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

pause_point() {
	case ",$pause," in
	*",$1,"*)
		echo "E2E paused at=$1 uptime=$(cut -d' ' -f1 /proc/uptime)"
		read -r _reply
		echo "E2E resumed at=$1"
		;;
	esac
}

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

as_nobody() {
	# the arguments are plain words (no quoting needed)
	su -s /bin/sh -c "PATH=$PATH; $*" nobody
}

net_up() {
	ip link set lo up
	wait_for /sys/class/net/eth0 300 || fail "no eth0"
	ip link set eth0 up
	# Only the user-mode network's own subnet: no default route.
	ip addr add 10.0.2.15/24 dev eth0
}

md_report() {
	# $1: label. The array's state and each member's, then /proc/mdstat.
	md=/sys/block/md0/md
	states=
	for member in "$md"/dev-*; do
		[ -e "$member/state" ] || continue
		states="$states${states:+,}${member##*/dev-}:$(tr ',' '+' <"$member/state")"
	done
	echo "E2E md label=$1 array_state=$(cat $md/array_state) degraded=$(cat $md/degraded) sync_action=$(cat $md/sync_action) mismatch_cnt=$(cat $md/mismatch_cnt) members=$states uptime=$(cut -d' ' -f1 /proc/uptime)"
	sed -n '/^md0/,/^$/p' /proc/mdstat | sed '/^$/d; s/^/E2E mdstat /'
}

describe_disk() {
	name=${1#/dev/}
	echo "E2E disk dev=$1 size_bytes=$(($(cat "/sys/block/$name/size") * 512)) rotational=$(cat "/sys/block/$name/queue/rotational") discard_max_bytes=$(cat "/sys/block/$name/queue/discard_max_bytes") logical_block_size=$(cat "/sys/block/$name/queue/logical_block_size")"
}

case "$disk" in
virtio)
	members=
	for letter in a b c d e f g h; do
		[ "$(echo $members | wc -w)" -lt "$disks" ] || break
		wait_for "/sys/block/vd$letter" 300 || fail "no /dev/vd$letter"
		members="$members /dev/vd$letter"
	done
	dev=/dev/vda
	;;
nbd)
	net_up
	wait_for /sys/block/nbd0 100 || fail "no /dev/nbd0"
	set -- "$nbd_host" "$nbd_port" /dev/nbd0 -b "$nbd_bs" -swap
	[ -z "$nbd_export" ] || set -- "$@" -N "$nbd_export"
	echo "E2E nbd-client args=$(echo "$@" | tr ' ' ',')"
	nbd-client "$@" || fail "nbd-client exit $?"
	dev=/dev/nbd0
	;;
attach)
	net_up
	address="$nbd_host:$nbd_port"
	[ -z "$nbd_export" ] || address="$address/$nbd_export"
	[ -z "$attach_targets" ] || address=$(echo "$attach_targets" | tr ',' ' ')
	# shellcheck disable=SC2086  # attach_args and address are split on purpose
	set -- $(echo "$attach_args" | tr ',' ' ') $address
	echo "E2E attach-swap args=$(echo "$@" | tr ' ' ',')"
	# Not root: refused, nothing attached.
	as_nobody attach-swap.sh "$@" >/tmp/out 2>&1
	echo "E2E attach-nonroot status=$? swaps=$(($(wc -l </proc/swaps) - 1))"
	sed 's/^/E2E attach-nonroot-output /' /tmp/out
	if [ -n "$attach_targets" ]; then
		# The first target and one nobody listens on: refused before anything changes.
		# shellcheck disable=SC2086
		attach-swap.sh $(echo "$attach_args" | tr ',' ' ') "${attach_targets%%,*}" 10.0.2.2:1/swap >/tmp/out 2>&1
		echo "E2E attach-unreachable status=$? swaps=$(($(wc -l </proc/swaps) - 1)) nbd_attached=$(cat /sys/block/nbd*/size | grep -cv '^0$')"
		sed 's/^/E2E attach-unreachable-output /' /tmp/out
	fi
	attach-swap.sh "$@" >/tmp/attached || fail "attach-swap.sh exit $?"
	devs=$(cat /tmp/attached)
	echo "E2E attached devs=$(echo $devs | tr ' ' ',')"
	dev=$(awk 'NR == 2 { print $1 }' /proc/swaps)
	[ -n "$dev" ] || fail "attach-swap.sh enabled no swap"
	# The device is busy now: a second attach is refused.
	attach-swap.sh "$@" >/tmp/out 2>&1
	echo "E2E attach-again status=$? swaps=$(($(wc -l </proc/swaps) - 1))"
	sed 's/^/E2E attach-again-output /' /tmp/out
	;;
*) fail "unknown disk $disk" ;;
esac

swapon_policy() {
	# $@: swapon arguments before the device (util-linux's swapon, first in PATH)
	case "$discard" in
	none) swapon "$@" ;;
	pages | once) swapon --discard="$discard" "$@" ;;
	both) swapon --discard "$@" ;;
	*) fail "unknown discard $discard" ;;
	esac
}

if [ "$disk" = attach ]; then
	for dev in $(awk 'NR > 1 { print $1 }' /proc/swaps); do
		describe_disk "$dev"
	done
	echo "E2E swapon dev=$dev discard=by-script uptime=$(cut -d' ' -f1 /proc/uptime)"
elif [ "$layout" = stripe ]; then
	# One swap area per server at the same priority: the kernel spreads
	# pages over them in turn.
	for member in $members; do
		echo 0 >"/sys/block/${member#/dev/}/queue/rotational" || fail "rotational"
		describe_disk "$member"
		mkswap "$member" >/dev/null || fail "mkswap $member"
		swapon_policy -p 10 "$member" || fail "swapon $member"
	done
	dev=$(echo $members | tr ' ' ',')
	echo "E2E swapon dev=$dev discard=$discard uptime=$(cut -d' ' -f1 /proc/uptime)"
elif [ "$layout" = mirror ]; then
	set -- $members
	[ $# -eq 2 ] || fail "a mirror needs 2 disks, not $#"
	for member in "$@"; do
		echo 0 >"/sys/block/${member#/dev/}/queue/rotational" || fail "rotational"
		describe_disk "$member"
	done
	mkdir -p /run/mdadm
	# --assume-clean: swap never reads a page it did not write first.
	mdadm --create /dev/md0 --level=1 --raid-devices=2 --metadata=1.2 --run \
		--assume-clean "$@" >/tmp/out 2>&1 || {
		sed 's/^/E2E mdadm /' /tmp/out
		fail "mdadm --create"
	}
	wait_for /sys/block/md0/md 100 || fail "no /dev/md0"
	dev=/dev/md0
	md_report created
	describe_disk "$dev"
	mkswap "$dev" >/dev/null || fail "mkswap"
	swapon_policy "$dev" || fail "swapon"
	echo "E2E swapon dev=$dev discard=$discard uptime=$(cut -d' ' -f1 /proc/uptime)"
else
	# virtio-blk reports itself rotational; the kernel then never discards
	# freed swap.
	echo 0 >"/sys/block/${dev#/dev/}/queue/rotational" || fail "rotational"
	describe_disk "$dev"
	mkswap "$dev" >/dev/null || fail "mkswap"
	swapon_policy "$dev" || fail "swapon"
	echo "E2E swapon dev=$dev discard=$discard uptime=$(cut -d' ' -f1 /proc/uptime)"
fi
awk 'NR > 1 { printf "E2E swaps dev=%s priority=%s size_kib=%s\n", $1, $5, $3 }' /proc/swaps

pause_point swapon

vmstat before
echo "E2E hog-start mib=$hog_mib passes=$passes uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/hog "$hog_mib" "$passes" "$seed"
status=$?
echo "E2E hog-exit status=$status uptime=$(cut -d' ' -f1 /proc/uptime)"
vmstat after-hog
echo "E2E swap $(awk 'NR > 1 { used += $4; size += $3 } END { printf "used_kib=%d size_kib=%d", used, size }' /proc/swaps)"
pause_point hog-exit
[ "$layout" != mirror ] || md_report after-hog
if [ "$layout" = mirror ] && [ "$readd" = 1 ]; then
	pause_point readd
	# The host has hotplugged a fresh disk: the first vdX that md does not know.
	new=
	i=0
	while [ -z "$new" ] && [ $i -lt 300 ]; do
		for path in /sys/block/vd*; do
			name=${path##*/}
			[ -e "/sys/block/md0/md/dev-$name" ] || [ "$name" = vda ] || [ "$name" = vdb ] || new=/dev/$name
		done
		[ -n "$new" ] || sleep 0.1
		i=$((i + 1))
	done
	[ -n "$new" ] || fail "no hotplugged disk"
	echo 0 >"/sys/block/${new#/dev/}/queue/rotational"
	describe_disk "$new"
	mdadm /dev/md0 --remove failed >/tmp/out 2>&1 || sed 's/^/E2E mdadm /' /tmp/out
	mdadm /dev/md0 --add "$new" >/tmp/out 2>&1 || {
		sed 's/^/E2E mdadm /' /tmp/out
		fail "mdadm --add $new"
	}
	md_report readd
	mdadm --wait /dev/md0 >/dev/null 2>&1
	md_report resynced
fi

if [ "$disk" = attach ]; then
	# shellcheck disable=SC2086  # one device a word
	as_nobody detach-swap.sh $devs >/tmp/out 2>&1
	echo "E2E detach-nonroot status=$? swaps=$(($(wc -l </proc/swaps) - 1))"
	sed 's/^/E2E detach-nonroot-output /' /tmp/out
	echo "E2E detach-swap devs=$(echo $devs | tr ' ' ',')"
	# shellcheck disable=SC2086
	detach-swap.sh $devs || fail "detach-swap.sh exit $?"
	# Every nbd device released (size 0), no md array left.
	size=0
	for path in /sys/block/nbd*; do
		size=$((size + $(cat "$path/size") * 512))
	done
	arrays=$(grep -c '^md' /proc/mdstat 2>/dev/null)
	echo "E2E detached swaps=$(($(wc -l </proc/swaps) - 1)) size_bytes=$size md_arrays=${arrays:-0}"
elif [ "$layout" = stripe ]; then
	for member in $members; do
		swapoff "$member" || fail "swapoff $member"
	done
else
	swapoff "$dev" || fail "swapoff"
fi
if [ "$layout" = mirror ] && [ "$disk" != attach ]; then
	md_report after-swapoff
	mdadm --stop /dev/md0 >/dev/null 2>&1 || fail "mdadm --stop"
fi
vmstat after-swapoff
echo "E2E swapoff uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$disk" = nbd ]; then
	nbd-client -d /dev/nbd0 >/dev/null 2>&1 || fail "nbd-client -d"
fi
[ "$status" -eq 0 ] && finish ok
finish "hog-$status"
