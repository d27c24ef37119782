#!/bin/bash
# Attach NBD exports (nbdcache servers) as swap on this Linux host.
#
#   attach-swap.sh [--priority N] [--connections N] [--device /dev/nbdN] HOST:PORT[/EXPORT]
#   attach-swap.sh --stripe [--priority N] [--connections N] TARGET TARGET...
#   attach-swap.sh --mirror [--priority N] [--connections N] [--md /dev/mdN] TARGET TARGET
#
# Loads the nbd module if needed, asks every server about its export
# (reachable, exists, writable, multi-conn) before changing anything, picks
# free /dev/nbdN devices (or the one given), connects each with
# `nbd-client -b 4096 -swap` (`-C N` with --connections), and then:
# - one target: mkswap and `swapon --discard=pages` (`-p N` with
#   --priority) on the device; nbd-client runs with -persist (it reconnects);
# - --stripe: one swap area per target, all at the same priority (--priority,
#   default 10), so the kernel spreads pages over the servers in turn;
# - --mirror: md RAID1 over two targets (`mdadm --create --level=1
#   --metadata=1.2 --assume-clean`), swap on the md device. The members are
#   connected without -persist and with `-timeout 30`: when a server dies,
#   its requests fail at once (or after 30 s if it stops answering) and md
#   marks that member faulty and goes on with the other, where -persist
#   would hold every swap I/O until the server came back.
# Prints the devices to give detach-swap.sh, one a line (the md device for a
# mirror). Every refusal is one line on stderr and a non-zero exit status
# (2: bad usage, 1: anything else); a failure after the first device is
# connected undoes what was done.
set -u
export LC_ALL=C

prog=${0##*/}
STATE_DIR=/run/nbdcache-swap  # one file per device attached here
PROBE_TIMEOUT=20              # seconds for each server to answer the probe
BLOCK_SIZE=4096
MIRROR_TIMEOUT=30             # nbd-client -timeout for mirror members
STRIPE_PRIORITY=10
USAGE="usage: $prog [--stripe | --mirror] [--priority N] [--connections N] [--device /dev/nbdN] [--md /dev/mdN] HOST:PORT[/EXPORT]..."

die() {
	echo "$prog: $*" >&2
	exit 1
}

usage() {
	if [ $# -gt 0 ]; then
		echo "$prog: $* (see $prog --help)" >&2
	else
		echo "$USAGE" >&2
	fi
	exit 2
}

is_uint() {
	case $1 in '' | *[!0-9]*) return 1 ;; esac
	[ ${#1} -le 9 ]
}

mode=single priority= connections= device= md=
while [ $# -gt 0 ]; do
	case $1 in
	-h | --help)
		echo "$USAGE"
		exit 0
		;;
	--stripe | --mirror)
		[ "$mode" = single ] || usage "--stripe and --mirror exclude each other"
		mode=${1#--}
		shift
		continue
		;;
	--priority | --connections | --device | --md)
		[ $# -ge 2 ] || usage "$1 needs a value"
		opt=${1#--} value=$2
		shift 2
		;;
	--priority=* | --connections=* | --device=* | --md=*)
		opt=${1%%=*} opt=${opt#--} value=${1#*=}
		shift
		;;
	--)
		shift
		break
		;;
	-*) usage "unknown option $1" ;;
	*) break ;;
	esac
	case $opt in
	priority)
		case $value in -1) ;; *) is_uint "$value" && [ "$value" -le 32767 ] ||
			usage "--priority must be -1..32767, not '$value'" ;; esac
		priority=$value
		;;
	connections)
		is_uint "$value" && [ "$value" -ge 1 ] && [ "$value" -le 64 ] ||
			usage "--connections must be 1..64, not '$value'"
		connections=$value
		;;
	device)
		case $value in /dev/nbd*) value=${value#/dev/} ;; esac
		case $value in nbd[0-9]*) is_uint "${value#nbd}" || usage "not an NBD device: $value" ;;
		*) usage "not an NBD device: $value" ;; esac
		device=$value
		;;
	md)
		case $value in /dev/md*) value=${value#/dev/} ;; esac
		case $value in md[0-9]*) is_uint "${value#md}" || usage "not an md device: $value" ;;
		*) usage "not an md device: $value (use /dev/mdN)" ;; esac
		md=$value
		;;
	esac
