"""Jobs end to end: a real server, real worker processes, real HTTP on loopback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cortex.client import Client
from helpers import DeployedApi, Server, deploy_fixture, wait_for, wait_for_status


def _submit(client: Client, api: str, items: list, batch_size: int = 1, **extra) -> str:
    body = {
        "workers": extra.pop("workers", 2),
        "item_list": {"items": items, "batch_size": batch_size},
    }
    body.update(extra)
    return client.submit(api, body)["job_id"]


def _job_out(api: DeployedApi, job_id: str) -> Path:
    return api.out / job_id


def test_job_runs_to_success_and_the_pool_goes_back_to_zero(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path, config={"nested": {"a": 1, "b": 2}})
    items = list(range(10))
    job_id = _submit(client, api.name, items, batch_size=3, config={"nested": {"b": 3}})

    status = wait_for_status(client, api.name, job_id)

    assert status["status"] == "status_succeeded"
    assert status["total_batch_count"] == 4
    assert status["batch_metrics"]["succeeded"] == 4
    assert status["batch_metrics"]["failed"] == 0
    assert status["batch_metrics"]["average_time_per_batch"] > 0
    assert status["end_time"] is not None
    assert status["worker_counts"] is None
    assert status["batches_in_queue"] == 0
    out = _job_out(api, job_id)
    seen = sorted(i for f in out.glob("batch-*.json") for i in json.loads(f.read_text()))
    assert seen == items
    # The hook ran exactly once, after every batch.
    assert len((out / "hook.log").read_text().splitlines()) == 1
    # config: the API's deep-merged with the job's, the job winning; job_spec as the spec says.
    init = json.loads(next(out.glob("init-*.json")).read_text())
    assert init["config"]["nested"] == {"a": 1, "b": 3}
    for key in ("job_id", "api_name", "workers", "config", "total_batch_count", "start_time"):
        assert key in init["job_spec"]
    assert init["job_spec"]["total_batch_count"] == 4
    assert init["job_spec"]["config"] == {"nested": {"b": 3}}
    wait_for(lambda: not server.worker_processes(), 10, "worker processes to exit")


def test_failed_batches_are_retried_then_recorded(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _submit(client, api.name, ["ok", "fail", "fail-once"], max_attempts=2)

    status = wait_for_status(client, api.name, job_id)

    assert status["status"] == "status_completed_with_failures"
    assert status["batch_metrics"] == {
        "succeeded": 2,
        "failed": 1,
        "average_time_per_batch": status["batch_metrics"]["average_time_per_batch"],
    }
    attempts = (_job_out(api, job_id) / "attempts.log").read_text().split()
    # 1 + 2 (fail, same batch id both times) + 2 (fail-once) attempts.
    assert len(attempts) == 5
    failed = client._json("GET", f"/{api.name}/{job_id}/failed_batches")["failed_batches"]
    assert len(failed) == 1
    assert failed[0]["attempts"] == 2
    assert attempts.count(failed[0]["batch_id"]) == 2
    assert "ValueError: cannot handle item 'fail'" in failed[0]["error"]
    assert "Traceback" in failed[0]["traceback"]
    # The hook still runs once for a job with failures.
    assert len((_job_out(api, job_id) / "hook.log").read_text().splitlines()) == 1


def test_predictor_init_failure_ends_the_job_as_worker_error(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "failing_init", tmp_path)
    submitted = time.monotonic()
    job_id = _submit(client, api.name, [1, 2, 3])

    status = wait_for_status(client, api.name, job_id, timeout_s=10)

    assert time.monotonic() - submitted < 10
    assert status["status"] == "status_worker_error"
    assert "model weights missing" in status["error"]["message"]
    assert "RuntimeError: model weights missing" in status["error"]["traceback"]
    wait_for(lambda: not server.worker_processes(), 10, "worker processes to exit")


def test_stop_ends_the_job_and_its_workers(server: Server, client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _submit(client, api.name, [{"sleep": 0.2}] * 200, workers=2)
    wait_for(
        lambda: client.get_job(api.name, job_id)["job_status"]["batch_metrics"]["succeeded"] >= 2,
        20,
        "a few batches to succeed",
    )
    # The second worker starts once the first has loaded the predictor.
    wait_for(
        lambda: client.get_job(api.name, job_id)["job_status"]["worker_counts"]["running"] == 2,
        20,
        "both workers to run",
    )

    assert client.stop_job(api.name, job_id) == {"message": f"stopped job {job_id}"}
    stopped_at = time.monotonic()

    status = client.get_job(api.name, job_id)["job_status"]
    assert status["status"] == "status_stopped"
    assert status["end_time"] is not None
    # The grace period is 1 s here; processes are gone soon after it.
    wait_for(lambda: not server.worker_processes(), 5, "worker processes to be stopped")
    assert time.monotonic() - stopped_at < 5
    done = client.get_job(api.name, job_id)["job_status"]["batch_metrics"]["succeeded"]
    # No batch is leased, and none counted, after the stop.
    assert done == status["batch_metrics"]["succeeded"]
    assert done < 200

    with pytest.raises(Exception) as err:
        client.stop_job(api.name, job_id)
    assert getattr(err.value, "kind", None) == "batchapi.job_is_not_in_progress"


def test_stop_by_path(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _submit(client, api.name, [{"sleep": 0.2}] * 50, workers=1)
    assert client._json("DELETE", f"/{api.name}/{job_id}") == {"message": f"stopped job {job_id}"}
    assert client._json("GET", f"/{api.name}/{job_id}")["job_status"]["status"] == "status_stopped"


def test_timeout_ends_the_job_as_timed_out(server: Server, client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _submit(client, api.name, [{"sleep": 0.5}] * 100, workers=1, timeout=1)

    status = wait_for_status(client, api.name, job_id, timeout_s=10)

    assert status["status"] == "status_timed_out"
    assert "timeout of 1 seconds" in status["error"]["message"]
    elapsed = status_seconds(status)
    assert 1.0 <= elapsed < 2.0
    wait_for(lambda: not server.worker_processes(), 5, "worker processes to be stopped")


def status_seconds(status: dict) -> float:
    from datetime import datetime

    def parse(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    return parse(status["end_time"]) - parse(status["start_time"])


def test_on_job_complete_can_chain_the_next_job(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    nxt = deploy_fixture(client, "recorder", tmp_path)
    first = _submit(client, api.name, [1, 2], config={"chain_to": nxt.name})

    assert wait_for_status(client, api.name, first)["status"] == "status_succeeded"

    chained = json.loads((_job_out(api, first) / "chained.json").read_text())
    assert chained["config"] == {"chained_from": first}
    status = wait_for_status(client, nxt.name, chained["job_id"])
    assert status["status"] == "status_succeeded"


def test_a_running_job_keeps_the_spec_and_code_it_started_with(
    client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path, config={"version": 1})
    old = _submit(client, api.name, [{"sleep": 0.3}, 1, 2], workers=1)
    # Change code and config while the job runs.
    code = api.folder / "predictor.py"
    code.write_text(code.read_text().replace('print(f"done', 'print(f"v2 done'))
    deploy_fixture(client, "recorder", tmp_path, name=api.name, config={"version": 2})
    new = _submit(client, api.name, [1], workers=1)

    assert wait_for_status(client, api.name, old)["status"] == "status_succeeded"
    assert wait_for_status(client, api.name, new)["status"] == "status_succeeded"
    old_init = json.loads(next(_job_out(api, old).glob("init-*.json")).read_text())
    new_init = json.loads(next(_job_out(api, new).glob("init-*.json")).read_text())
    assert old_init["version"] == 1
    assert new_init["version"] == 2
    specs = {client.get_job(api.name, job)["job_status"]["spec_id"] for job in (old, new)}
    assert len(specs) == 2


def test_jobs_are_listed_newest_first(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    first = _submit(client, api.name, [1], workers=1)
    second = _submit(client, api.name, [1], workers=1)
    for job in (first, second):
        wait_for_status(client, api.name, job)
    listed = [job["job_id"] for job in client.list_jobs(api.name)]
    assert listed == [second, first]
    summary = client.get_api(api.name)["batch_api"]
    assert [job["job_id"] for job in summary["job_statuses"]] == [second, first]
    assert summary["endpoint"].endswith(f"/{api.name}")


def test_items_and_configs_reach_the_predictor_exactly_big_integers_included(
    client: Client, tmp_path: Path
) -> None:
    """orjson reads integers past 64 bits as floats (2**64 + 1 arrived as 2**64, a float):
    each value reaches `predict` and `__init__` as it was submitted."""
    big = [2**64 + 1, -(2**63) - 1, 2**200 + 7, {"n": -(10**30) - 1}, 18446744073709551615]
    text = ["12345678901234567890123", 1.5, -0.25, 9223372036854775807]
    api = deploy_fixture(client, "recorder", tmp_path, config={"api_big": 2**70 + 1})
    job_id = _submit(
        client, api.name, big + text, batch_size=3, workers=1, config={"job_big": -(2**90)}
    )
    status = wait_for_status(client, api.name, job_id)
    assert status["status"] == "status_succeeded", status
    assert status["config"] == {"job_big": -(2**90)}  # the status answer keeps it too
    out = _job_out(api, job_id)
    batches = [json.loads(f.read_text()) for f in out.glob("batch-*.json")]
    seen = sorted((i for b in batches for i in b), key=repr)
    assert seen == sorted(big + text, key=repr)
    assert all(type(a) is type(b) for a, b in zip(seen, sorted(big + text, key=repr), strict=True))
    init = json.loads(next(out.glob("init-*.json")).read_text())
    assert init["config"]["api_big"] == 2**70 + 1 and init["config"]["job_big"] == -(2**90)
