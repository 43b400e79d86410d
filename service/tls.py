"""TLS for the gRPC port (and optionally /metrics): server credentials whose certificate is re-read when its
files change or on SIGHUP, without dropping connections; mutual TLS when a client CA is configured."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

import grpc

from service.config import TLSConfig

_LOGGER = logging.getLogger(__name__)


class CertificateFiles:
    """The server's certificate files. `fetch()` is gRPC's certificate fetcher: gRPC calls it (on one of its own
    threads) before each new handshake, and it returns a new configuration only when the files changed or a
    reload was asked for. Established connections keep the certificate they started with."""

    def __init__(self, config: TLSConfig):
        self.config = config
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._forced = False
        self._listeners: list = []

    def _files(self) -> list[str]:
        return [p for p in (self.config.cert, self.config.key, self.config.client_ca) if p]

    def _current_stamp(self) -> tuple:
        stats = [os.stat(p) for p in self._files()]
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files: a certificate that does not match its key (say, a rotation half written)
        raises instead of breaking every handshake."""
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.config.cert, self.config.key)
        with open(self.config.cert, "rb") as f:
            cert = f.read()
        with open(self.config.key, "rb") as f:
            key = f.read()
        client_ca = None
        if self.config.client_ca:
            with open(self.config.client_ca, "rb") as f:
                client_ca = f.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            self._stamp = self._current_stamp()
            return self.load()

    def request_reload(self) -> None:
        """SIGHUP: re-read the files at the next handshake even if they look unchanged."""
        with self._lock:
            self._forced = True
        for listener in self._listeners:
            listener()

    def on_reload_request(self, listener) -> None:
        self._listeners.append(listener)

    def changed(self) -> tuple | None:
        """The files' new stamp when they changed (or a reload was asked for), else None."""
        try:
            stamp = self._current_stamp()
        except OSError:
            return None  # mid-rotation: keep the current certificate
        if stamp == self._stamp and not self._forced:
            return None
        return stamp

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self.changed()
            if stamp is None:
                return None
            self._forced = False
            try:
                configuration = self.load()
            except (OSError, ssl.SSLError, ValueError) as exc:
                _LOGGER.warning("TLS: the certificate files changed but do not load (%s); keeping the current one", exc)
                return None
            self._stamp = stamp
        _LOGGER.info("TLS: certificate reloaded from %s", self.config.cert)
        for listener in self._listeners:
            listener()
        return configuration

    def server_credentials(self) -> grpc.ServerCredentials:
        # gRPC's fetcher may return None for "unchanged" (its stubs say otherwise).
        fetcher: Any = self.fetch
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), fetcher, require_client_authentication=bool(self.config.client_ca)
        )


def metrics_ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    """An SSL context for /metrics with the same certificate, re-read on SIGHUP and whenever the gRPC side
    reloads it (no client certificate is asked for; the metrics port binds to loopback by default)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.config.cert, files.config.key)

    def reload() -> None:
        try:
            context.load_cert_chain(files.config.cert, files.config.key)
        except (OSError, ssl.SSLError) as exc:
            _LOGGER.warning("TLS: /metrics keeps its certificate: %s", exc)

    files.on_reload_request(reload)
    return context
