"""Server settings (address, keys, TLS, limits) and the bind-address safety check."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (Server.port tells which)
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> role ("user" | "admin")
    tls_cert: str | Path | None = None  # PEM server certificate chain
    tls_key: str | Path | None = None  # PEM private key
    tls_client_ca: str | Path | None = None  # PEM CA: when set, clients must present a cert
    max_workers: int = 32  # each open stream holds one worker thread
    max_concurrent_rpcs: int | None = 256  # beyond this gRPC answers RESOURCE_EXHAUSTED
    max_message_bytes: int = 4 * 2**20
    metrics_port: int = 0  # Prometheus over HTTP on 127.0.0.1; 0 = off
    metrics_host: str = "127.0.0.1"
    grace_s: float = 10.0  # how long stop() waits for in-flight requests
    # Inference requests may name a local adapter directory only when this is set: a path
    # makes the server read files, which an inference-only key should not be able to ask.
    allow_path_refs: bool = False
    max_stop_chars: int = 256
    base_model: str | None = None  # the checkpoint fine-tune jobs must use (None = any)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(config: ServerConfig) -> None:
    """Refuse to expose an unauthenticated server beyond this machine."""
    if not config.api_keys and not is_loopback(config.host):
        raise ValueError(
            f"refusing to listen on {config.host!r} without API keys: anyone who can reach it "
            "could run inference and fine-tune jobs; configure keys (--api-keys-file or "
            "ADAPTERHUB_API_KEYS) or bind 127.0.0.1")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("mutual TLS (--tls-client-ca) needs a server certificate and key")
