"""Access lists and peer identities (no sockets)."""

from __future__ import annotations

import ipaddress

import pytest

from nbdcache import tls

CERT = {
    "subject": ((("organizationName", "acme"),), (("commonName", "host1"),)),
    "subjectAltName": (("DNS", "host1.example.com"), ("IP Address", "10.0.0.1")),
}


def peer(address: str | None, cert: dict[str, object] | None = CERT) -> tls.Peer:
    return tls.Peer.from_cert(tls.parse_address(address), cert)


def test_identity_from_a_certificate() -> None:
    p = peer("10.1.2.3")
    assert p.subject == "O=acme,CN=host1"
    assert p.names == {"host1", "host1.example.com"}
    assert "certificate 'O=acme,CN=host1'" in p.describe()
    assert peer("10.1.2.3", None).describe() == "10.1.2.3, no certificate"


@pytest.mark.parametrize("name", ["host1", "host1.example.com", "O=acme,CN=host1"])
def test_names_match_cn_dns_san_or_subject(name: str) -> None:
    assert tls.AccessList.build([name], []).refusal(peer("10.0.0.1")) is None


def test_other_names_and_missing_certificates_are_refused() -> None:
    acl = tls.AccessList.build(["host2"], [])
    assert "is not allowed" in (acl.refusal(peer("10.0.0.1")) or "")
    assert "certificate is required" in (acl.refusal(peer("10.0.0.1", None)) or "")


def test_networks_match_v4_v6_and_mapped_addresses() -> None:
    acl = tls.AccessList.build([], ["10.0.0.0/8", "::1"])
    assert acl.refusal(peer("10.9.9.9", None)) is None
    assert acl.refusal(peer("::1", None)) is None
    assert acl.refusal(peer("::ffff:10.1.1.1", None)) is None
    assert "not in the allowed networks" in (acl.refusal(peer("192.168.0.1", None)) or "")
    assert acl.refusal(peer(None, None)) is None  # Unix socket: not address-bound
    assert tls.parse_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")


def test_empty_list_allows_everyone() -> None:
    assert tls.ALLOW_ALL.refusal(peer("192.0.2.1", None)) is None
    assert not tls.ALLOW_ALL.needs_certificate


def test_a_certificate_cannot_pose_as_another_subject() -> None:
    acl = tls.AccessList.build(["O=acme,CN=admin"], [])
    legit = {"subject": ((("organizationName", "acme"),), (("commonName", "admin"),))}
    assert acl.refusal(peer("10.0.0.1", legit)) is None
    forged = [
        {"subject": ((("commonName", "O=acme,CN=admin"),),)},  # one CN, separators in it
        {"subject": ((("organizationName", "acme,CN=admin"),),)},
        {"subject": ((("organizationName", "acme"), ("commonName", "admin")),)},  # one RDN
    ]
    for cert in forged:
        assert "is not allowed" in (acl.refusal(peer("10.0.0.1", cert)) or "")


def test_a_certificate_with_two_cns_matches_neither() -> None:
    cert = {"subject": ((("commonName", "mallory"),), (("commonName", "alice"),))}
    assert "is not allowed" in (
        tls.AccessList.build(["alice"], []).refusal(peer("10.0.0.1", cert)) or ""
    )
