"""Several `cortex serve` replicas on one PostgreSQL store: real processes, real signals.

Any replica answers any request; exactly one leads; each stops the workers it started; a job
outlives the replica that accepted it, whether its workers reach another replica (CORTEX_PUBLIC_URL
at a load balancer, here the other replica) or die with it and the leader replaces them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cortex.client import Client
from cortex.jobs import WorkerState
from cortex.store import Store
from helpers import (
    Server,
    deploy_fixture,
    free_port,
    job_worker_processes,
    kill_processes,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)

# Short periods so that a death is noticed in seconds: a replica not heard from for 1 s is
# gone, a worker not heard from for 4 s (heartbeats every 0.3 s) is lost.
REPLICA_ENV = {
    "CORTEX_LEADER_LEASE_S": "1",
    "CORTEX_LEASE_S": "4",
    "CORTEX_HEARTBEAT_S": "0.3",
}


def _cortex(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _health(server: Server) -> dict[str, Any]:
    try:
        data: dict[str, Any] = httpx.get(f"{server.url}/healthz", timeout=2).json()
    except httpx.TransportError:
        return {}
    return data


def _submit(client: Client, api: str, items: list[Any], workers: int = 2) -> str:
    body = {"workers": workers, "item_list": {"items": items, "batch_size": 1}}
    return str(client.submit(api, body)["job_id"])


def _succeeded(client: Client, api: str, job_id: str) -> int:
    return int(client.get_job(api, job_id)["job_status"]["batch_metrics"]["succeeded"])


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[Any]:
    """Starts replicas on one migrated PostgreSQL database; stops them and every worker."""
    migrated = _cortex("migrate", "--store", pg_url)
    assert migrated.returncode == 0, migrated.stderr
    started: list[Server] = []
    jobs: list[str] = []

    def start(name: str, port: int | None = None, **env: str) -> Server:
        server = start_server(tmp_path / name, port=port, CORTEX_STORE=pg_url, **REPLICA_ENV, **env)
        started.append(server)
        return server

    start.jobs = jobs  # type: ignore[attr-defined]
    yield start
    for server in started:
        stop_server(server)
    for job_id in jobs:
        kill_processes(job_worker_processes(job_id))


def test_a_server_refuses_a_postgresql_store_that_is_not_migrated(
    pg_url: str, tmp_path: Path
) -> None:
    refused = _cortex(
        "serve", "--port", str(free_port()), CORTEX_STORE=pg_url, CORTEX_DATA_DIR=str(tmp_path)
    )
    assert refused.returncode == 1
    [line] = refused.stderr.strip().splitlines()
    assert "has no cortex schema" in line and "cortex migrate" in line

    migrated = _cortex("migrate", "--store", pg_url)
    assert migrated.returncode == 0, migrated.stderr
    assert "from an empty database to schema revision" in migrated.stdout
    again = _cortex("migrate", "--store", pg_url)
    assert "is up to date" in again.stdout


def test_any_replica_answers_and_each_stops_its_own_workers(replicas: Any, tmp_path: Path) -> None:
    a = replicas("a")
    b = replicas("b")
    # Exactly one of them leads.
    wait_for(lambda: [_health(s).get("leader") for s in (a, b)].count(True) == 1, 15)
    assert _health(a)["replica_id"] != _health(b)["replica_id"]

    with a.client() as via_a, b.client() as via_b:
        api = deploy_fixture(via_a, "recorder", tmp_path)
        assert via_b.get_api(api.name)["batch_api"]["spec"]["name"] == api.name
        job_id = _submit(via_a, api.name, [{"sleep": 0.2}] * 100)
        replicas.jobs.append(job_id)
        wait_for(lambda: _succeeded(via_b, api.name, job_id) >= 2, 30, "batches to succeed")
        assert len(a.worker_processes(job_id)) == 2 and not b.worker_processes(job_id)

        # Stopped through B: A, which started the workers, stops them.
        via_b.stop_job(api.name, job_id)
        assert via_a.get_job(api.name, job_id)["job_status"]["status"] == "status_stopped"
        wait_for(lambda: not a.worker_processes(job_id), 15, "A to stop its workers")


def test_a_job_outlives_the_replica_that_accepted_it(
    replicas: Any, pg_url: str, tmp_path: Path
) -> None:
    port_b = free_port()
    # A's workers reach the servers through B, as they would through a load balancer.
    a = replicas("a", CORTEX_PUBLIC_URL=f"http://127.0.0.1:{port_b}")
    wait_for(lambda: _health(a).get("leader"), 15, "A to lead")
    a_id = _health(a)["replica_id"]
    b = replicas("b", port=port_b)

    with a.client() as via_a, b.client() as via_b:
        api = deploy_fixture(via_a, "recorder", tmp_path)
        items = [{"sleep": 0.15, "n": i} for i in range(30)]
        job_id = _submit(via_a, api.name, items)
        replicas.jobs.append(job_id)
        wait_for(lambda: _succeeded(via_b, api.name, job_id) >= 3, 30, "batches to succeed")
        # The second worker is placed once the first has loaded the predictor, by the replica
        # its report reached (B).
        wait_for(lambda: len(job_worker_processes(job_id)) == 2, 15, "both workers to start")

        os.kill(a.process.pid, signal.SIGKILL)
        a.process.wait()
        wait_for(lambda: _health(b).get("leader"), 15, "B to take the leader lease over")

        status = wait_for_status(via_b, api.name, job_id, 60)
        assert status["status"] == "status_succeeded"
        assert status["batch_metrics"] == {
            "succeeded": 30,
            "failed": 0,
            "average_time_per_batch": status["batch_metrics"]["average_time_per_batch"],
        }
        assert len((api.out / job_id / "hook.log").read_text().splitlines()) == 1
        # A's worker did its part through B after A died: none was replaced.
        store = Store(pg_url)
        try:
            job = store.get_job(job_id)
            assert job is not None and job.worker_restarts == 0
            owners = [w.replica_id for w in store.list_workers(job_id)]
            assert len(owners) == 2 and owners[0] == a_id
        finally:
            store.close()
        wait_for(lambda: not job_worker_processes(job_id), 15, "A's workers to exit")


def test_workers_lost_with_their_replica_are_replaced_by_the_leader(
    replicas: Any, pg_url: str, tmp_path: Path
) -> None:
    a = replicas("a")  # its workers reach A only, and are cut off when it dies
    wait_for(lambda: _health(a).get("leader"), 15, "A to lead")
    b = replicas("b")
    a_id, b_id = _health(a)["replica_id"], _health(b)["replica_id"]

    with a.client() as via_a, b.client() as via_b:
        api = deploy_fixture(via_a, "recorder", tmp_path)
        items = [{"sleep": 0.15, "n": i} for i in range(24)]
        job_id = _submit(via_a, api.name, items)
        replicas.jobs.append(job_id)
        wait_for(lambda: _succeeded(via_b, api.name, job_id) >= 3, 30, "batches to succeed")
        cut_off = job_worker_processes(job_id)

        os.kill(a.process.pid, signal.SIGKILL)
        a.process.wait()

        status = wait_for_status(via_b, api.name, job_id, 60)
        assert status["status"] == "status_succeeded"
        assert status["batch_metrics"]["succeeded"] == 24
        assert len((api.out / job_id / "hook.log").read_text().splitlines()) == 1
        # B, now the leader, replaced them: the ones A started are lost, new ones ran on B.
        assert _health(b)["leader"]
        store = Store(pg_url)
        try:
            workers = store.list_workers(job_id)
        finally:
            store.close()
        lost = [w for w in workers if w.replica_id == a_id]
        assert len(lost) == 2
        assert all(w.state is WorkerState.UNKNOWN for w in lost)
        assert all("was lost" in (w.error_message or "") for w in lost)
        assert any(w.replica_id == b_id for w in workers)
        assert all(p.is_running() for p in cut_off)  # alive, still retrying A: unheard of
        kill_processes(cut_off)


def test_two_replicas_together_stay_within_capacity(replicas: Any, tmp_path: Path) -> None:
    a = replicas("a", CORTEX_CAPACITY="cpu=2")
    b = replicas("b", CORTEX_CAPACITY="cpu=2")
    wait_for(lambda: [_health(s).get("leader") for s in (a, b)].count(True) == 1, 15)
    with a.client() as via_a, b.client() as via_b:
        api = deploy_fixture(via_a, "recorder", tmp_path, compute={"cpu": 1})
        jobs = [
            _submit(client, api.name, [{"sleep": 0.3}] * 4)
            for client in (via_a, via_b, via_a, via_b)
        ]
        replicas.jobs.extend(jobs)
        most = 0

        def all_ended() -> bool:
            nonlocal most
            most = max(most, len(job_worker_processes(*jobs)))
            statuses = [via_b.get_job(api.name, j)["job_status"]["status"] for j in jobs]
            return all(s not in ("status_enqueuing", "status_running") for s in statuses)

        wait_for(all_ended, 120, "every job to end")
        for job_id in jobs:
            status = via_a.get_job(api.name, job_id)["job_status"]
            assert status["status"] == "status_succeeded"
            assert status["batch_metrics"]["succeeded"] == 4
    assert 1 <= most <= 2