done
case $mode in
single) [ $# -eq 1 ] || usage "expected one HOST:PORT[/EXPORT] (several: --stripe or --mirror)" ;;
stripe)
	[ $# -ge 2 ] || usage "--stripe needs at least two targets"
	[ -z "$device" ] || usage "--device is for one target"
	;;
mirror)
	[ $# -eq 2 ] || usage "--mirror needs exactly two targets"
	[ -z "$device" ] || usage "--device is for one target"
	;;
esac
[ -z "$md" ] || [ "$mode" = mirror ] || usage "--md is for --mirror"
[ "$mode" != stripe ] || [ -n "$priority" ] || priority=$STRIPE_PRIORITY

# HOST:PORT[/EXPORT], an IPv6 address in brackets: [::1]:10809/swap
targets=() hosts=() ports=() exports=() keys=()
for target in "$@"; do
	case $target in
	*/*) hostport=${target%%/*} export_name=${target#*/} ;;
	*) hostport=$target export_name= ;;
	esac
	case $hostport in
	\[*\]:*)
		host=${hostport%%]:*} host=${host#[} port=${hostport##*]:}
		;;
	*:*)
		host=${hostport%:*} port=${hostport##*:}
		case $host in *:*) usage "put an IPv6 address in brackets: [$host]:$port" ;; esac
		;;
	*) usage "no port in '$target' (HOST:PORT[/EXPORT])" ;;
	esac
	[ -n "$host" ] || usage "no host in '$target'"
	is_uint "$port" && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || usage "bad port '$port' in '$target'"
	[ ${#export_name} -le 4096 ] || usage "export name longer than 4096 bytes"
	key="$host $port $export_name"
	for other in ${keys[@]+"${keys[@]}"}; do
		[ "$other" != "$key" ] || usage "$target is given twice"
	done
	targets+=("$target") hosts+=("$host") ports+=("$port") exports+=("$export_name") keys+=("$key")
done

[ "$(id -u)" = 0 ] || die "must be run as root (it attaches /dev/nbdN and enables swap)"
command -v nbd-client >/dev/null || die "nbd-client not found (Debian/Ubuntu: apt-get install nbd-client)"
for tool in mkswap swapon; do
	command -v "$tool" >/dev/null || die "$tool not found (util-linux)"
done
[ "$mode" != mirror ] || command -v mdadm >/dev/null || die "mdadm not found (Debian/Ubuntu: apt-get install mdadm)"

# Ask the server about the export before touching a device: reachable, an
# NBD server, the export exists, writable, and whether it offers multi-conn.
# NBD fixed-newstyle handshake over bash's /dev/tcp: NBD_OPT_INFO, then
# NBD_OPT_ABORT. Prints "ok SIZE FLAGS", "unknown" or "err MESSAGE".
nbd_probe() {
	local host=$1 port=$2 name=$3 errf=$4
	local IHAVEOPT='\x49\x48\x41\x56\x45\x4f\x50\x54'
	rd() { # N bytes from the socket, as decimal numbers; fails when short
		local out n
		out=$(dd bs=1 count="$1" <&3 2>/dev/null | od -An -v -tu1) || return 1
		set -- "$1" $out
		n=$1
		shift
		[ $# -eq "$n" ] || return 1
		echo "$*"
	}
	be32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 >> 24 & 255)) $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }
	num() { local v=0 b; for b in "$@"; do v=$((v * 256 + b)); done; echo $v; }
	text() { local b; for b in "$@"; do [ "$b" -ge 32 ] && [ "$b" -lt 127 ] && printf "\\$(printf %03o "$b")"; done; }
	if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>"$errf"; then
		echo "err cannot connect to $host port $port: $(sed -n '$s/.*: //p' "$errf")"
		return
	fi
	local g
	g=$(rd 18) || { echo "err $host:$port closed the connection: not an NBD server?"; return; }
	set -- $g
	if [ "$*" = "78 66 68 77 65 71 73 67 0 0 66 2 129 134 18 83 ${17} ${18}" ]; then
		echo "err $host:$port is an old-style NBD server: nbd-client cannot attach it"
		return
	fi
	[ "${*:1:16}" = "78 66 68 77 65 71 73 67 73 72 65 86 69 79 80 84" ] ||
		{ echo "err $host:$port is not an NBD server"; return; }
	if [ $((${18} & 1)) = 0 ]; then
		echo unknown # no fixed newstyle: no NBD_OPT_INFO to ask with
		return
	fi
	printf '\x00\x00\x00\x01' >&3 # NBD_FLAG_C_FIXED_NEWSTYLE
	printf "$IHAVEOPT$(be32 6)$(be32 $((4 + ${#name} + 2)))$(be32 ${#name})" >&3
	printf '%s\x00\x00' "$name" >&3
	local h data t len size= flags= answer=
	while :; do
		h=$(rd 20) || { echo "err $host:$port closed the connection during the handshake"; return; }
		set -- $h
		[ "${*:1:8}" = "0 3 232 137 4 85 101 169" ] || { echo "err $host:$port sent a malformed option reply"; return; }
		t=$(num "${@:13:4}") len=$(num "${@:17:4}")
		[ "$len" -le 65536 ] || { echo "err $host:$port sent an oversized option reply"; return; }
		data=
		if [ "$len" -gt 0 ]; then
			data=$(rd "$len") || { echo "err $host:$port closed the connection during the handshake"; return; }
		fi
		set -- $data
		case $t in
		1) break ;;                                          # NBD_REP_ACK
		3) if [ "$len" -ge 12 ] && [ "$1 $2" = "0 0" ]; then # NBD_REP_INFO, NBD_INFO_EXPORT
			size=$(num "${@:3:8}") flags=$(num "${@:11:2}")
		fi ;;
		2147483649) answer=unknown; break ;; # NBD_REP_ERR_UNSUP: no NBD_OPT_INFO
		*)
			if [ "$t" -ge 2147483648 ]; then
				local why
				why=$(text "$@")
				if [ "$t" = 2147483654 ]; then # NBD_REP_ERR_UNKNOWN
					answer="err $host:$port has no export named '$name'"
				else
					answer="err $host:$port refused export '$name': ${why:-error $((t - 2147483648))}"
				fi
				break
			fi
			;;
		esac
	done
	printf "$IHAVEOPT$(be32 2)$(be32 0)" >&3 # NBD_OPT_ABORT
	rd 20 >/dev/null
	exec 3>&-
	if [ -n "$answer" ]; then
		echo "$answer"
	elif [ -n "$size" ]; then
		echo "ok $size $flags"
	else
		echo unknown
	fi
}

