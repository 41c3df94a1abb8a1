"""Server credentials: TLS with a certificate and key, mutual TLS with a client CA."""

from __future__ import annotations

from pathlib import Path

import grpc

from serving.api.config import ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """None for plaintext; with a client CA every client must present a certificate."""
    if not config.tls_cert:
        return None
    chain = Path(config.tls_cert).read_bytes()
    key = Path(config.tls_key).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)
