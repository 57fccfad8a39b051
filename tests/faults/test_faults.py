"""Fault injection with real processes and real signals: kill -9, memory hogs, restarts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.client import Client
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)


def _submit(client: Client, api: str, items: list, **extra: object) -> str:
    body = {"workers": extra.pop("workers", 2), "item_list": {"items": items, "batch_size": 1}}
    body.update(extra)
    return str(client.submit(api, body)["job_id"])


def _attempts(api: DeployedApi, job_id: str) -> list[str]:
    path = api.out / job_id / "attempts.log"
    return path.read_text().split() if path.exists() else []


def _outputs(api: DeployedApi, job_id: str) -> list[object]:
    return sorted(
        json.dumps(json.loads(p.read_text())) for p in (api.out / job_id).glob("batch-*.json")
    )


def _hook_runs(api: DeployedApi, job_id: str) -> int:
    path = api.out / job_id / "hook.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """A server this test may kill."""
    srv = start_server(tmp_path / "server")
    yield srv
    stop_server(srv)


def test_a_killed_worker_is_replaced_and_its_batch_finished(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    items = [{"sleep": 0.3, "n": i} for i in range(12)]
    job_id = _submit(client, api.name, items, workers=2)
    wait_for(lambda: len(_attempts(api, job_id)) >= 3, 20, "batches to start")

    victim = server.worker_processes(job_id)[0]
    os.kill(victim.pid, signal.SIGKILL)

    status = wait_for_status(client, api.name, job_id, 40)
    assert status["status"] == "status_succeeded"
    assert status["batch_metrics"]["succeeded"] == 12
    assert status["batch_metrics"]["failed"] == 0
    assert status["batch_counts"] == {"queued": 0, "leased": 0, "succeeded": 12, "failed": 0}
    assert len(_outputs(api, job_id)) == 12
    # Every batch ran; the one the victim held (if it was inside predict) ran again under the
    # same batch id, and a replacement worker was started.
    attempts = _attempts(api, job_id)
    assert len(set(attempts)) == 12 and len(attempts) in (12, 13)
    assert "starting a replacement" in "\n".join(client.logs(api.name, job_id, follow=True))
    assert _hook_runs(api, job_id) == 1
    wait_for(lambda: not server.worker_processes(job_id), 10, "the pool to go back to zero")


def test_a_batch_that_keeps_killing_its_worker_fails_after_its_attempts(
    client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _submit(client, api.name, [1, {"kill": True}, 2], workers=1, max_attempts=2)

    status = wait_for_status(client, api.name, job_id, 40)

    assert status["status"] == "status_completed_with_failures"
    assert status["batch_metrics"]["succeeded"] == 2
    assert status["batch_metrics"]["failed"] == 1
    [failed] = client._json("GET", f"/{api.name}/{job_id}/failed_batches")["failed_batches"]
    assert failed["attempts"] == 2
    assert failed["error_kind"] == "worker_died"
    assert "SIGKILL" in failed["error"]
    assert failed["payload"] == [{"kill": True}]


def test_a_worker_over_its_memory_limit_ends_the_job_as_out_of_memory(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path, compute={"mem": "150Mi"})
    job_id = _submit(client, api.name, [{"alloc_mb": 400, "hold_s": 10}], workers=1)

    status = wait_for_status(client, api.name, job_id, 30)

    assert status["status"] == "status_worker_oom"
    assert status["error"]["kind"] == "batchapi.worker_oom"
    assert "too much memory" in status["error"]["message"]
    assert "limit of 150 MiB" in status["error"]["message"]
    wait_for(lambda: not server.worker_processes(job_id), 10, "the worker to be gone")


def test_a_worker_dying_inside_the_hook_does_not_leave_the_job_running(
    client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path, config={"die_in_hook": True})
    job_id = _submit(client, api.name, [1, 2], workers=2)

    status = wait_for_status(client, api.name, job_id, 30)

    assert status["status"] == "status_worker_error"
    assert status["error"]["kind"] == "batchapi.hook_worker_died"
    assert _hook_runs(api, job_id) == 1  # and it was not started a second time


def test_the_hook_runs_once_when_many_workers_finish_together(
    client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    jobs = [_submit(client, api.name, [{"sleep": 0.2}] * 8, workers=8) for _ in range(2)]
    for job_id in jobs:
        assert wait_for_status(client, api.name, job_id, 60)["status"] == "status_succeeded"
        assert _hook_runs(api, job_id) == 1


def test_stopping_a_job_with_eight_busy_workers_leaves_nothing_behind(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _submit(client, api.name, [{"sleep": 2}] * 40, workers=8)
    wait_for(
        lambda: client.get_job(api.name, job_id)["job_status"]["batch_counts"]["leased"] >= 8,
        30,
        "eight batches in progress",
    )

    client.stop_job(api.name, job_id)

    status = client.get_job(api.name, job_id)["job_status"]
    assert status["status"] == "status_stopped"
    assert status["batch_counts"]["leased"] == 0
    wait_for(lambda: not server.worker_processes(job_id), 10, "all eight workers to be gone")
    after = client.get_job(api.name, job_id)["job_status"]
    assert after["batch_counts"]["leased"] == 0
    assert after["batch_metrics"]["succeeded"] == status["batch_metrics"]["succeeded"]


def test_failed_batches_can_be_re_run_as_a_linked_job(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    items = [1, "fail-unless-retry", 2, "fail-unless-retry"]
    old = _submit(client, api.name, items, workers=1, max_attempts=1)
    assert wait_for_status(client, api.name, old)["status"] == "status_completed_with_failures"

    retry = client._json("POST", f"/{api.name}/{old}/retry_failed", json={"workers": 2})

    assert retry["retry_of"] == old
    assert retry["total_batch_count"] == 2
    assert retry["workers"] == 2
    status = wait_for_status(client, api.name, retry["job_id"])
    assert status["status"] == "status_succeeded"
    assert _outputs(api, retry["job_id"]) == ['["fail-unless-retry"]', '["fail-unless-retry"]']
    # The old job's record is unchanged.
    assert client.get_job(api.name, old)["job_status"]["batch_metrics"]["failed"] == 2
    with pytest.raises(Exception) as err:
        client._json("POST", f"/{api.name}/{retry['job_id']}/retry_failed")
    assert getattr(err.value, "kind", "") == "batchapi.no_failed_batches"


def test_a_server_killed_mid_job_picks_up_where_it_left(own_server: Server, tmp_path: Path) -> None:
    with own_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = _submit(client, api.name, [{"sleep": 0.25, "n": i} for i in range(16)])
        wait_for(lambda: len(_attempts(api, job_id)) >= 3, 20, "batches to start")
        # The pool has room for both (and one more): they start together, no slow start.
        wait_for(lambda: len(own_server.worker_processes(job_id)) == 2, 20, "both workers")
    # Forked by the server's fork server (ready long before the job), in sessions of their own.
    workers = own_server.worker_processes(job_id)
    [fork_server] = {worker.parent() for worker in workers}
    assert fork_server is not None and "cortex.worker.forkserver" in fork_server.cmdline()
    assert all(os.getsid(worker.pid) == worker.pid for worker in workers)

    own_server.process.send_signal(signal.SIGKILL)
    own_server.process.wait()
    # The fork server ends with the server (end of file on its stdin); its workers do not.
    fork_server.wait(10)
    assert all(worker.is_running() for worker in workers)
    port = int(own_server.url.rsplit(":", 1)[1])
    restarted = start_server(own_server.data_dir, port=port)
    own_server.process = restarted.process  # so the fixture stops the new one

    with restarted.client() as client:
        status = wait_for_status(client, api.name, job_id, 60)
    assert status["status"] == "status_succeeded"
    assert status["batch_metrics"] == {
        "succeeded": 16,
        "failed": 0,
        "average_time_per_batch": status["batch_metrics"]["average_time_per_batch"],
    }
    assert len(_outputs(api, job_id)) == 16
    assert _hook_runs(api, job_id) == 1
    # The workers the first server started carried on: none had to be started again.
    assert _worker_rows(restarted, job_id) == 2
    # The job's log survived the restart and goes on after it.
    with restarted.client() as client:
        text = "\n".join(client.logs(api.name, job_id, follow=True))
    # Two workers in all, started by the first server (in one pass or two).
    assert sum(int(n) for n in re.findall(r"server INFO started (\d+) workers?", text)) == 2
    assert "job status: status_succeeded" in text
    assert text.count(" done ") == 16


def test_a_server_restarted_mid_job_still_enforces_the_memory_limit(
    own_server: Server, tmp_path: Path
) -> None:
    with own_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path, compute={"mem": "150Mi"})
        # The second batch allocates past the limit; it can only be leased from the new server.
        items = [{"sleep": 0.5}, {"alloc_mb": 400, "hold_s": 10}]
        job_id = _submit(client, api.name, items, workers=1)
        wait_for(lambda: len(_attempts(api, job_id)) >= 1, 20, "the first batch to start")

    own_server.process.send_signal(signal.SIGKILL)
    own_server.process.wait()
    port = int(own_server.url.rsplit(":", 1)[1])
    restarted = start_server(own_server.data_dir, port=port)
    own_server.process = restarted.process  # so the fixture stops the new one

    with restarted.client() as client:
        status = wait_for_status(client, api.name, job_id, 60)
    assert status["status"] == "status_worker_oom", status
    assert "limit of 150 MiB" in status["error"]["message"]
    assert _worker_rows(restarted, job_id) == 1  # the adopted worker, not a new one


def test_a_server_killed_while_writing_an_item_list_fails_the_job_not_leaves_it(
    tmp_path: Path,
) -> None:
    """Inline items live only in their request: a server killed while writing their batches
    (the job is visible, enqueuing, its workers started) leaves a job that the restarted
    server fails with the reason, and whose workers go away."""
    big = {"CORTEX_MAX_BODY_BYTES": str(64 << 20)}
    srv = start_server(tmp_path / "server", **big)
    port = int(srv.url.rsplit(":", 1)[1])
    try:
        with srv.client() as client:
            api = deploy_fixture(client, "recorder", tmp_path)
        body = {"workers": 1, "item_list": {"items": list(range(400_000)), "batch_size": 1}}

        def post() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the server dies under it
                httpx.post(f"{srv.url}/{api.name}", json=body, timeout=60)

        posting = threading.Thread(target=post, daemon=True)
        posting.start()

        def writing() -> str | None:
            with srv.client() as client:
                jobs = client._request("GET", f"/{api.name}").json()["job_statuses"]
            return jobs[0]["job_id"] if jobs else None

        job_id = wait_for(writing, 30, "the job to be created")
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait()
        posting.join(30)
        srv = start_server(tmp_path / "server", port=port, **big)
        with srv.client() as client:
            status = wait_for_status(client, api.name, job_id, 60)
        if status["total_batch_count"] == 400_000 and status["status"] != "status_enqueue_failed":
            pytest.skip("the request finished writing before the kill landed")
        assert status["status"] == "status_enqueue_failed", status
        assert status["error"]["kind"] == "batchapi.enqueue_interrupted"
        assert "submit the job again" in status["error"]["message"]
        wait_for(lambda: not srv.worker_processes(job_id), 20, "the job's workers to be gone")
    finally:
        stop_server(srv)


def test_a_job_whose_workers_died_with_the_server_is_recovered(
    own_server: Server, tmp_path: Path
) -> None:
    with own_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = _submit(client, api.name, [{"sleep": 0.25, "n": i} for i in range(10)])
        wait_for(lambda: len(_attempts(api, job_id)) >= 2, 20, "batches to start")
    workers = own_server.worker_processes(job_id)
    own_server.process.send_signal(signal.SIGKILL)
    own_server.process.wait()
    for proc in workers:
        os.killpg(proc.pid, signal.SIGKILL)
    port = int(own_server.url.rsplit(":", 1)[1])
    restarted = start_server(own_server.data_dir, port=port)
    own_server.process = restarted.process

    with restarted.client() as client:
        status = wait_for_status(client, api.name, job_id, 60)
    assert status["status"] == "status_succeeded"
    assert status["batch_metrics"]["succeeded"] == 10
    assert len(_outputs(api, job_id)) == 10
    assert _hook_runs(api, job_id) == 1


def _worker_rows(server: Server, job_id: str) -> int:
    with sqlite3.connect(server.data_dir / "cortex.db") as db:
        row = db.execute("select count(*) from workers where job_id = ?", (job_id,)).fetchone()
    return int(row[0])


def _worker_token(server: Server, job_id: str) -> str:
    with sqlite3.connect(server.data_dir / "cortex.db") as db:
        row = db.execute("select worker_token from jobs where job_id = ?", (job_id,)).fetchone()
    return str(row[0])


def test_auth_token_guards_the_public_api_and_worker_tokens_stay_in_their_job(
    tmp_path: Path,
) -> None:
    srv = start_server(tmp_path / "server", CORTEX_AUTH_TOKEN="s3cret")
    try:
        anonymous = httpx.get(f"{srv.url}/get")
        assert anonymous.status_code == 401
        assert anonymous.json()["kind"] == "auth.unauthorized"
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        wrong = httpx.get(f"{srv.url}/get", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(f"{srv.url}/openapi.json").status_code == 401

        with Client(srv.url, token="s3cret") as client:
            api = deploy_fixture(client, "recorder", tmp_path)
            first = _submit(client, api.name, [{"sleep": 0.5}] * 4, workers=1)
            second = _submit(client, api.name, [{"sleep": 0.5}] * 4, workers=1)
            token = _worker_token(srv, first)
            worker = {"Authorization": f"Bearer {token}"}
            # A worker token opens its own job's worker API...
            assert httpx.get(f"{srv.url}/worker/v1/jobs/{first}/spec", headers=worker).is_success
            # ...and nothing else.
            other = httpx.get(f"{srv.url}/worker/v1/jobs/{second}/spec", headers=worker)
            assert other.status_code == 403
            public = httpx.get(f"{srv.url}/{api.name}", headers=worker)
            assert public.status_code == 401
            for job_id in (first, second):
                assert wait_for_status(client, api.name, job_id)["status"] == "status_succeeded"
        assert "s3cret" not in srv.log()
    finally:
        stop_server(srv)