# Every server first: nothing is changed unless all of them answer.
probe_src="$(declare -f nbd_probe); nbd_probe \"\$@\""
for i in "${!targets[@]}"; do
	errf=$(mktemp) || die "cannot create a temporary file"
	host=${hosts[$i]} port=${ports[$i]} export_name=${exports[$i]}
	if command -v timeout >/dev/null; then
		probe=$(timeout "$PROBE_TIMEOUT" bash -c "$probe_src" nbd_probe "$host" "$port" "$export_name" "$errf" 2>/dev/null)
	else
		probe=$(bash -c "$probe_src" nbd_probe "$host" "$port" "$export_name" "$errf" 2>/dev/null)
	fi
	rm -f "$errf"
	case $probe in
	"ok "*)
		set -- $probe
		size=$2 flags=$3
		[ "$size" -gt 0 ] || die "export '$export_name' on $host:$port is empty"
		[ $((flags & 2)) = 0 ] || die "export '$export_name' on $host:$port is read-only"
		if [ "${connections:-1}" -gt 1 ] && [ $((flags & 256)) = 0 ]; then
			die "export '$export_name' on $host:$port does not offer multi-conn: --connections $connections refused"
		fi
		;;
	unknown) ;; # an older server: nbd-client finds out the rest
	"err "*) die "${probe#err }" ;;
	*) die "$host:$port did not complete an NBD handshake within $PROBE_TIMEOUT s (unreachable?)" ;;
	esac
