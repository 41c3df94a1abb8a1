"""Deployment mode: a real SuperLink and 2 SuperNodes on 127.0.0.1 with TLS and SuperNode
authentication, driven by ``flwr run federated`` for 2 rounds.

Certificates (a CA and a server certificate for 127.0.0.1) and the SuperNodes' P-384 keys are
generated here with ``cryptography``; the nodes' public keys are registered with
``flwr supernode register`` before they connect.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls(out: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "adapterhub-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = out / "ca.crt", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem(key))
    return paths


def make_node_keys(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (what flower-supernode reads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on {port}")


@pytest.mark.slow
def test_superlink_and_two_supernodes_with_tls_and_node_auth(tmp_path, tiny_llama):
    ca, cert, key = make_tls(tmp_path)
    # flwr 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port.
    port = _free_port()
    # The SuperLink and SuperNodes spawn flower-superexec and the app processes by name.
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PYTHONPATH": str(ROOT),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path,
                                      stdout=out, stderr=subprocess.STDOUT))

    try:
        start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca),
              "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth",
              "--host", "127.0.0.1", "--port", str(port),
              "--database", str(tmp_path / "link.db"))
        _wait_port(port)
        for i in range(2):
            private, public = make_node_keys(tmp_path, f"node{i}")
            subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public), "test"],
                           env=env, cwd=tmp_path, check=True, timeout=120)
            start(f"supernode{i}", "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                  "--root-certificates", str(ca),
                  "--auth-supernode-private-key", str(private),
                  "--auth-supernode-public-key", str(public),
                  "--port", str(_free_port()),
                  "--node-config", f"partition-id={i} num-partitions=2")
        run_config = (f"base-model='{tiny_llama}' data-dir='{tmp_path / 'data'}' num-rounds=2 "
                      "local-steps=3 batch-size=4 partition-size=24 client-eval-limit=4 "
                      "eval-limit=8 max-new-tokens=8 round-timeout=300.0")
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "federated"), "test", "--stream",
             "--run-config", run_config],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        from adapterhub.registry import Registry

        version = Registry(tmp_path / "data").resolve_version("federated-adapter/1")
        history = Registry(tmp_path / "data").client.get_metric_history(version.run_id,
                                                                        "clients")
        assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 2.0)]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
