"""Test helpers: a real `cortex serve` process on loopback, fixture APIs, waiting on conditions."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import yaml

from cortex.client import Client
from cortex.launchers.local import worker_environ

FIXTURES = Path(__file__).parent / "fixtures" / "predictors"
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float = 15.0, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}: {last!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self) -> Client:
        return Client(self.url)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def worker_processes(self, job_id: str | None = None) -> list[psutil.Process]:
        """Live worker processes this server started (of one job, if given)."""
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if (
                    child.status() != psutil.STATUS_ZOMBIE
                    and any("cortex.worker" in part for part in child.cmdline())
                    and _is_worker_of(child, job_id)
                ):
                    alive.append(child)
            except psutil.Error:
                continue
        return alive

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _is_worker_of(proc: psutil.Process, job_id: str | None) -> bool:
    """A worker (of this job, if given); not a fork server, which has no job."""
    job = worker_environ(proc).get("CORTEX_JOB_ID")
    return job is not None and (job_id is None or job == job_id)


def job_worker_processes(*job_ids: str) -> list[psutil.Process]:
    """Live worker processes of these jobs wherever they come from (a killed server's
    included), in one scan of the machine."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.status() != psutil.STATUS_ZOMBIE
                and any("cortex.worker" in part for part in proc.cmdline())
                and worker_environ(proc).get("CORTEX_JOB_ID") in job_ids
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_processes(procs: list[psutil.Process]) -> None:
    """SIGKILL each process's group (workers run in sessions of their own)."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def start_server(data_dir: Path, port: int | None = None, **env: str) -> Server:
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "server.log"
    settings = {
        "CORTEX_PORT": str(port),
        "CORTEX_DATA_DIR": str(data_dir),
        "CORTEX_WORKER_GRACE_S": "1",
        "CORTEX_HEARTBEAT_S": "0.5",
        "CORTEX_LEASE_S": "5",
        **env,
    }
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "serve"],
            env={**os.environ, **settings},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(url, data_dir, process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"cortex serve exited early:\n{server.log()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 20, "the server to answer /healthz")
    return server


def stop_server(server: Server) -> None:
    workers = server.worker_processes()
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    for proc in workers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class DeployedApi:
    name: str
    folder: Path
    out: Path


def deploy_fixture(
    client: Client,
    fixture: str,
    tmp_path: Path,
    *,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    compute: dict[str, Any] | None = None,
) -> DeployedApi:
    """Copy a fixture predictor into tmp_path, give it a unique name, and deploy it."""
    name = name or f"{fixture.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    if not folder.exists():
        shutil.copytree(FIXTURES / fixture, folder)
    out = tmp_path / f"{name}-out"
    api = yaml.safe_load((folder / "cortex.yaml").read_text())[0]
    api["name"] = name
    api["predictor"]["config"] = {"out": str(out), **(config or {})}
    if compute:
        api["compute"] = compute
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    client.deploy(folder / "cortex.yaml")
    return DeployedApi(name, folder, out)


def wait_for_status(
    client: Client, api: str, job_id: str, timeout_s: float = 30.0
) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        status = client.get_job(api, job_id)["job_status"]
        return None if status["status"] in ("status_enqueuing", "status_running") else status

    return wait_for(ended, timeout_s, f"job {job_id} to end")
