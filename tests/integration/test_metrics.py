"""`GET /metrics` read back with prometheus_client's own parser: exact counts after real jobs, live
queue depth and workers, request latencies by route template, and several replicas."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cortex.client import Client
from helpers import Server, deploy_fixture, start_server, stop_server, wait_for, wait_for_status

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, **headers: str) -> Samples:
    """Every sample of a scrape, keyed by its name and labels."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[_key(sample)] = sample.value
    return samples


def _key(sample: Sample) -> tuple[str, frozenset[tuple[str, str]]]:
    return sample.name, frozenset(sample.labels.items())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def _submit(
    client: Client, api: str, items: list[object], workers: int = 2, **extra: object
) -> str:
    body = {"workers": workers, "item_list": {"items": items, "batch_size": 1}, **extra}
    return str(client.submit(api, body)["job_id"])


def test_counts_after_a_job_with_failures_are_exact(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    # 7 batches: 5 succeed (one of them on its second attempt), 2 fail both their attempts.
    items: list[object] = ["a", "b", "c", "d", "fail-once", "fail", "fail"]
    job_id = _submit(client, api.name, items, max_attempts=2)
    status = wait_for_status(client, api.name, job_id)
    assert status["status"] == "status_completed_with_failures"

    samples = scrape(server.url)
    assert value(samples, "cortex_batch_succeeded_total", api_name=api.name) == 5
    assert value(samples, "cortex_batch_failed_total", api_name=api.name) == 2
    jobs = {dict(k)["status"]: v for k, v in series(samples, "cortex_jobs").items()
            if dict(k)["api_name"] == api.name}  # fmt: skip
    # Every status has its series, at 0 unless a job has it.
    assert jobs["status_completed_with_failures"] == 1
    assert sum(jobs.values()) == 1
    assert "status_running" in jobs and "status_unknown" not in jobs
    for state in ("queued", "leased"):
        assert value(samples, "cortex_queue_depth", api_name=api.name, state=state) == 0
    assert value(samples, "cortex_workers", api_name=api.name, state="running") == 0
    # Only succeeded batches are timed, once each, as `average_time_per_batch` counts them.
    assert value(samples, "cortex_time_per_batch_count", api_name=api.name) == 5
    total_s = value(samples, "cortex_time_per_batch_sum", api_name=api.name)
    average = status["batch_metrics"]["average_time_per_batch"]
    assert total_s == pytest.approx(5 * average, rel=1e-6)
    assert value(samples, "cortex_time_per_batch_bucket", api_name=api.name, le="+Inf") == 5
    assert value(samples, "cortex_store_up") == 1
    assert set(series(samples, "cortex_replica_leader").values()) == {1}

    # A re-run of the failed batches is a new job of the same API: the counters go on.
    answer = httpx.post(f"{server.url}/{api.name}/{job_id}/retry_failed", json={}, timeout=30)
    retry = answer.json()["job_id"]
    assert wait_for_status(client, api.name, retry)["status"] == "status_completed_with_failures"
    samples = scrape(server.url)
    assert value(samples, "cortex_batch_succeeded_total", api_name=api.name) == 5
    assert value(samples, "cortex_batch_failed_total", api_name=api.name) == 4
    assert (
        value(samples, "cortex_jobs", api_name=api.name, status="status_completed_with_failures")
        == 2
    )


def test_queue_depth_and_workers_while_a_job_runs(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    # One worker holds the first batch for a minute; the two behind it stay in the queue.
    job_id = _submit(client, api.name, [{"sleep": 60}, "a", "b"], workers=1)

    def running() -> Samples | None:
        samples = scrape(server.url)
        workers = value(samples, "cortex_workers", api_name=api.name, state="running")
        leased = value(samples, "cortex_queue_depth", api_name=api.name, state="leased")
        return samples if workers == 1 and leased >= 1 else None

    samples = wait_for(running, 30, "the worker to run the first batch")
    queued = value(samples, "cortex_queue_depth", api_name=api.name, state="queued")
    leased = value(samples, "cortex_queue_depth", api_name=api.name, state="leased")
    assert queued + leased == 3  # the status's batches_in_queue
    assert value(samples, "cortex_jobs", api_name=api.name, status="status_running") == 1

    client.stop_job(api.name, job_id)

    def stopped() -> bool:
        samples = scrape(server.url)
        return (
            value(samples, "cortex_jobs", api_name=api.name, status="status_stopped") == 1
            and value(samples, "cortex_queue_depth", api_name=api.name, state="queued") == 0
            and value(samples, "cortex_queue_depth", api_name=api.name, state="leased") == 0
            and value(samples, "cortex_workers", api_name=api.name, state="running") == 0
        )

    wait_for(stopped, 30, "the stopped job to leave the queue and the worker gauges")
    assert value(scrape(server.url), "cortex_batch_succeeded_total", api_name=api.name) == 0


def test_request_latency_is_labelled_by_route_template(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    before = scrape(server.url)
    for _ in range(3):
        assert httpx.get(f"{server.url}/{api.name}").status_code == 200
    assert httpx.get(f"{server.url}/{api.name}/nope").status_code == 400
    after = scrape(server.url)

    def count(route: str, status: str) -> float:
        key = ("cortex_http_request_duration_seconds_count",
               frozenset({"method": "GET", "route": route, "status": status}.items()))  # fmt: skip
        return after.get(key, 0) - before.get(key, 0)

    assert count("/{api_name}", "200") == 3
    assert count("/{api_name}/{job_id}", "400") == 1
    # Paths never become labels: API names and job ids would make a series each.
    routes = {dict(k)["route"] for k in series(after, "cortex_http_request_duration_seconds_count")}
    assert not any(api.name in route for route in routes)


# -- several replicas ----------------------------------------------------------------------


@pytest.fixture
def two_replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    migrated = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "migrate", "--store", pg_url],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrated.returncode == 0, migrated.stderr
    started: list[Server] = []
    try:
        for name in ("a", "b"):
            started.append(start_server(tmp_path / name, CORTEX_STORE=pg_url))
        yield started[0], started[1]
    finally:
        for srv in started:
            stop_server(srv)


def test_replicas_export_what_each_counts_and_the_sums_are_exact(
    two_replicas: tuple[Server, Server], tmp_path: Path
) -> None:
    a, b = two_replicas
    with a.client() as client_a, b.client() as client_b:
        api = deploy_fixture(client_a, "recorder", tmp_path)
        # Each replica starts the first worker of the job it accepts (later ones are placed by
        # whichever replica's pass comes first), and a worker reports to the replica that
        # started it.
        job_a = _submit(client_a, api.name, ["x"] * 4 + ["fail"], max_attempts=1)
        job_b = _submit(client_b, api.name, ["y"] * 6 + ["fail"] * 2, max_attempts=1)
        for client, job_id in ((client_a, job_a), (client_b, job_b)):
            assert wait_for_status(client, api.name, job_id)["status"] == (
                "status_completed_with_failures"
            )
    on_a, on_b = scrape(a.url), scrape(b.url)
    # The store's series are the same on every replica: aggregate them with max, not sum.
    for samples in (on_a, on_b):
        assert value(samples, "cortex_batch_succeeded_total", api_name=api.name) == 10
        assert value(samples, "cortex_batch_failed_total", api_name=api.name) == 3
        assert value(samples, "cortex_jobs", api_name=api.name, status=(
            "status_completed_with_failures")) == 2  # fmt: skip
    # What a replica timed itself is its own: the sum over replicas is the whole.
    timed_a = value(on_a, "cortex_time_per_batch_count", api_name=api.name)
    timed_b = value(on_b, "cortex_time_per_batch_count", api_name=api.name)
    assert timed_a + timed_b == 10 and timed_a > 0 and timed_b > 0
    # Exactly one replica leads.
    leaders = [*series(on_a, "cortex_replica_leader").values(),
               *series(on_b, "cortex_replica_leader").values()]  # fmt: skip
    assert sorted(leaders) == [0, 1]
