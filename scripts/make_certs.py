"""Make a private CA and the server and client certificates gradmix needs for TLS.

    python scripts/make_certs.py OUT_DIR [--host NAME ...] [--days N]

writes `ca.pem` (the CA certificate clients trust), `server.pem` /
`server-key.pem` (the server's, valid for localhost, 127.0.0.1 and every
--host) and `client.pem` / `client-key.pem` (a client certificate for mutual
TLS) into OUT_DIR. Keys are ECDSA P-256, written with mode 0600. For
development, tests and the dev overlay; production certificates come from your
own CA (e.g. cert-manager) into the same Kubernetes secret.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPaths:
    """Where `make_certs` wrote each file."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
           issuer_key: ec.EllipticCurvePrivateKey, days: int,
           usage: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out_dir: str | Path, hosts: Sequence[str] = (), days: int = 365,
               client_name: str = "gradmix-client") -> CertPaths:
    """Write a CA, a server certificate for localhost/127.0.0.1/`hosts` and a client one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("gradmix CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = CertPaths(out / "ca.pem", out / "server.pem", out / "server-key.pem",
                      out / "client.pem", out / "client-key.pem")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    names = ["localhost", "127.0.0.1", *hosts]
    for cert_path, key_path, subject, usage, sans in (
        (paths.server_cert, paths.server_key, "gradmix-server", ExtendedKeyUsageOID.SERVER_AUTH,
         [_general_name(h) for h in dict.fromkeys(names)]),
        (paths.client_cert, paths.client_key, client_name, ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(subject, key, ca_name, ca_key, days, usage, sans)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--host", action="append", default=[],
                        help="another DNS name or IP of the server (repeatable)")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    paths = make_certs(args.out_dir, args.host, args.days)
    print(f"wrote {paths.ca}, {paths.server_cert}, {paths.server_key}, "
          f"{paths.client_cert}, {paths.client_key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
