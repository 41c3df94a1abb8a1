"""The Helm chart (helm/adapterhub) renders, lints, and produces manifests a cluster accepts.

No cluster is needed: a real helm binary renders and lints the chart (tests/helm_tools.py),
kubernetes-validate checks core manifests against the Kubernetes OpenAPI schemas, and the
RayService is checked against the KubeRay v1.7.0 CRD's structure (a trimmed copy in
tests/kuberay_rayservice_schema.json) with unknown fields refused, as strict field
validation would. The values schema must refuse misspelt, mistyped and out-of-enum values.

The public gRPC API is the Serve application's own GrpcIngress (build_app's grpc_* args) on
the Ray head pod, reached through KubeRay's head service: there is no API Deployment.
"""

from __future__ import annotations

import base64
import configparser
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helm_tools import CHART, KUBE_VERSION, Helm, HelmUnavailable, by_kind, helm_binary, one

ROOT = CHART.parent.parent
GPU_VALUES = CHART / "examples" / "values-gpu.yaml"
CRD_FIXTURE = Path(__file__).with_name("kuberay_rayservice_schema.json")
FULLNAME = "hub-adapterhub"  # release "hub" (helm_tools default) + chart name
HEAD_SVC = f"{FULLNAME}-head-svc"  # KubeRay's head service of the RayService


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = helm_binary()
    except HelmUnavailable as exc:
        pytest.skip(f"no helm binary: {exc}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip extra 'test')")


@pytest.fixture(scope="module")
def rendered(helm: Helm) -> dict[str, list[dict]]:
    return {"default": helm.render(), "gpu": helm.render([GPU_VALUES])}


VARIANTS = {"default": [], "gpu": [GPU_VALUES]}


# --- lint and render ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict_passes(helm: Helm, variant: str):
    proc = helm.lint(VARIANTS[variant])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_every_component(rendered, variant: str):
    docs = rendered[variant]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [("RayService", FULLNAME), ("Deployment", f"{FULLNAME}-mlflow"),
                     ("Service", f"{FULLNAME}-mlflow"), ("Deployment", f"{FULLNAME}-superlink"),
                     ("Service", f"{FULLNAME}-superlink")]:
        assert expected in names, f"{expected} missing from {sorted(names)}"
    # The API runs inside the Serve application; KubeRay owns the service that carries it.
    assert not any("-api" in n for k, n in names if k in ("Deployment", "Service")), names
    # The GPU example brings its own Secrets and stores; the default generates and keeps.
    secrets = {n for k, n in names if k == "Secret"}
    if variant == "default":
        assert secrets == {f"{FULLNAME}-api-keys", f"{FULLNAME}-mlflow-auth",
                           f"{FULLNAME}-superlink-tls"}
        assert len(by_kind(docs, "PersistentVolumeClaim")) == 2
        assert not by_kind(docs, "Ingress")
    else:
        assert secrets == set()
        pvcs = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}
        # MLflow uses PostgreSQL + S3 instead of a volume; the job queue gets a shared one.
        assert pvcs == {f"{FULLNAME}-superlink", f"{FULLNAME}-shared"}
        shared = one(docs, "PersistentVolumeClaim", "-shared")["spec"]
        assert shared["accessModes"] == ["ReadWriteMany"]
        assert one(docs, "Ingress")["spec"]["rules"][0]["host"] == "adapterhub.example.com"


# --- offline validation ------------------------------------------------------------------

def _pods_of_rayservice(rs: dict) -> list[dict]:
    """The RayService's pod templates as Pods, so the Kubernetes Pod schema checks them."""
    cfg = rs["spec"]["rayClusterConfig"]
    templates = [cfg["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cfg["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{rs['metadata']['name']}-{i}", **t.get("metadata", {})},
             "spec": t["spec"]} for i, t in enumerate(templates)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_core_manifests_validate_strictly(rendered, kubernetes_validate, variant: str):
    docs = rendered[variant]
    core = [d for d in docs if d["kind"] != "RayService"]
    core += _pods_of_rayservice(one(docs, "RayService"))
    assert len(core) >= 10
    for doc in core:
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


def test_kubernetes_validate_catches_a_broken_manifest(rendered, kubernetes_validate):
    # The check above can fail: a misspelt container field is refused in strict mode.
    pod = _pods_of_rayservice(one(rendered["default"], "RayService"))[0]
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)


