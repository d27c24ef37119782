#!/bin/bash
# Undo attach-swap.sh: swapoff, stop the mirror if it is one, disconnect.
#
#   detach-swap.sh DEVICE...     (what attach-swap.sh printed: /dev/nbdN, or
#                                 /dev/mdN for a mirror; all of a stripe's)
#
# For an NBD device: swapoff, then nbd-client -d. For a mirror made by
# attach-swap.sh --mirror: swapoff the md device, mdadm --stop, then
# disconnect its members (recorded in /run/nbdcache-swap/mdN). swapoff first
# reads every page still in swap back into RAM, so it needs that much free
# memory and the servers must still answer (for a mirror: one of them).
# Devices are handled in order; the first failure stops with one line on
# stderr and a non-zero exit status (2: bad usage, 1: anything else).
set -u
export LC_ALL=C

prog=${0##*/}
STATE_DIR=/run/nbdcache-swap

die() {
	echo "$prog: $*" >&2
	exit 1
}

usage() {
	if [ $# -gt 0 ]; then
		echo "$prog: $* (see $prog --help)" >&2
	else
		echo "usage: $prog DEVICE...   (the /dev/nbdN or /dev/mdN that attach-swap.sh printed)" >&2
	fi
	exit 2
}

case ${1:-} in -h | --help)
	echo "usage: $prog DEVICE...   (the /dev/nbdN or /dev/mdN that attach-swap.sh printed)"
	exit 0
	;;
esac
[ $# -ge 1 ] || usage "expected one DEVICE or more"
names=()
for arg in "$@"; do
	name=${arg#/dev/}
	case $name in
	nbd[0-9]* | md[0-9]*)
		num=${name#nbd}
		num=${num#md}
		case $num in *[!0-9]*) usage "not an NBD or md device: $arg" ;; esac
		;;
	*) usage "not an NBD or md device: $arg" ;;
	esac
	names+=("$name")
done

[ "$(id -u)" = 0 ] || die "must be run as root (it disables swap and detaches devices)"

sectors() { cat "/sys/block/$1/size" 2>/dev/null || echo 0; }
is_swap() { awk -v d="/dev/$1" 'NR > 1 && $1 == d { found = 1 } END { exit !found }' /proc/swaps; }
connected() { [ "$(sectors "$1")" != 0 ] || [ -e "/sys/block/$1/pid" ]; }
last_line() { printf '%s\n' "$1" | sed -n '/[^[:space:]]/h; ${x;p}'; }

swap_off() {
	local out
	if is_swap "$1"; then
		out=$(swapoff "/dev/$1" 2>&1) ||
			die "swapoff /dev/$1 failed (not enough free memory for the pages in swap?): $(last_line "$out")"
	fi
}

disconnect() {
	local out i=0
	if connected "$1"; then
		out=$(nbd-client -d "/dev/$1" 2>&1 </dev/null) ||
			die "nbd-client -d /dev/$1 failed: $(last_line "$out")"
		while connected "$1" && [ $i -lt 100 ]; do
			sleep 0.1
			i=$((i + 1))
		done
		connected "$1" && die "/dev/$1 is still connected 10 s after nbd-client -d"
	fi
	rm -f "$STATE_DIR/$1"
}

for name in "${names[@]}"; do
	[ -e "/sys/block/$name" ] || die "no such device /dev/$name"
	case $name in
	md*)
		state=$STATE_DIR/$name
		[ -f "$state" ] || die "/dev/$name is not a mirror set up by attach-swap.sh: left alone"
		read -r kind members <"$state"
		[ "$kind" = mirror ] || die "$state: not a mirror record"
		# The record must describe the array as it is now: never stop or
		# disconnect devices that belong to something else.
		if [ -e "/sys/block/$name/md" ]; then
			for member in $members; do
				[ -e "/sys/block/$name/md/dev-$member" ] ||
					die "$state names $member, which is not in /dev/$name: left alone"
			done
		fi
		swap_off "$name"
		if [ -e "/sys/block/$name/md" ]; then
			out=$(mdadm --stop "/dev/$name" 2>&1) || die "mdadm --stop /dev/$name failed: $(last_line "$out")"
		fi
		for member in $members; do
			# No stale superblock may assemble the old array at the next attach.
			mdadm --zero-superblock "/dev/$member" >/dev/null 2>&1 || true
			disconnect "$member"
		done
		rm -f "$state"
		;;
	nbd*)
		if is_swap "$name"; then
			:
		elif ! connected "$name"; then
			rm -f "$STATE_DIR/$name"
			die "/dev/$name is not attached"
		elif [ ! -f "$STATE_DIR/$name" ]; then
			die "/dev/$name is attached but is not swap set up by attach-swap.sh: left alone (nbd-client -d /dev/$name detaches it)"
		elif [ -n "$(ls /sys/block/$name/holders 2>/dev/null)" ]; then
			die "/dev/$name is a member of $(ls /sys/block/$name/holders): detach that instead"
		fi
		swap_off "$name"
		disconnect "$name"
		;;
	esac
done
