"""API keys and roles, TLS and mutual TLS, and the refusal to expose a keyless server."""

from __future__ import annotations

import datetime
import ipaddress
from argparse import Namespace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from adapterhub.v1 import adapters_pb2, finetune_pb2
from serving.api import Server, ServerConfig
from serving.api.auth import load_api_keys
from serving.api.config import check_bind
from tests.test_server_support import client, code_of, make_engine, request, serving

S = grpc.StatusCode
KEYS = {"user-key": "user", "admin-key": "admin"}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


def _meta(key: str, bearer: bool = True) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] if bearer else [("x-api-key", key)]


def test_api_keys_and_roles(engine):
    with serving(engine, api_keys=KEYS) as srv, client(srv) as c:
        gen = c.inference.Generate
        assert code_of(gen, request()) == S.UNAUTHENTICATED
        assert code_of(gen, request(), metadata=_meta("wrong")) == S.UNAUTHENTICATED
        assert code_of(gen, request(), metadata=[("authorization", "user-key")]) == \
            S.UNAUTHENTICATED  # no "Bearer "
        assert code_of(lambda: list(c.inference.GenerateStream(request()))) == S.UNAUTHENTICATED
        assert code_of(gen, request(), metadata=_meta("user-key")) == S.OK
        assert code_of(gen, request(), metadata=_meta("user-key", bearer=False)) == S.OK
        assert code_of(lambda: list(c.inference.GenerateStream(
            request(), metadata=_meta("user-key")))) == S.OK
        assert code_of(c.adapters.List, adapters_pb2.ListAdaptersRequest(),
                       metadata=_meta("user-key")) == S.OK
        load = adapters_pb2.LoadAdapterRequest(name="x", source="nope")
        assert code_of(c.adapters.Load, load, metadata=_meta("user-key")) == \
            S.PERMISSION_DENIED
        assert code_of(c.adapters.Unload, adapters_pb2.UnloadAdapterRequest(name="x"),
                       metadata=_meta("user-key")) == S.PERMISSION_DENIED
        assert code_of(c.jobs.Submit, finetune_pb2.SubmitJobRequest(),
                       metadata=_meta("user-key")) == S.PERMISSION_DENIED
        # An admin passes the key check and reaches the servicer's own validation.
        assert code_of(c.adapters.Load, load, metadata=_meta("admin-key")) == S.NOT_FOUND
        assert code_of(gen, request(), metadata=_meta("admin-key", bearer=False)) == S.OK
        # Probes and tools need no key.
        health = health_pb2_grpc.HealthStub(c.channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert "adapterhub.v1.InferenceService" in \
            ProtoReflectionDescriptorDatabase(c.channel).get_services()


def test_key_files_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n\nplain\nops-key:admin\nreader:user\n")
    assert load_api_keys(f, env="envkey:admin, other") == {
        "plain": "user", "ops-key": "admin", "reader": "user", "envkey": "admin", "other": "user"}
    f.write_text("k:root\n")
    with pytest.raises(ValueError, match="role"):
        load_api_keys(f, env="")
    with pytest.raises(ValueError, match="role"):
        load_api_keys(None, env="a:admni")


def test_non_loopback_bind_needs_keys(tiny_llama, tmp_path):
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ValueError, match="without API keys"):
            check_bind(ServerConfig(host=host))
        check_bind(ServerConfig(host=host, api_keys=KEYS))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        check_bind(ServerConfig(host=host))
    with pytest.raises(ValueError, match="without API keys"):
        Server(None, config=ServerConfig(host="0.0.0.0", port=0), backend=object())
    # The CLI refuses before it loads anything.
    from serving.cli import run_server

    args = Namespace(data_dir=str(tmp_path), model=str(tiny_llama), host="0.0.0.0", port=0,
                     api_keys_file=None, tls_cert=None, tls_key=None, tls_client_ca=None,
                     workers=4, metrics_port=0, grace=1.0, allow_path_refs=False)
    with pytest.raises(ValueError, match="without API keys"):
        run_server(args)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path | bytes]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, "test-ca", ca_key, ca=False, sans=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = _cert("client", cli_key, "test-ca", ca_key, ca=False)
    out: dict[str, Path | bytes] = {}
    for name, obj in (("ca", ca), ("server", srv), ("server_key", srv_key)):
        (d / f"{name}.pem").write_bytes(_pem(obj))
        out[name] = d / f"{name}.pem"
    out.update(ca_pem=_pem(ca), client=_pem(cli), client_key=_pem(cli_key))
    return out


def test_tls_and_mutual_tls(engine, pki):
    tls = dict(tls_cert=pki["server"], tls_key=pki["server_key"])
    trust = grpc.ssl_channel_credentials(root_certificates=pki["ca_pem"])
    with serving(engine, **tls) as srv:
        with client(srv, trust) as c:
            assert c.inference.Generate(request(), timeout=30).usage.completion_tokens == 8
        with client(srv) as plain:  # plaintext against a TLS port fails the handshake
            assert code_of(plain.inference.Generate, request(), timeout=3) == S.UNAVAILABLE
    with serving(engine, tls_client_ca=pki["ca"], **tls) as srv:
        with client(srv, trust) as anon:  # no client certificate
            assert code_of(anon.inference.Generate, request(), timeout=3) == S.UNAVAILABLE
        mutual = grpc.ssl_channel_credentials(root_certificates=pki["ca_pem"],
                                              private_key=pki["client_key"],
                                              certificate_chain=pki["client"])
        with client(srv, mutual) as c:
            assert c.inference.Generate(request(), timeout=30).usage.completion_tokens == 8
    with pytest.raises(ValueError, match="key"):
        check_bind(ServerConfig(tls_cert=pki["server"]))
