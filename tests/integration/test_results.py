"""Collected results, the hook's summary, batch timeouts and failure budgets, end to end: a
real server on each store (SQLite, PostgreSQL), real worker processes, moto's S3 server and
a local data root for output locations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cortex.client import Client
from cortex.store import Store, schema
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)
from postgres import Databases
from s3server import BUCKET, S3


@dataclass
class Env:
    server: Server
    client: Client
    root: Path  # the server's data root: local output folders go under it
    s3: S3
    api: DeployedApi


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(
    request: pytest.FixtureRequest, s3: S3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    extra = dict(s3.env)
    if request.param == "postgresql":
        databases: Databases = request.getfixturevalue("pg_databases")
        store = Store(databases.create())
        schema.upgrade(store)
        store.close()
        extra["CORTEX_STORE"] = store.url
    root = tmp_path_factory.mktemp("root")
    # A lease longer than batch_timeout + the server's grace: a wedged worker is then ended
    # by its batch's deadline, not by its lease.
    server = start_server(
        tmp_path_factory.mktemp("server"), CORTEX_DATA_ROOTS=str(root), CORTEX_LEASE_S="30", **extra
    )
    client = server.client()
    api = deploy_fixture(client, "results", tmp_path_factory.mktemp("apis"))
    try:
        yield Env(server, client, root, s3, api)
    finally:
        client.close()
        stop_server(server)


def _submit(env: Env, items: list[Any], batch_size: int = 1, **extra: Any) -> str:
    body = {
        "workers": extra.pop("workers", 2),
        "item_list": {"items": items, "batch_size": batch_size},
    }
    body.update(extra)
    return str(env.client.submit(env.api.name, body)["job_id"])


def _results(env: Env, job_id: str) -> list[dict[str, Any]]:
    return [
        json.loads(line) for line in b"".join(env.client.results(env.api.name, job_id)).splitlines()
    ]


def _items(results: list[dict[str, Any]]) -> list[Any]:
    return [r["result"]["item"] for r in results if r["index"] is not None]


def test_results_are_paired_with_items_in_the_jobs_order(env: Env, tmp_path: Path) -> None:
    items: list[Any] = [*range(7), "none", "x", "whole", "y"]
    job_id = _submit(env, items, batch_size=2)
    status = wait_for_status(env.client, env.api.name, job_id)
    assert status["status"] == "status_succeeded"
    assert status["output"] is None
    results = _results(env, job_id)
    # batches: [0,1] [2,3] [4,5] [6,"none"] (None: no lines) ["x","whole"] (one result) ["y"]
    assert [(r["index"], r["result"]) for r in results] == [
        (0, {"item": 0}),
        (1, {"item": 1}),
        (0, {"item": 2}),
        (1, {"item": 3}),
        (0, {"item": 4}),
        (1, {"item": 5}),
        (None, {"count": 2}),
        (0, {"item": "y"}),
    ]
    assert len({r["batch_id"] for r in results}) == 5
    # The CLI saves the same lines to a file.
    out = tmp_path / "results.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "results", env.api.name, job_id, "-o", str(out)],
        env={**os.environ, "CORTEX_URL": env.server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    missing = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "results", env.api.name, "nosuchjob"],
        env={**os.environ, "CORTEX_URL": env.server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and "nosuchjob" in missing.stderr + missing.stdout


def test_every_item_is_in_the_results_once_when_workers_are_killed(env: Env) -> None:
    items: list[Any] = [{"n": i} for i in range(30)]
    for i in (3, 11, 20):
        items[i] = {"n": i, "kill": True}
    # Each kill ends an attempt of every batch its worker held: attempts to spare.
    job_id = _submit(env, items, batch_size=2, workers=2, max_attempts=10)
    status = wait_for_status(env.client, env.api.name, job_id, 60)
    assert status["status"] == "status_succeeded", status
    assert sorted(r["n"] for r in _items(_results(env, job_id))) == list(range(30))


def _s3_lines(env: Env, url: str) -> list[dict[str, Any]]:
    key = url.removeprefix(f"s3://{BUCKET}/")
    body = env.s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return [json.loads(line) for line in body.splitlines()]


def test_results_go_to_s3_with_an_errors_file_and_the_hook_gets_the_summary(env: Env) -> None:
    prefix = f"s3://{BUCKET}/out-{time.time_ns()}/"
    items: list[Any] = [*range(5), "fail"]
    job_id = _submit(env, items, max_attempts=1, output={"path": prefix})
    status = wait_for_status(env.client, env.api.name, job_id)
    assert status["status"] == "status_completed_with_failures"
    output = status["output"]
    assert output["path"] == prefix
    assert output["files"] == [f"{prefix}{job_id}/results-00000.jsonl"]
    assert output["errors"] == f"{prefix}{job_id}/errors.jsonl"
    assert sorted(_items(_s3_lines(env, output["files"][0]))) == list(range(5))
    [error] = _s3_lines(env, output["errors"])
    assert error["payload"] == ["fail"] and error["error_kind"] == "predict_error"
    assert "this batch fails" in error["error"]
    # The hook ran for a job with failures, and knew it.
    summary = json.loads((env.api.out / job_id / "summary.json").read_text())
    assert summary["job_id"] == job_id
    assert (summary["succeeded"], summary["failed"], summary["total"]) == (5, 1, 6)
    assert summary["any_failed"] is True
    assert summary["status"] == "status_completed_with_failures"
    assert summary["start_time"] == status["start_time"]
    assert summary["output"] == output


def test_results_that_cannot_be_kept_fail_their_batch(env: Env) -> None:
    items: list[Any] = [0, "nan", {"big": 5 << 20}]
    job_id = _submit(env, items, max_attempts=1, workers=1)
    status = wait_for_status(env.client, env.api.name, job_id)
    assert status["status"] == "status_completed_with_failures"
    kinds = {
        b["payload"][0] if isinstance(b["payload"][0], str) else "big": b["error_kind"]
        for b in env.client.failed_batches(env.api.name, job_id)
    }
    assert kinds == {"nan": "result_not_serialisable", "big": "result_too_large"}
    assert _items(_results(env, job_id)) == [0]


def test_a_hanging_predict_is_ended_by_batch_timeout(env: Env) -> None:
    started = time.monotonic()
    items: list[Any] = [0, {"sleep": 120}, 2, 3]
    job_id = _submit(env, items, max_attempts=2, batch_timeout=1, workers=1)
    status = wait_for_status(env.client, env.api.name, job_id, 60)
    assert time.monotonic() - started < 30
    assert status["status"] == "status_completed_with_failures"
    assert status["batch_timeout"] == 1
    [failed] = env.client.failed_batches(env.api.name, job_id)
    assert failed["error_kind"] == "batch_timeout" and failed["attempts"] == 2
    assert sorted(_items(_results(env, job_id))) == [0, 2, 3]
    workers = env.client._json("GET", f"/{env.api.name}/{job_id}/workers")["workers"]
    assert len(workers) == 3  # the first, a replacement per timed out attempt


def test_a_worker_wedged_in_c_code_is_killed_at_the_batchs_deadline(env: Env) -> None:
    items: list[Any] = [{"wedge": 120}, 1]
    job_id = _submit(env, items, max_attempts=1, batch_timeout=1, workers=1)
    status = wait_for_status(env.client, env.api.name, job_id, 60)
    assert status["status"] == "status_completed_with_failures"
    [failed] = env.client.failed_batches(env.api.name, job_id)
    assert failed["error_kind"] == "batch_timeout"
    assert _items(_results(env, job_id)) == [1]
    wait_for(lambda: not env.server.worker_processes(job_id), 20, "the workers to go")


def test_a_failure_budget_stops_the_job_early(env: Env) -> None:
    folder = env.root / f"out-{time.time_ns()}"
    # Slow batches first: the worker then leases one batch at a time.
    items: list[Any] = [{"sleep": 0.3}, "fail", {"sleep": 0.3}, "fail", *range(20)]
    job_id = _submit(
        env, items, max_attempts=1, max_failed_batches=1, workers=1, output={"path": str(folder)}
    )
    status = wait_for_status(env.client, env.api.name, job_id)
    assert status["status"] == "status_completed_with_failures"
    assert status["error"]["kind"] == "batchapi.max_failed_batches_exceeded"
    assert "max_failed_batches (1)" in status["error"]["message"]
    assert status["batch_counts"]["failed"] == 2
    assert status["batch_counts"]["not_run"] == 20
    assert status["batch_counts"]["succeeded"] == 2
    # The errors file lists the failed batches, then those not run.
    errors = [
        json.loads(line) for line in (folder / job_id / "errors.jsonl").read_text().splitlines()
    ]
    assert [e["state"] for e in errors] == ["failed"] * 2 + ["not_run"] * 20
    assert [e["payload"] for e in errors[2:]] == [[i] for i in range(20)]
    assert len((folder / job_id / "results-00000.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (folder / job_id).iterdir()) == [
        "errors.jsonl",
        "results-00000.jsonl",
    ]
    assert not (env.api.out / job_id / "summary.json").exists()  # the hook does not run
    wait_for(lambda: not env.server.worker_processes(job_id), 20, "the workers to stop")


def test_bad_new_fields_are_refused_with_their_bound(env: Env) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"batch_timeout": 0}, "batchapi.invalid_batch_timeout"),
        ({"batch_timeout": 1 << 40}, "batchapi.invalid_batch_timeout"),
        ({"max_failed_batches": -1}, "batchapi.invalid_max_failed_batches"),
        ({"output": {"path": "ftp://x/y"}}, "batchapi.invalid_path"),
        ({"output": {"path": "https://x/y"}}, "batchapi.invalid_path"),
        ({"output": {"path": "/etc/cortex-out"}}, "batchapi.path_not_allowed"),
        ({"output": {"path": str(env.root / ".." / "x")}}, "batchapi.path_not_allowed"),
    ]
    with env.server.http() as http:
        for extra, kind in bad:
            response = http.post(
                f"/{env.api.name}",
                json={"workers": 1, "item_list": {"items": [1], "batch_size": 1}, **extra},
            )
            assert response.status_code == 400, (extra, response.text)
            assert response.json()["kind"] == kind, extra
        missing = http.get(f"/{env.api.name}/nosuchjob/results")
        assert missing.status_code == 400
        assert missing.json()["kind"] == "batchapi.job_not_found"
