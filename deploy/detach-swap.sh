#!/bin/bash
# Undo attach-swap.sh: swapoff the NBD device, then disconnect it.
#
#   detach-swap.sh DEVICE        (/dev/nbdN or nbdN)
#
# swapoff first reads every page still in swap back into RAM, so it needs that
# much free memory and the server must still answer. Every refusal is one line
# on stderr and a non-zero exit status (2: bad usage, 1: anything else).
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
		echo "usage: $prog DEVICE   (the /dev/nbdN that attach-swap.sh printed)" >&2
	fi
	exit 2
}

case ${1:-} in -h | --help)
	echo "usage: $prog DEVICE   (the /dev/nbdN that attach-swap.sh printed)"
	exit 0
	;;
esac
[ $# -eq 1 ] || usage "expected one DEVICE"
name=${1#/dev/}
case $name in
nbd[0-9]*) case ${name#nbd} in *[!0-9]*) usage "not an NBD device: $1" ;; esac ;;
*) usage "not an NBD device: $1" ;;
esac
dev=/dev/$name

[ "$(id -u)" = 0 ] || die "must be run as root (it disables swap and detaches $dev)"
[ -e "/sys/block/$name" ] || die "no such device $dev"

sectors() { cat "/sys/block/$name/size" 2>/dev/null || echo 0; }
is_swap() { awk -v d="$dev" 'NR > 1 && $1 == d { found = 1 } END { exit !found }' /proc/swaps; }
connected() { [ "$(sectors)" != 0 ] || [ -e "/sys/block/$name/pid" ]; }

if is_swap; then
	:
elif ! connected; then
	rm -f "$STATE_DIR/$name"
	die "$dev is not attached"
elif [ ! -f "$STATE_DIR/$name" ]; then
	die "$dev is attached but is not swap set up by attach-swap.sh: left alone (nbd-client -d $dev detaches it)"
fi

if is_swap; then
	out=$(swapoff "$dev" 2>&1) ||
		die "swapoff $dev failed (not enough free memory for the pages in swap?): $(printf '%s\n' "$out" | sed -n '/[^[:space:]]/h; ${x;p}')"
fi

if connected; then
	out=$(nbd-client -d "$dev" 2>&1 </dev/null) ||
		die "nbd-client -d $dev failed: $(printf '%s\n' "$out" | sed -n '/[^[:space:]]/h; ${x;p}')"
	i=0
	while connected && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	connected && die "$dev is still connected 10 s after nbd-client -d"
fi
rm -f "$STATE_DIR/$name"