done

# The kernel's NBD client.
if [ ! -e /sys/block/nbd0 ]; then
	modprobe nbd 2>/dev/null || die "cannot load the nbd kernel module (modprobe nbd failed)"
	i=0
	while [ ! -e /sys/block/nbd0 ] && [ $i -lt 50 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	[ -e /sys/block/nbd0 ] || die "the nbd module is loaded but there is no /dev/nbd0 (nbds_max=0?)"
fi

sectors() { cat "/sys/block/$1/size" 2>/dev/null || echo 0; }
# Attached: a size, or a connection (the kernel shows its pid while connected).
in_use() { [ "$(sectors "$1")" != 0 ] || [ -e "/sys/block/$1/pid" ]; }

# Serialise attaches (choosing devices and connecting them), when flock exists.
mkdir -p "$STATE_DIR" || die "cannot create $STATE_DIR"
if command -v flock >/dev/null; then
	exec 9>"$STATE_DIR/.lock" || die "cannot open $STATE_DIR/.lock"
	flock -w 60 9 || die "another attach is still running (lock $STATE_DIR/.lock)"
fi

# The same export twice would be two swap areas on one disk: refuse.
for state in "$STATE_DIR"/nbd*; do
	[ -f "$state" ] || continue
	name=${state##*/}
	if ! in_use "$name"; then
		rm -f "$state" # detached behind our back
		continue
	fi
	for i in "${!keys[@]}"; do
		[ "$(cat "$state")" = "${keys[$i]}" ] && die "${targets[$i]} is already attached as /dev/$name (busy; detach-swap.sh first)"
	done
done

if [ "$mode" = mirror ]; then
	if [ -n "$md" ]; then
		[ ! -e "/sys/block/$md/md" ] || [ "$(cat "/sys/block/$md/md/array_state" 2>/dev/null)" = clear ] ||
			die "/dev/$md is busy (an md array)"
	else
		i=0
		while [ -e "/sys/block/md$i/md" ] && [ "$(cat "/sys/block/md$i/md/array_state" 2>/dev/null)" != clear ]; do
			i=$((i + 1))
		done
		md=md$i
	fi
fi

attached=()   # devices connected by this run, undone on failure
md_created="" # set once this run created the md array
swapping() { grep -q "^$1[[:space:]]" /proc/swaps; }
# Undo in reverse, and never disconnect a device that may still hold swapped
# pages: if swapoff or mdadm --stop fails, leave it and say so.
undo() {
	local name left=""
	if [ -n "$md_created" ] && [ -e "/sys/block/$md/md" ]; then
		if { ! swapping "/dev/$md" || swapoff "/dev/$md"; } &&
			mdadm --stop "/dev/$md" >/dev/null 2>&1; then
			rm -f "$STATE_DIR/$md"
		else
			left="/dev/$md and its members"
		fi
	fi
	if [ -z "$left" ]; then
		for name in ${attached[@]+"${attached[@]}"}; do
			if swapping "/dev/$name" && ! swapoff "/dev/$name"; then
				left="$left /dev/$name"
				continue
			fi
			nbd-client -d "/dev/$name" >/dev/null 2>&1
			rm -f "$STATE_DIR/$name"
		done
	fi
	[ -z "$left" ] || echo "attach-swap.sh: left in place (still in use):$left; detach-swap.sh later" >&2
}
fail() {
	trap - INT TERM HUP
	undo
	die "$@"
}
trap 'fail "interrupted"' INT TERM HUP
last_line() { printf '%s\n' "$1" | sed -n '/[^[:space:]]/h; ${x;p}'; }

# Connect target $1 (an index) to a free device; sets $dev.
connect() {
	local i=$1 name=$device
	if [ -n "$name" ]; then
		[ -e "/sys/block/$name" ] || fail "no such device /dev/$name"
		in_use "$name" && fail "/dev/$name is busy (already attached)"
	else
		local n=0
		while [ -e "/sys/block/nbd$n" ]; do
			if ! in_use "nbd$n"; then
				name=nbd$n
				break
			fi
			n=$((n + 1))
		done
		[ -n "$name" ] || fail "every /dev/nbdN is busy ($n devices; load nbd with a larger nbds_max)"
	fi
	dev=/dev/$name
	[ -b "$dev" ] || fail "$dev is not a block device node"
	set -- "${hosts[$i]}" "${ports[$i]}" "$dev"
	[ -z "${exports[$i]}" ] || set -- "$@" -N "${exports[$i]}"
	set -- "$@" -b "$BLOCK_SIZE" -swap
	if [ "$mode" = mirror ]; then
		set -- "$@" -timeout "$MIRROR_TIMEOUT"
	else
		set -- "$@" -persist
	fi
	[ -z "$connections" ] || set -- "$@" -C "$connections"
	local out why
	if ! out=$(nbd-client "$@" 2>&1 </dev/null 9>&-); then
		why=$(last_line "$out")
		in_use "$name" && fail "$dev is busy: ${why:-nbd-client failed}"
		fail "nbd-client could not attach ${targets[$i]} to $dev: ${why:-no message}"
	fi
	attached+=("$name")
	echo "${keys[$i]}" >"$STATE_DIR/$name"
	local n=0
	while [ "$(sectors "$name")" = 0 ] && [ $n -lt 100 ]; do
		sleep 0.1
		n=$((n + 1))
	done
	[ "$(sectors "$name")" != 0 ] || fail "$dev did not come up after nbd-client"
	# The kernel discards freed swap clusters only on non-rotational devices.
	local rotational=/sys/block/$name/queue/rotational
	if [ -w "$rotational" ]; then
		echo 0 2>/dev/null >"$rotational" || true
	fi
}

# mkswap and swapon --discard=pages [-p N] on $1.
enable_swap() {
	local out
	out=$(mkswap "$1" 2>&1) || fail "mkswap $1 failed: $(last_line "$out")"
	set -- --discard=pages "$1"
	[ -z "$priority" ] || set -- -p "$priority" "$@"
	out=$(swapon "$@" 2>&1) || fail "swapon ${*: -1} failed: $(last_line "$out")"
}

for i in "${!targets[@]}"; do
	connect "$i"
done

case $mode in
single | stripe)
	for name in "${attached[@]}"; do
		enable_swap "/dev/$name"
	done
	for name in "${attached[@]}"; do
		echo "/dev/$name"
	done
	;;
mirror)
	mkdir -p /run/mdadm
	# --assume-clean: swap never reads a page it has not written first, so
	# the members need no initial sync.
	if ! out=$(mdadm --create "/dev/$md" --level=1 --raid-devices=2 --metadata=1.2 \
		--run --assume-clean "/dev/${attached[0]}" "/dev/${attached[1]}" 2>&1 </dev/null); then
		fail "mdadm --create /dev/$md failed: $(last_line "$out")"
	fi
	md_created=1
	echo "mirror ${attached[*]}" >"$STATE_DIR/$md"
	i=0
	while [ "$(sectors "$md")" = 0 ] && [ $i -lt 100 ]; do
		sleep 0.1
		i=$((i + 1))
	done
	enable_swap "/dev/$md"
	echo "/dev/$md"
	;;
esac
trap - INT TERM HUP
