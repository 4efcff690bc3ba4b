"""The server's TLS certificate files, re-read when they change: rotation without a restart.

`CertificateFiles` holds the paths of the private key, the certificate chain
and (mutual TLS) the client CA. The gRPC port's credentials are
`grpc.dynamic_ssl_server_credentials` with `fetch` as the fetcher, which gRPC
calls before every new connection's handshake: at most once per
`RELOAD_CHECK_SECONDS` it stats the files and, when one changed, reads them
all, checks that the key belongs to the certificate (Python's `ssl` loads the
pair), and hands gRPC the new configuration. Connections already open keep
the certificate they shook hands with; new ones get the new one.

A pair that does not load (a rotation written half-way, a bad file) keeps the
previous certificate in force and logs why once per change, so a bad copy
never takes the port down. Kubernetes replaces a mounted Secret's files in
one step (a symlink swap), so both files change together.

The HTTPS /metrics endpoint reloads the same files into its `ssl.SSLContext`
(`MetricsEndpoint.watch_certificates`).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time

import grpc

log = logging.getLogger(__name__)

#: The files are looked at (stat) at most this often.
RELOAD_CHECK_SECONDS = 1.0

#: What identifies a file's content without reading it: (mtime ns, size, inode).
Stamp = tuple[int, int, int]


class CertificateError(Exception):
    """The certificate files cannot be read or do not make a key pair."""


class CertificateFiles:
    """The key, certificate chain and optional client CA of a TLS port, kept current.

    Raises:
        CertificateError: (at construction) the files cannot be read or the key
            does not belong to the certificate.
    """

    def __init__(self, key: str, cert: str, client_ca: str = "") -> None:
        self.key, self.cert, self.client_ca = key, cert, client_ca
        self._lock = threading.Lock()
        self._checked = 0.0
        #: The stamps of files that did not load (not tried again until they change).
        self._rejected: tuple[Stamp, ...] | None = None
        self._stamps, self._pem = self._load()
        #: Counts the loads (1: the one at start-up); `fetch` hands gRPC each new one.
        self.generation = 1
        self._fetched = 1

    @property
    def paths(self) -> list[str]:
        return [p for p in (self.key, self.cert, self.client_ca) if p]

    def _stat(self) -> tuple[Stamp, ...]:
        stamps = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise CertificateError(f"cannot read {path}: {exc}") from exc
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _load(self) -> tuple[tuple[Stamp, ...], tuple[bytes, bytes, bytes | None]]:
        """(stamps, (key, cert, client CA)) read now, the pair checked with `ssl`."""
        stamps = self._stat()
        try:
            pem = [open(path, "rb").read() for path in (self.key, self.cert)]  # noqa: SIM115
            ca = open(self.client_ca, "rb").read() if self.client_ca else None  # noqa: SIM115
        except OSError as exc:
            raise CertificateError(f"cannot read a certificate file: {exc}") from exc
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.cert, self.key)
            if self.client_ca:
                ssl.create_default_context(cafile=self.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(
                f"certificate {self.cert} and key {self.key}"
                + (f" (client CA {self.client_ca})" if self.client_ca else "")
                + f" do not load: {exc}") from exc
        return stamps, (pem[0], pem[1], ca)

    def refresh(self, now: float | None = None) -> bool:
        """Re-read the files if one changed (checked at most once per
        `RELOAD_CHECK_SECONDS`); whether a new certificate was loaded."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return False
            self._checked = now
            try:
                stamps = self._stat()
                if stamps in (self._stamps, self._rejected):
                    return False
                self._stamps, self._pem = self._load()
            except CertificateError as exc:
                rejected = self._safe_stat()
                if rejected is None or rejected != self._rejected:  # log once per change
                    log.error("TLS certificate not reloaded, the previous one stays in "
                              "force: %s", exc)
                self._rejected = rejected
                return False
            self._rejected = None
            self.generation += 1
            log.warning("TLS certificate reloaded from %s (load %d); new connections use it",
                        self.cert, self.generation)
            return True

    def _safe_stat(self) -> tuple[Stamp, ...] | None:
        try:
            return self._stat()
        except CertificateError:
            return None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The current files as a gRPC certificate configuration."""
        key, cert, ca = self._pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher (called before each new connection's handshake): the new
        configuration when the files changed since the last one handed over, else None."""
        self.refresh()
        with self._lock:
            if self.generation == self._fetched:
                return None
            self._fetched = self.generation
        return self.configuration()

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of a gRPC port that follow the files (client certificates
        required when a client CA is set)."""
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(), self.fetch,
            require_client_authentication=bool(self.client_ca))
