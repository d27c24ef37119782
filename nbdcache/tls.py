"""TLS contexts, the client's identity, and who may use which export.

NBD has no authentication of its own; this module owns what stands in for
it, without touching a socket:

- `server_context` builds the `ssl.SSLContext` the server upgrades
  connections with after NBD_OPT_STARTTLS: TLS 1.2 or later, our certificate
  and key, and, given a CA, client certificates required and verified
  against it (unverified clients fail the TLS handshake itself).
- `Peer` is what is known of a client: its address and, once TLS verified a
  certificate, its subject and names (the subject's common name and the
  certificate's DNS subjectAltNames).
- `AccessList` is one export's rules: the certificate names and the client
  address networks allowed to use it.  An empty list allows everyone.
  Unix-socket clients have no address: network rules do not apply to them
  (the socket file's permissions guard it).
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TLSConfigError(Exception):
    """Certificates or keys that cannot be loaded, phrased for the operator."""


def server_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """A server-side context; raises TLSConfigError naming the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(
            f"server.tls_cert/tls_key: cannot load {cert} with {key}: {_why(exc)}"
        ) from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"server.tls_ca: cannot load {ca}: {_why(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return str(exc.strerror or exc)


def parse_address(host: str | None) -> IPAddress | None:
    """The client's address as an ip_address (IPv4-mapped IPv6 unwrapped)."""
    if host is None:
        return None
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Peer:
    """What the server knows of a client."""

    address: IPAddress | None  # None: a Unix-socket client
    subject: str = ""  # "CN=alice,O=example" of a verified certificate
    names: frozenset[str] = frozenset()  # its common name(s) and DNS SANs

    @classmethod
    def from_cert(cls, address: IPAddress | None, cert: Mapping[str, Any] | None) -> Peer:
        """`cert` is `SSLObject.getpeercert()`: empty or None without a verified one."""
        if not cert:
            return cls(address)
        rdns = cert.get("subject", ())
        # RFC 4514 escaping, "+" inside a multi-valued RDN: no value can
        # pose as more attributes ("CN=O=acme,CN=admin" stays one CN).
        subject = ",".join(
            "+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in rdns
        )
        cns = [v for rdn in rdns for k, v in rdn if k == "commonName"]
        # A certificate with several CNs names nobody in particular.
        names = set(cns) if len(cns) == 1 else set()
        names |= {v for k, v in cert.get("subjectAltName", ()) if k == "DNS"}
        return cls(address, subject, frozenset(names))

    def describe(self) -> str:
        who = str(self.address) if self.address is not None else "unix socket"
        return f"{who}, certificate {self.subject!r}" if self.subject else f"{who}, no certificate"


def _escape(value: str) -> str:
    """An attribute value as RFC 4514 writes it in a distinguished name."""
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and len(out) > 1:
        out = out[:-1] + "\\ "
    return out


_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


@dataclass(frozen=True)
class AccessList:
    """One export's rules; `refusal` says why a peer is refused, or None."""

    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(cls, names: Iterable[str], networks: Iterable[str]) -> AccessList:
        return cls(frozenset(names), tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    @property
    def needs_certificate(self) -> bool:
        return bool(self.names)

    def refusal(self, peer: Peer) -> str | None:
        address = peer.address
        if self.networks and address is not None and not any(address in n for n in self.networks):
            return f"address {peer.address} is not in the allowed networks"
        if self.names:
            if not peer.subject:
                return "a verified client certificate is required"
            # An entry with "=" is a whole subject; any other is a name (the
            # CN or a DNS SAN), so no CN can pose as a subject.
            if not any((n == peer.subject) if "=" in n else (n in peer.names) for n in self.names):
                return f"certificate {peer.subject!r} is not allowed"
        return None


ALLOW_ALL = AccessList()