def _closed(schema: dict) -> dict:
    """The CRD schema with unknown fields refused wherever it lists the known ones."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            schema[key] = _closed(schema[key])
    return schema


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft7Validator:
    fixture = json.loads(CRD_FIXTURE.read_text())
    assert fixture["apiVersion"] == "ray.io/v1" and fixture["kind"] == "RayService"
    return jsonschema.Draft7Validator(_closed(fixture["schema"]))


def _crd_errors(validator: jsonschema.Draft7Validator, rs: dict) -> list[str]:
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message
            for e in validator.iter_errors(rs)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayservice_matches_kuberay_crd(rendered, rayservice_validator, variant: str):
    rs = one(rendered[variant], "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert _crd_errors(rayservice_validator, rs) == []
    # KubeRay finds the Serve ports by name ("serve", "serve-*") for its serve service.
    cfg = rs["spec"]["rayClusterConfig"]
    for spec in [cfg["headGroupSpec"], *cfg["workerGroupSpecs"]]:
        ports = {p["name"] for p in spec["template"]["spec"]["containers"][0]["ports"]}
        assert {"serve", "serve-grpc"} <= ports
    head_ports = {p["name"]: p["containerPort"]
                  for p in cfg["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {"gcs-server", "dashboard", "client"} <= set(head_ports)
    # KubeRay puts every named head container port on <name>-head-svc: the API's among them.
    assert head_ports["grpc"] == 50051 and len(set(head_ports.values())) == len(head_ports)


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: c["workerGroupSpecs"][0].pop("maxReplicas"), "'maxReplicas' is a required"),
    (lambda c: c["headGroupSpec"].pop("template"), "'template' is a required"),
    (lambda c: c["headGroupSpec"].__setitem__("rayStartParam", {}), "rayStartParam"),
    (lambda c: c["headGroupSpec"]["rayStartParams"].__setitem__("num-gpus", 1), "not of type"),
])
def test_crd_check_catches_broken_rayservices(rendered, rayservice_validator, breakage, expected):
    rs = json.loads(json.dumps(one(rendered["default"], "RayService")))
    breakage(rs["spec"]["rayClusterConfig"])
    errors = _crd_errors(rayservice_validator, rs)
    assert any(expected in e for e in errors), errors


# --- the Serve application and the wiring between components -----------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_config_is_a_valid_ray_serve_config(rendered, variant: str):
    from ray.serve.schema import ServeDeploySchema

    rs = one(rendered[variant], "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy` configs
    (app,) = config["applications"]
    assert app["import_path"] == "serving.cluster.app:build_app"
    assert app["args"]["tracking_uri"] == f"http://{FULLNAME}-mlflow:5000"
    gpus = 1 if variant == "gpu" else 0
    assert app["args"]["num_gpus"] == gpus
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits.get("nvidia.com/gpu", 0) == gpus
    if variant == "gpu":
        assert app["args"]["num_replicas"] == 2 and app["args"]["max_adapters"] == 256
        assert worker["containers"][0]["image"].endswith(":0.1.0-cuda")
        assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_serve_extra_args_pass_through_without_overriding(helm: Helm):
    docs = helm.render(sets=["serve.extraArgs.pool_mb=4096", "serve.extraArgs.num_gpus=7"])
    args = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0][
        "args"]
    assert args["pool_mb"] == 4096
    assert args["num_gpus"] == 0  # the named value wins over an extraArgs duplicate


def _container(docs: list[dict], name: str) -> dict:
    return one(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _app_args(docs: list[dict]) -> dict:
    config = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    return config["applications"][0]["args"]


def _head_pod(docs: list[dict]) -> dict:
    cfg = one(docs, "RayService")["spec"]["rayClusterConfig"]
    return cfg["headGroupSpec"]["template"]["spec"]


def _secret_behind(pod: dict, path: str) -> tuple[str, dict]:
    """(file name inside the mount, the Secret volume) that the pod serves ``path`` from."""
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return path.removeprefix(mount["mountPath"] + "/"), volume["secret"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_is_the_apps_grpc_ingress_on_the_head(rendered, variant: str):
    docs = rendered[variant]
    args = _app_args(docs)
    assert args["grpc_port"] == 50051 and args["grpc_host"] == "0.0.0.0"
    assert args["ingress_on_head"] is True  # the head service is the only way in
    head = _head_pod(docs)
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert ports["grpc"] == args["grpc_port"]
    # The key file the ingress reads is the API-keys Secret, mounted on the head pod.
    name, secret = _secret_behind(head, args["api_keys_file"])
    expected = "adapterhub-api-keys" if variant == "gpu" else f"{FULLNAME}-api-keys"
    assert secret["secretName"] == expected
    assert secret["items"] == [{"key": "api-keys", "path": name}]
    if variant == "gpu":  # TLS from the named kubernetes.io/tls Secret
        for arg, file in (("tls_cert", "tls.crt"), ("tls_key", "tls.key")):
            name, secret = _secret_behind(head, args[arg])
            assert (name, secret["secretName"]) == (file, "adapterhub-api-tls")
        ingress = one(docs, "Ingress")
        assert ingress["metadata"]["annotations"][
            "nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": HEAD_SVC, "port": {"name": "grpc"}}
    else:
        assert "tls_cert" not in args and "tls_key" not in args
        assert "api-tls" not in {v["name"] for v in head["volumes"]}
    # The engines do not need the API's secrets.
    cfg = one(docs, "RayService")["spec"]["rayClusterConfig"]
    worker = cfg["workerGroupSpecs"][0]["template"]["spec"]
    assert {v["name"] for v in worker["volumes"]} & {"api-keys", "api-tls"} == set()


def test_api_args_win_over_extra_args_and_tls_needs_a_secret(helm: Helm):
    docs = helm.render(sets=["serve.extraArgs.grpc_port=1234", "serve.extraArgs.grpc_host=x",
                             "serve.extraArgs.ingress_on_head=false", "api.port=50100"])
    args = _app_args(docs)
    assert (args["grpc_port"], args["grpc_host"], args["ingress_on_head"]) == (
        50100, "0.0.0.0", True)
    ports = {p["name"]: p["containerPort"] for p in _head_pod(docs)["containers"][0]["ports"]}
    assert ports["grpc"] == 50100
    proc = helm.template(sets=["api.tls.enabled=true"])
    assert proc.returncode != 0
    assert "api.tls.secretName is required when api.tls.enabled" in proc.stderr
    proc = helm.template(sets=["api.port=10001"])  # Ray Client's port on the same pod
    assert proc.returncode != 0 and "api.port 10001 is taken by ray.ports.client" in proc.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_fine_tune_jobs_need_the_shared_volume(rendered, variant: str):
    docs = rendered[variant]
    rs = one(docs, "RayService")
    app_args = _app_args(docs)
    cfg = rs["spec"]["rayClusterConfig"]
    # The API (on the head) and the replicas (on the workers) share the job queue.
    pods = [cfg["headGroupSpec"]["template"]["spec"],
            cfg["workerGroupSpecs"][0]["template"]["spec"]]
    if variant == "gpu":  # sharedStorage.enabled: one RWX claim at /shared everywhere
        assert app_args["data_dir"] == "/shared" and "finetune" not in app_args
        for pod in pods:
            claim = {v["name"]: v for v in pod["volumes"]}["shared"]["persistentVolumeClaim"]
            assert claim["claimName"] == f"{FULLNAME}-shared"
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["shared"] == "/shared"
    else:  # no shared queue: replicas take no jobs and the API refuses them
        assert app_args["finetune"] is False and "data_dir" not in app_args
        assert all("shared" not in {v["name"] for v in pod["volumes"]} for pod in pods)


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_pods_have_an_in_memory_dev_shm(rendered, variant: str):
    # CPU engines share the base weights with the co-serving worker process through
    # /dev/shm; Kubernetes' default of 64Mi would send co-served slices to a helper thread.
    cfg = one(rendered[variant], "RayService")["spec"]["rayClusterConfig"]
    pod = cfg["workerGroupSpecs"][0]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_speaks_the_cluster_modes_interfaces(rendered, variant: str, tmp_path: Path):
    """build_app accepts the Serve args, and its ingress would accept the server they make."""
    pytest.importorskip("serving.cluster.config", reason="cluster mode (serving/cluster) absent")
    from serving.api import ServerConfig
    from serving.api.auth import load_api_keys
    from serving.api.config import check_bind
    from serving.cluster.config import ClusterConfig

    docs = rendered[variant]
    args = _app_args(docs)
    cfg = ClusterConfig.from_args(args)  # what build_app validates with: refuses unknown args
    assert cfg.resolved_device() == ("cuda" if variant == "gpu" else "cpu")
    assert cfg.finetune == (variant == "gpu")
    assert cfg.grpc_port == 50051 and cfg.ingress_on_head
    # GrpcIngress's ServerConfig from these args, with the key file the pod would mount:
    # binding 0.0.0.0 must pass the server's own safety check (keys present, TLS complete).
    if variant == "default":
        key_file = one(docs, "Secret", "-api-keys")["stringData"]["api-keys"]
    else:
        key_file = "a-key-from-the-operators-secret:admin\n"
    (tmp_path / "api-keys").write_text(key_file)
    server_config = ServerConfig(
        host=cfg.grpc_host, port=int(cfg.grpc_port),
        api_keys=load_api_keys(tmp_path / "api-keys", env=""), tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key, tls_client_ca=cfg.tls_client_ca)
    check_bind(server_config)
    assert server_config.api_keys and set(server_config.api_keys.values()) == {"admin"}
    assert bool(server_config.tls_cert) == (variant == "gpu")


def test_generated_api_key_file_has_one_admin_key(rendered):
    secret = one(rendered["default"], "Secret", "-api-keys")["stringData"]
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secret["admin-key"])
    assert secret["api-keys"] == f"{secret['admin-key']}:admin\n"


def test_listed_api_keys_become_the_key_file(helm: Helm):
    docs = helm.render(sets=["apiKeys.keys[0].key=abcdefghijklmnop1",
                             "apiKeys.keys[0].role=admin",
                             "apiKeys.keys[1].key=qrstuvwxyz0123456", "apiKeys.keys[1].role=user"])
    data = one(docs, "Secret", "-api-keys")["stringData"]
    assert data == {"api-keys": "abcdefghijklmnop1:admin\nqrstuvwxyz0123456:user\n"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlflow_secrets_come_from_secrets_not_arguments(rendered, variant: str):
    mlflow = _container(rendered[variant], "-mlflow")
    script = mlflow["args"][0]
    env = _env(mlflow)
    assert "--app-name basic-auth" in script and "--serve-artifacts" in script
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"
    for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[var]["valueFrom"]
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    if variant == "gpu":
        assert backend["valueFrom"]["secretKeyRef"] == {"name": "adapterhub-mlflow-db",
                                                        "key": "uri"}
        assert "--artifacts-destination 's3://adapterhub-artifacts/mlflow'" in script
        assert mlflow["envFrom"] == [{"secretRef": {"name": "adapterhub-s3"}}]
        assert "postgresql" not in json.dumps(rendered[variant])
    else:
        assert backend["value"].startswith("sqlite:////mlflow/")
        assert "--artifacts-destination '/mlflow/artifacts'" in script


def test_mlflow_start_script_is_valid_shell_and_allows_service_hosts(rendered):
    script = _container(rendered["default"], "-mlflow")["args"][0]
    # The last command line, with continuations joined, is `exec mlflow server ...`.
    command = shlex.split(script.split("exec ", 1)[1].replace("\\\n", " "))
    assert command[:2] == ["mlflow", "server"]
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert f"{FULLNAME}-mlflow" in hosts and f"{FULLNAME}-mlflow:*" in hosts
    assert f"{FULLNAME}-mlflow.ai.svc.cluster.local:*" in hosts


def test_mlflow_start_script_writes_the_auth_config_mlflow_reads(rendered, tmp_path: Path):
    # Run the container's script with a stand-in `mlflow` that records what it was given.
    script = _container(rendered["gpu"], "-mlflow")["args"][0]
    fake = tmp_path / "bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$TMPDIR/args"\n'
                    'cp "$MLFLOW_AUTH_CONFIG_PATH" "$TMPDIR/seen.ini"\n')
    fake.chmod(0o755)
    uri = "postgresql://mlflow:p%40ss%25word@db:5432/mlflow"  # percent-encoded password
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path),
           "MLFLOW_BACKEND_STORE_URI": uri, "MLFLOW_AUTH_DEFAULT_PERMISSION": "READ"}
    proc = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["server", "--host", "0.0.0.0"] and "basic-auth" in args
    # MLflow reads the file with configparser.ConfigParser (interpolation on): the URI must
    # come back unchanged, '%' included.
    config = configparser.ConfigParser()
    config.read(tmp_path / "seen.ini")
    assert config["mlflow"]["database_uri"] == uri
    assert config["mlflow"]["default_permission"] == "READ"
    assert not (tmp_path / "seen.ini").stat().st_mode & 0o077  # written under umask 077


def test_external_mlflow_and_no_flower(helm: Helm):
    proc = helm.template(sets=["mlflow.enabled=false"])
    assert proc.returncode != 0 and "mlflow.externalTrackingUri is required" in proc.stderr
    docs = helm.render(sets=["mlflow.enabled=false", "flower.enabled=false",
                             "mlflow.externalTrackingUri=https://mlflow.corp.example"])
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not any("mlflow" in name or "superlink" in name for _, name in kinds), kinds
    env = _env(_head_pod(docs)["containers"][0])  # the API runs on the Ray head
    assert env["ADAPTERHUB_TRACKING_URI"]["value"] == "https://mlflow.corp.example"
    assert "MLFLOW_TRACKING_PASSWORD" not in env  # no chart-managed password to hand out
    app = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["tracking_uri"] == "https://mlflow.corp.example"


def test_mlflow_replicas_need_shared_stores(helm: Helm):
    proc = helm.template(sets=["mlflow.replicas=2"])
    assert proc.returncode != 0
    assert "mlflow.replicas > 1 needs a shared store" in proc.stderr


def test_superlink_tls_certificate_names_its_service(rendered):
    from cryptography import x509

    docs = rendered["default"]
    link = _container(docs, "-superlink")
    args = link["args"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert args[args.index(flag) + 1].startswith("/etc/flower/tls/")
    assert "--insecure" not in args and "--enable-supernode-auth" in args
    data = one(docs, "Secret", "-superlink-tls")["data"]
    cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert f"{FULLNAME}-superlink.ai.svc" in sans.get_values_for_type(x509.DNSName)
    cert.verify_directly_issued_by(ca)
    ports = {p["name"]: p["port"] for p in one(docs, "Service", "-superlink")["spec"]["ports"]}
    assert ports == {"superlink": 9093, "health": 9094}


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_test_hooks_are_runnable_python(rendered, variant: str):
    hooks = [d for d in by_kind(rendered[variant], "Pod")
             if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert {h["metadata"]["name"].removeprefix(f"{FULLNAME}-test-") for h in hooks} == {
        "api-health", "mlflow-health", "superlink-health"}
    for hook in hooks:
        container = hook["spec"]["containers"][0]
        assert container["command"] == ["python", "-c"]
        compile(container["args"][0], hook["metadata"]["name"], "exec")
    # The API's health probe dials KubeRay's head service, port grpc (TLS in the GPU example).
    api = next(h for h in hooks if h["metadata"]["name"].endswith("-api-health"))
    script = api["spec"]["containers"][0]["args"][0]
    tls = variant == "gpu"
    assert f'target, tls = "{HEAD_SVC}:50051", {tls}' in script
    volumes = api["spec"].get("volumes", [])
    assert [v["secret"]["secretName"] for v in volumes] == (["adapterhub-api-tls"] if tls else [])


def test_notes_tell_how_to_reach_the_api_and_the_ui(helm: Helm):
    proc = helm.run("install", "hub", str(CHART), "--dry-run=client", "--namespace", "ai")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{HEAD_SVC} 50051:50051" in notes
    assert f"port-forward svc/{FULLNAME}-mlflow 5000:5000" in notes
    assert "{.data.admin-key}" in notes and "{.data.admin-password}" in notes


# --- the values schema ---------------------------------------------------------------------

SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _objects(node, path="$"):
    if isinstance(node, dict):
        if "properties" in node:
            yield path, node
        for key, value in node.items():
            yield from _objects(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{path}[{i}]")


def test_schema_closes_every_object():
    open_objects = [p for p, o in _objects(SCHEMA) if o.get("additionalProperties") is not False]
    assert open_objects == []


def _overlay(base: dict, extra: dict) -> dict:
    """Helm's merge of a -f values file over the chart's values (maps merge, rest replaces)."""
    out = dict(base)
    for key, value in extra.items():
        both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _overlay(base[key], value) if both_maps else value
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_values_satisfy_the_schema(variant: str):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for overlay in VARIANTS[variant]:
        values = _overlay(values, yaml.safe_load(overlay.read_text()))
    jsonschema.Draft7Validator(SCHEMA).validate(values)


@pytest.mark.parametrize("setting, complaint", [
    # misspelt key, and a key the chart does not have
    ("ray.wroker.gpus=1", "at '/ray': additional properties 'wroker' not allowed"),
    ("replicaCount=3", "additional properties 'replicaCount' not allowed"),
    # wrong types (KubeRay wants rayStartParams as strings)
    ("ray.worker.gpus=one", "at '/ray/worker/gpus': got string, want integer"),
    ("ray.worker.shmSize=lots", "at '/ray/worker/shmSize': 'lots' does not match"),
    ("ray.head.rayStartParams.num-gpus=1", "at '/ray/head/rayStartParams/num-gpus': got number"),
    # out of range / not in the enum
    ("api.port=70000", "at '/api/port': maximum"),
    # settings of the former API Deployment are refused, not silently ignored
    ("api.replicas=2", "at '/api': additional properties 'replicas' not allowed"),
    ("api.rayAddress=ray://x:10001", "at '/api': additional properties 'rayAddress' not"),
    ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
    ("mlflow.auth.defaultPermission=WRITE", "at '/mlflow/auth/defaultPermission': value must"),
    ("apiKeys.keys[0].key=short", "at '/apiKeys/keys/0/key': minLength"),
])
def test_schema_rejects_bad_values(helm: Helm, setting: str, complaint: str):
    proc = helm.template(sets=[setting])
    assert proc.returncode != 0, f"{setting} was accepted"
    assert "don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert complaint in proc.stderr, proc.stderr


# --- the images ----------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_run_non_root_from_the_lock(dockerfile: str):
    text = (ROOT / "docker" / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] == "10001:10001"  # numeric, matches podSecurityContext
    assert yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"][
        "runAsUser"] == 10001
    assert "-c requirements.lock" in text or "-c /tmp/constraints.txt" in text
    assert re.search(r'^ENTRYPOINT \["adapterhub"\]', text, flags=re.M)
    if dockerfile == "Dockerfile.cuda":
        # The CPU torch of the lock is swapped for the CUDA build of exactly 2.13.0.
        assert 's/^torch==.*/torch==2.13.0+${TORCH_CUDA}/' in text
        assert "torch.__version__ == '2.13.0+${TORCH_CUDA}'" in text
    else:
        assert "torch.__version__ == '2.13.0+cpu'" in text
        # The native LoRA kernel is built in the build stage; the runtime has no compiler and
        # finds it through ADAPTERHUB_KERNELS_DIR.
        build, runtime = text.split("\nFROM ${PYTHON_IMAGE}\n")
        assert "-m serving.engine.kernels" in build and "gcc" in build
        assert "gcc" not in runtime
        assert "COPY --from=build /opt/adapterhub/kernels /opt/adapterhub/kernels" in runtime
        assert "ADAPTERHUB_KERNELS_DIR=/opt/adapterhub/kernels" in runtime
        pyproject = (ROOT / "pyproject.toml").read_text()
        # The sources and their shared header ship in wheels: the runtime finds the image's
        # build by a hash of both.
        assert '"serving.engine.kernels" = ["*.c", "*.h"]' in pyproject
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==2\.13\.0\+cpu$", lock, flags=re.M)
