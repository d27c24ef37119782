#!/usr/bin/env bash
# Install everything the test suite needs, then run it: lint, types, tests.
# Usage: scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Real peers and the VM test's tools come from Debian.
need=()
check() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || need+=("$2"); }
check nbdkit nbdkit
check nbdinfo libnbd-bin
check nbdsh libnbd-bin
check nbdcopy libnbd-bin
check qemu-io qemu-utils
check qemu-img qemu-utils
check qemu-system-x86_64 qemu-system-x86
check fio fio
check gcc gcc
check nbd-client nbd-client
# Socket activation and unit checks; the container tests.
check systemd-socket-activate systemd
check systemd-analyze systemd
check podman podman
check runc runc
check debootstrap debootstrap
# TLS tests make their certificates with openssl; the keepalive test reads ss.
check openssl openssl
check ss iproute2
# The lab's namespace tests (deploy/lab) create namespaces and veth links.
check ip iproute2
# The guest's memory hog is linked statically.
dpkg -s libc6-dev >/dev/null 2>&1 || need+=(libc6-dev)
# The tier's C loops build against lz4's headers; the tests then require them.
dpkg -s liblz4-dev >/dev/null 2>&1 || need+=(liblz4-dev)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    need+=(python3-dev)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx swapon || need+=(busybox-static)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The package and its test dependencies, in a local venv.
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
NBDCACHE_REQUIRE_NATIVE=1 exec .venv/bin/pytest -q -rs "$@"
