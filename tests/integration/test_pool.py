"""The worker pool with real servers and workers: a capacity of 2 CPUs shared by every job,
workers of 1 CPU each, queued jobs, priorities with preemption, backlog scaling, and capacity
given back by every way a worker ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cortex.client import Client
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    job_worker_processes,
    kill_processes,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("pool-server"), CORTEX_CAPACITY="cpu=2")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def one_cpu(pool_server: Server, tmp_path_factory: pytest.TempPathFactory) -> DeployedApi:
    with pool_server.client() as client:
        return deploy_fixture(
            client, "recorder", tmp_path_factory.mktemp("one-cpu"), compute={"cpu": 1}
        )


class Sampler(threading.Thread):
    """Counts the server's live worker processes every few milliseconds."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.most = 0
        self.samples = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.01):
            self.most = max(self.most, len(self.server.worker_processes()))
            self.samples += 1

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join()


def _submit(client: Client, api: str, items: list[Any], workers: int, **extra: Any) -> str:
    body = {"workers": workers, "item_list": {"items": items, "batch_size": 1}, **extra}
    return str(client.submit(api, body)["job_id"])


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        env={**os.environ, "CORTEX_URL": server.url, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _capacity(server: Server) -> dict[str, Any]:
    with server.http() as http:
        result: dict[str, Any] = http.get("/capacity").json()
        return result


def _ended_workers(server: Server, api: str, job_id: str) -> list[dict[str, Any]]:
    """A job's workers once they have all exited."""

    def ended() -> list[dict[str, Any]] | None:
        with server.http() as http:
            workers: list[dict[str, Any]] = http.get(f"/{api}/{job_id}/workers").json()["workers"]
        alive = ("pending", "initializing", "running")
        return None if any(w["state"] in alive for w in workers) else workers

    return wait_for(ended, 20, "the job's workers to exit")


def _attempts(api: DeployedApi, job_id: str) -> list[str]:
    return (api.out / job_id / "attempts.log").read_text().split()


def test_jobs_queue_for_capacity_and_each_gets_a_worker_before_any_gets_a_second(
    pool_server: Server, one_cpu: DeployedApi
) -> None:
    with pool_server.client() as client, Sampler(pool_server) as sampler:
        jobs = [_submit(client, one_cpu.name, [{"sleep": 0.5}] * 6, 2) for _ in range(3)]
        # The third waits, and says why; `cortex get` shows it.
        third = client.get_job(one_cpu.name, jobs[2])["job_status"]
        assert third["worker_counts"]["pending"] >= 1
        assert third["pending_reason"].startswith("waiting for capacity")
        shown = _cli(pool_server, "get", one_cpu.name, jobs[2])
        assert shown.returncode == 0, shown.stderr
        assert "pending" in shown.stdout
        usage = _capacity(pool_server)
        assert usage["total"]["cpu"] == 2 and usage["used"]["cpu"] <= 2
        for job_id in jobs:
            assert wait_for_status(client, one_cpu.name, job_id, 60)["status"] == (
                "status_succeeded"
            )
    assert sampler.samples > 10 and sampler.most <= 2
    placed = {}
    for job_id in jobs:
        workers = _ended_workers(pool_server, one_cpu.name, job_id)
        placed[job_id] = sorted(w["started_at"] for w in workers)
        assert all(w["state"] == "succeeded" for w in workers), workers
    firsts = [times[0] for times in placed.values()]
    seconds = [times[1] for times in placed.values() if len(times) > 1]
    assert max(firsts) < min(seconds, default="~")
    for job_id in jobs:
        assert sorted(_attempts(one_cpu, job_id)) == sorted(set(_attempts(one_cpu, job_id)))
    wait_for(lambda: _capacity(pool_server)["used"]["cpu"] == 0, 15, "the pool to be empty")


def test_a_higher_priority_job_preempts_at_a_batch_boundary(
    pool_server: Server, one_cpu: DeployedApi
) -> None:
    with pool_server.client() as client:
        low = _submit(client, one_cpu.name, [{"sleep": 0.4}] * 10, 2)
        wait_for(
            lambda: len(pool_server.worker_processes(low)) == 2, 20, "the low job's two workers"
        )
        high = _submit(client, one_cpu.name, [{"sleep": 0.1}] * 3, 2, priority=10)
        status = wait_for_status(client, one_cpu.name, high, 30)
        assert status["status"] == "status_succeeded"
        assert status["batch_metrics"]["succeeded"] == 3
        # Before the earlier job finished: one of its workers made room.
        assert client.get_job(one_cpu.name, low)["job_status"]["status"] == "status_running"
        low_status = wait_for_status(client, one_cpu.name, low, 60)
    assert low_status["status"] == "status_succeeded"
    assert low_status["batch_metrics"]["succeeded"] == 10
    assert low_status["batch_metrics"]["failed"] == 0
    # No batch lost, none run twice: a drained worker finished its batch and handed back
    # nothing it had started.
    attempts = _attempts(one_cpu, low)
    assert len(attempts) == 10 and len(set(attempts)) == 10
    assert len(_attempts(one_cpu, high)) == 3
    workers = _ended_workers(pool_server, one_cpu.name, low)
    # Its drained worker exited cleanly; a later one took its place once the room was back.
    assert all(w["state"] == "succeeded" for w in workers)
    assert len(workers) >= 3
    wait_for(lambda: _capacity(pool_server)["used"]["cpu"] == 0, 15, "the pool to be empty")


def test_a_job_never_runs_more_workers_than_batches(pool_server: Server, tmp_path: Path) -> None:
    with pool_server.client() as client:
        small = deploy_fixture(client, "recorder", tmp_path, compute={"cpu": "100m"})
        job_id = _submit(client, small.name, [{"sleep": 0.5}] * 3, 8)
        assert wait_for_status(client, small.name, job_id, 30)["status"] == "status_succeeded"
    with pool_server.http() as http:
        workers = http.get(f"/{small.name}/{job_id}/workers").json()["workers"]
    assert 1 <= len(workers) <= 3


def test_capacity_comes_back_after_crashes_stops_and_timeouts(
    pool_server: Server, one_cpu: DeployedApi
) -> None:
    def empty() -> bool:
        usage = _capacity(pool_server)
        return bool(usage["used"]["cpu"] == 0 and not pool_server.worker_processes())

    with pool_server.client() as client:
        # A worker that dies mid-batch: replaced, and the job still ends.
        crash = _submit(client, one_cpu.name, [{"kill": True}, 1, 2], 1, max_attempts=1)
        assert wait_for_status(client, one_cpu.name, crash, 60)["status"] in (
            "status_completed_with_failures",
            "status_worker_error",
        )
        wait_for(empty, 20, "the crashed job's capacity back")
        # A stop.
        stopped = _submit(client, one_cpu.name, [{"sleep": 30}] * 2, 2)
        wait_for(lambda: pool_server.worker_processes(stopped), 20, "a worker to start")
        client.stop_job(one_cpu.name, stopped)
        wait_for(empty, 20, "the stopped job's capacity back")
        # A timeout.
        timed = _submit(client, one_cpu.name, [{"sleep": 30}] * 2, 2, timeout=2)
        status = wait_for_status(client, one_cpu.name, timed, 30)
        assert status["status"] == "status_timed_out"
        wait_for(empty, 20, "the timed-out job's capacity back")
        # And the whole pool serves the next job.
        after = _submit(client, one_cpu.name, [1, 2], 2)
        assert wait_for_status(client, one_cpu.name, after, 30)["status"] == "status_succeeded"


def test_an_unfittable_worker_is_refused(pool_server: Server, tmp_path: Path) -> None:
    with pool_server.client() as client:
        huge = deploy_fixture(client, "recorder", tmp_path, compute={"cpu": 3})
    with pool_server.http() as http:
        response = http.post(
            f"/{huge.name}", json={"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
        )
    assert response.status_code == 400
    assert response.json()["kind"] == "batchapi.insufficient_capacity"
    assert "cpu=3 (capacity 2)" in response.json()["message"]
    shown = _cli(pool_server, "capacity")
    assert shown.returncode == 0, shown.stderr
    total = next(line for line in shown.stdout.splitlines() if line.strip().startswith("total"))
    assert total.split()[:2] == ["total", "2"]


def test_a_restarted_server_resumes_the_accounting(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "server", CORTEX_CAPACITY="cpu=2")
    port = int(srv.url.rsplit(":", 1)[1])
    try:
        with srv.client() as client:
            api = deploy_fixture(client, "recorder", tmp_path, compute={"cpu": 1})
            first = _submit(client, api.name, [{"sleep": 0.5}] * 12, 2)
            wait_for(lambda: len(srv.worker_processes(first)) == 2, 20, "both workers")
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait()
        srv = start_server(srv.data_dir, port=port, CORTEX_CAPACITY="cpu=2")
        with srv.client() as client:
            # The adopted workers still hold the whole pool: the new job waits for them.
            second = _submit(client, api.name, [{"sleep": 0.1}] * 4, 2)
            assert client.get_job(api.name, second)["job_status"]["worker_counts"]["pending"]
            most: list[str] = []

            def ended() -> bool:
                nonlocal most
                live = job_worker_processes(first, second)
                if len(live) > len(most):
                    most = [str(p.pid) for p in live]
                return all(
                    client.get_job(api.name, j)["job_status"]["status"] == "status_succeeded"
                    for j in (first, second)
                )

            wait_for(ended, 60, "both jobs to succeed")
        assert len(most) <= 2, (most, _ended_workers(srv, api.name, first))
        attempts = _attempts(api, first)
        assert len(set(attempts)) == 12
    finally:
        stop_server(srv)
        kill_processes(job_worker_processes(first))
