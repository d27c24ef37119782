"""Server "hosts" on one machine: network namespaces with a veth link each.

This module owns the namespaces, links and addresses the lab creates, and
their removal. Host N (1-based) of a run tagged TAG (4 hex digits) is the
namespace `nbdlab-TAG-N`, linked to the root namespace by a veth pair
`nblTAGNh` (root side, 10.123.K.1/30) and `nblTAGNs` (namespace side,
10.123.K.2/30), K being the first third octet no other link uses (so two
labs can run side by side). A /30 per link means each namespace reaches only
the root namespace's end of its own link, and the root namespace reaches the
server at 10.123.K.2 through the connected route: no forwarding, no default
route, nothing leaves the machine.

Every name starts with `nbdlab-` (namespaces) or `nbl` (links), so
leftovers of a run that was killed outright (SIGKILL) are found and removed
by `remove_leftovers()`. Before using an address the lab checks that no
route of the root namespace covers it: it never takes an address in use.

Needs root and iproute2 (`ip`).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

NETNS_PREFIX = "nbdlab-"
LINK_PREFIX = "nbl"
LAB_NETWORK = ipaddress.ip_network("10.123.0.0/16")
MAX_HOSTS = 250
#: Held while a lab picks and takes its subnets, so two labs never pick the same.
LOCK_FILE = "/run/nbdlab.lock"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS...`; raise with its stderr when it fails and check is set."""
    binary = shutil.which("ip") or "/usr/sbin/ip"
    result = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def lab_namespaces() -> list[str]:
    """Namespaces named like the lab's (this run's or leftovers)."""
    out = ip("-json", "netns", "list", check=False).stdout.strip()
    names = [entry["name"] for entry in json.loads(out)] if out else []
    return sorted(n for n in names if n.startswith(NETNS_PREFIX))


def lab_links() -> list[str]:
    """Links in the root namespace named like the lab's."""
    out = ip("-json", "link", "show", check=False).stdout.strip()
    names = [entry["ifname"] for entry in json.loads(out)] if out else []
    return sorted(n for n in names if n.startswith(LINK_PREFIX))


def lab_addresses_in_use() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Routes of the root namespace that overlap 10.123.0.0/16."""
    used = []
    out = ip("-json", "-4", "route", "show", check=False).stdout.strip()
    for route in json.loads(out) if out else []:
        dst = route.get("dst", "")
        if dst and dst != "default":
            net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
            if net.overlaps(LAB_NETWORK):
                used.append(net)
    return used


def free_subnets(count: int) -> list[int]:
    """Third octets K of 10.123.K.0/30 links that no route covers yet."""
    used = lab_addresses_in_use()
    free = []
    for k in range(1, 255):
        net = ipaddress.ip_network(f"10.123.{k}.0/30")
        if not any(net.overlaps(u) for u in used):
            free.append(k)
            if len(free) == count:
                return free
    raise RuntimeError(f"no {count} free /30 subnets left in {LAB_NETWORK}")


def pids_in(namespace: str) -> list[int]:
    """Processes running in a namespace (`ip netns pids`)."""
    out = ip("netns", "pids", namespace, check=False).stdout
    return [int(p) for p in out.split()]


def remove_leftovers(tag: str = "") -> list[str]:
    """Remove every namespace and link named like the lab's; return what was removed.

    For runs that could not clean up after themselves (SIGKILL, power loss):
    with no tag, everything of every lab (run it when no lab is running),
    else only the run tagged so. Processes still running in a leftover
    namespace are killed first.
    """
    removed = []
    links = [link for link in lab_links() if not tag or link.startswith(f"{LINK_PREFIX}{tag}")]
    for ns in lab_namespaces():
        if tag and not ns.startswith(f"{NETNS_PREFIX}{tag}-"):
            continue
        for pid in pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        ip("netns", "delete", ns, check=False)
        removed.append(f"netns {ns}")
    # A link goes with its namespace; one whose namespace was gone is deleted here.
    existing = set(lab_links())
    for link in links:
        if link in existing:
            ip("link", "delete", link, check=False)
        removed.append(f"link {link}")
    return removed


@dataclass(frozen=True)
class Host:
    """One server host: a namespace and its link to the root namespace."""

    index: int  # 1-based
    netns: str
    root_link: str
    ns_link: str
    root_address: str  # the root namespace's end, 10.123.K.1
    address: str  # the server's address in the namespace, 10.123.K.2

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """argv to run a program inside this host's namespace."""
        binary = shutil.which("ip") or "/usr/sbin/ip"
        return [binary, "netns", "exec", self.netns, *argv]


@dataclass
class Namespaces:
    """N server hosts as namespaces; a context manager that removes them all.

    `create()` builds them one by one and records each piece as soon as it
    exists, so `remove()` (also after a failure half way) deletes exactly
    what was made. Deleting a namespace also deletes its end of the veth
    pair, and with it the root end; the root end is deleted explicitly too
    in case the namespace was already gone.
    """

    count: int
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: list[Host] = field(default_factory=list)
    _made_netns: list[str] = field(default_factory=list)
    _made_links: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_HOSTS:
            raise ValueError(f"1..{MAX_HOSTS} hosts, not {self.count}")
        if len(self.tag) != 4 or not all(c in "0123456789abcdef" for c in self.tag):
            raise ValueError("tag: 4 hex digits")

    def create(self) -> list[Host]:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        with open(LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._create()

    def _create(self) -> list[Host]:
        if any(ns.startswith(f"{NETNS_PREFIX}{self.tag}-") for ns in lab_namespaces()):
            raise RuntimeError(f"a lab tagged {self.tag} exists already")
        for n, k in enumerate(free_subnets(self.count), 1):
            host = Host(
                index=n,
                netns=f"{NETNS_PREFIX}{self.tag}-{n}",
                root_link=f"{LINK_PREFIX}{self.tag}{n}h",
                ns_link=f"{LINK_PREFIX}{self.tag}{n}s",
                root_address=f"10.123.{k}.1",
                address=f"10.123.{k}.2",
            )
            ip("netns", "add", host.netns)
            self._made_netns.append(host.netns)
            ip("link", "add", host.root_link, "type", "veth", "peer", "name", host.ns_link)
            self._made_links.append(host.root_link)
            ip("link", "set", host.ns_link, "netns", host.netns)
            ip("addr", "add", f"{host.root_address}/30", "dev", host.root_link)
            ip("link", "set", host.root_link, "up")
            ip("-n", host.netns, "addr", "add", f"{host.address}/30", "dev", host.ns_link)
            ip("-n", host.netns, "link", "set", host.ns_link, "up")
            ip("-n", host.netns, "link", "set", "lo", "up")
            self.hosts.append(host)
        return self.hosts

    def remove(self) -> list[str]:
        """Delete everything create() made; return what could not be deleted."""
        problems = []
        for ns in reversed(self._made_netns):
            for pid in pids_in(ns):
                # Only ever processes in the lab's own namespaces.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            result = ip("netns", "delete", ns, check=False)
            if result.returncode != 0 and ns in lab_namespaces():
                problems.append(f"netns {ns}: {result.stderr.strip()}")
        existing = set(lab_links())
        for link in reversed(self._made_links):
            if link in existing:
                result = ip("link", "delete", link, check=False)
                if result.returncode != 0 and link in lab_links():
                    problems.append(f"link {link}: {result.stderr.strip()}")
        self._made_netns.clear()
        self._made_links.clear()
        self.hosts.clear()
        return problems

    def __enter__(self) -> Namespaces:
        try:
            self.create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.remove()
        if problems:
            raise RuntimeError("lab teardown left: " + "; ".join(problems))
