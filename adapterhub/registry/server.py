"""Launching the MLflow UI/REST server over the local registry, and stopping it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from adapterhub import settings
from adapterhub.errors import RegistryError


class UIProcess(subprocess.Popen):
    """The server process (leader of its own process group) and the URL it serves."""

    url: str = ""
    log_path: Path | None = None
    _log_handle: IO[bytes] | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_env(data_dir: Path) -> dict[str, str]:
    """The server's environment: ours plus the offline defaults (user values win)."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Without this the server forks job workers that survive it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def server_command(data_dir: Path, host: str, port: int) -> list[str]:
    """`mlflow server` over the data directory's store, serving artifacts from it."""
    backend = settings.tracking_uri(data_dir)
    if backend.startswith(("http://", "https://")):
        raise RegistryError(
            f"the tracking URI is already a server ({backend}); open it in a browser instead"
        )
    artifacts = settings.artifacts_dir(data_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        # Experiments created through the server get mlflow-artifacts:/ locations, which the
        # server proxies into the same folder local runs write to.
        "--artifacts-destination", str(artifacts),
        "--host", host,
        "--port", str(port),
        "--workers", "1",  # one local user; the default of 4 costs CPU and memory
    ]


def start_ui(
    data_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    wait: bool = True,
    timeout: float = 60.0,
) -> UIProcess:
    """Start the server in a new process group (port 0 picks a free one); see `proc.url`."""
    root = settings.data_dir(data_dir)
    if port == 0:
        port = free_port(host)
    command = server_command(root, host, port)
    log_path = root / "logs" / "ui.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # outlives this call: stop() closes it
    try:
        # A session of its own, so stop() can take down uvicorn's children with it.
        proc = UIProcess(
            command, env=server_env(root), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
        )
    except OSError as exc:
        log.close()
        raise RegistryError(f"cannot start mlflow server: {exc}") from None
    proc.url = f"http://{host}:{port}"
    proc.log_path = log_path
    proc._log_handle = log
    if wait:
        try:
            wait_until_up(proc.url, timeout, proc)
        except BaseException:
            stop(proc)
            raise
    return proc


def wait_until_up(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `url`/health until it answers 200; RegistryError on timeout or if `proc` dies."""
    deadline = time.monotonic() + timeout
    health = url.rstrip("/") + "/health"
    while True:
        if proc is not None and proc.poll() is not None:
            where = getattr(proc, "log_path", None)
            hint = f"; see {where}" if where else ""
            raise RegistryError(f"mlflow server exited with code {proc.returncode}{hint}")
        try:
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        if time.monotonic() >= deadline:
            raise RegistryError(f"mlflow server at {url} did not come up within {timeout:.0f} s")
        time.sleep(0.25)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate the server's whole process group (SIGTERM, then SIGKILL) and reap it."""
    pgid = proc.pid  # start_new_session made the server its group's leader
    if _signal_group(pgid, signal.SIGTERM) and not _wait_gone(proc, pgid, timeout):
        _signal_group(pgid, signal.SIGKILL)
        _wait_gone(proc, pgid, 5.0)
    handle = getattr(proc, "_log_handle", None)
    if handle is not None:
        handle.close()


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(proc: subprocess.Popen, pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        # poll() reaps the leader; otherwise its zombie would keep the group "alive".
        if proc.poll() is not None and not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still exists (zombies of ours included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
