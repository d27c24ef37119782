"""Throwaway X.509 certificates for TLS tests, made with the openssl CLI.

Nothing here is committed as a secret: each test run creates its own CAs
and certificates in a temporary directory.  Client credentials are laid out
the way libnbd (``tls-certificates=DIR``) and qemu (``tls-creds-x509``
``dir=DIR``) both expect: ``ca-cert.pem``, ``client-cert.pem`` and
``client-key.pem`` in one directory.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path), cwd=path.parent)  # fmt: skip


@dataclass(frozen=True)
class CA:
    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "ca-key.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "nbdcache test CA") -> CA:
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls(directory)
        _key(ca.key)
        _openssl(
            "req", "-x509", "-new", "-key", str(ca.key), "-out", str(ca.cert),
            "-days", DAYS, "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip
        return ca

    def issue(self, directory: Path, stem: str, cn: str, *, server: bool) -> tuple[Path, Path]:
        """A certificate for `cn` signed by this CA: (cert, key) in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        key, csr, cert = (directory / f"{stem}-{s}.pem" for s in ("key", "csr", "cert"))
        _key(key)
        _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=nbdcache/CN={cn}",
                 cwd=directory)  # fmt: skip
        ext = directory / f"{stem}.ext"
        if server:
            ext.write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\n"
                f"subjectAltName=DNS:{cn},IP:127.0.0.1,IP:::1\n"
            )
        else:
            ext.write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=clientAuth\n"
                f"subjectAltName=DNS:{cn}.clients.test\n"
            )
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-CAcreateserial", "-out", str(cert), "-days", DAYS, "-extfile", str(ext),
            cwd=directory,
        )  # fmt: skip
        csr.unlink()
        return cert, key

    def client_dir(self, directory: Path, cn: str, *, trust: CA | None = None) -> Path:
        """A client credentials directory for `cn`, trusting `trust` (default: us)."""
        self.issue(directory, "client", cn, server=False)
        shutil.copy((trust or self).cert, directory / "ca-cert.pem")
        return directory


@dataclass(frozen=True)
class PKI:
    """A CA, a server certificate for localhost, and client directories."""

    root: Path
    ca: CA
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, root: Path) -> PKI:
        ca = CA.create(root / "ca")
        cert, key = ca.issue(root / "server", "server", "localhost", server=True)
        return cls(root, ca, cert, key)

    def client(self, cn: str) -> Path:
        return self.ca.client_dir(self.root / f"client-{cn}", cn)

    def anonymous_client(self) -> Path:
        """Trusts our CA but has no client certificate."""
        directory = self.root / "client-anonymous"
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.ca.cert, directory / "ca-cert.pem")
        return directory

    def server_args(self, mode: str = "require", *, ca: bool = True) -> list[str]:
        args = ["--tls", mode, "--tls-cert", str(self.server_cert)]
        args += ["--tls-key", str(self.server_key)]
        if ca:
            args += ["--tls-ca", str(self.ca.cert)]
        return args
