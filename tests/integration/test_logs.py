"""Job logs with real worker processes: capture, aggregation, follow, crashes, big logs."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

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


def _run(client: Client, api: DeployedApi, items: list, **extra: object) -> str:
    body = {"workers": extra.pop("workers", 1), "item_list": {"items": items, "batch_size": 1}}
    body.update(extra)
    job_id = str(client.submit(api.name, body)["job_id"])
    wait_for_status(client, api.name, job_id, 60)
    return job_id


def _json_lines(client: Client, api: str, job_id: str, **params: object) -> list[dict]:
    response = client._request(
        # follow: the job has ended, so this returns once every worker's lines are in.
        "GET",
        f"/{api}/logs",
        params={"jobID": job_id, "format": "json", "follow": True, **params},
    )
    return [json.loads(line) for line in response.text.splitlines()]


def test_everything_a_worker_says_is_captured_with_its_context(
    client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    items = [
        {"stderr": "to stderr"},
        {"log": "a warning"},
        {"fd2": "straight to fd 2"},
        "fail",
    ]
    job_id = _run(client, api, items, max_attempts=1)
    lines = _json_lines(client, api.name, job_id)

    def find(text: str) -> dict:
        matches = [line for line in lines if text in line["message"]]
        assert matches, f"{text!r} not in {[line['message'] for line in lines]}"
        return matches[0]

    printed = find("done ")
    assert printed["stream"] == "stdout" and printed["worker"] == "worker-0"
    assert printed["batch_id"] and printed["message"] == f"done {printed['batch_id']}"
    assert find("to stderr")["stream"] == "stderr"
    warning = find("a warning")
    assert warning["stream"] == "log" and warning["level"] == "WARNING"
    assert warning["message"] == "recorder: a warning"
    assert find("straight to fd 2")["stream"] == "output"  # bypassed Python, kept at exit
    traceback = find("ValueError: cannot handle item 'fail'")
    assert traceback["level"] == "ERROR" and traceback["batch_id"]
    # The server's own lines about the job are in the same stream.
    for text in (
        "partitioning 4 items found in job submission into 4 batches of size 1",
        "started 1 worker",
        "job status: status_completed_with_failures",
    ):
        assert find(text)["worker"] == "server"
    assert [line["chunk"] for line in lines] == sorted(line["chunk"] for line in lines)

    text = client._request("GET", f"/{api.name}/{job_id}/logs").text
    assert " worker-0 stdout [batch " in text and " server INFO started 1 worker" in text


def test_lines_of_two_workers_are_in_time_order_per_worker(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _run(client, api, [{"sleep": 0.05, "n": i} for i in range(20)], workers=2)
    lines = _json_lines(client, api.name, job_id)
    workers = {line["worker"] for line in lines} - {"server"}
    assert workers == {"worker-0", "worker-1"}
    for worker in workers:
        stamps = [line["ts"] for line in lines if line["worker"] == worker]
        assert stamps == sorted(stamps)
        assert len([ln for ln in lines if ln["worker"] == worker and "done" in ln["message"]]) > 0
    only_one = _json_lines(client, api.name, job_id, worker="1")
    assert {line["worker"] for line in only_one} == {"worker-1"}
    batch = next(line["batch_id"] for line in lines if line["batch_id"])
    assert {line["batch_id"] for line in _json_lines(client, api.name, job_id, batch=batch)} == {
        batch
    }


def test_a_follower_started_before_the_job_sees_every_line_exactly_once(
    server: Server, tmp_path: Path
) -> None:
    with server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        body = {"workers": 2, "item_list": {"items": [{"sleep": 0.02}] * 30, "batch_size": 1}}
        job_id = str(client.submit(api.name, body)["job_id"])
    followed: list[str] = []

    def follow() -> None:
        with server.client() as c:
            followed.extend(c.logs(api.name, job_id, follow=True))

    thread = threading.Thread(target=follow)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "following did not end when the job ended"
    with server.client() as client:
        assert client.get_job(api.name, job_id)["job_status"]["status"] == "status_succeeded"
        # Arrival order, as a follower reads (without follow an ended job's log is in time
        # order: the same lines, in another order).
        everything = list(client.logs(api.name, job_id, follow=True))
        by_time = list(client.logs(api.name, job_id))
    assert followed == everything
    assert sorted(followed) == sorted(by_time)
    assert len([line for line in followed if " done " in line]) == 30
    assert "job status: status_succeeded" in "\n".join(followed)


def test_the_crash_message_of_a_dead_worker_is_kept(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _run(client, api, [{"segfault": True}], max_attempts=1)
    text = "\n".join(client.logs(api.name, job_id, follow=True))
    assert "Fatal Python error: Segmentation fault" in text
    assert "was killed by SIGSEGV" in text


def test_the_tail_of_a_million_line_log_is_quick(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _run(client, api, [{"lines": 1_000_000}])
    list(client.logs(api.name, job_id, tail=1, follow=True))  # every line is in
    started = time.perf_counter()
    tail = list(client.logs(api.name, job_id, tail=10, worker="0"))
    elapsed = time.perf_counter() - started
    assert len(tail) == 10
    assert tail[-1].endswith("cortex: no batches left in queue, job has been completed")
    assert any(line.endswith(" line 999999") for line in tail)
    assert elapsed < 1.0


def test_the_server_log_can_be_json_lines(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "server", CORTEX_LOG_FORMAT="json")
    try:
        with srv.client() as client:
            api = deploy_fixture(client, "recorder", tmp_path)
            _run(client, api, [1])
    finally:
        stop_server(srv)
    entries = [json.loads(line) for line in srv.log().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(entry["message"].endswith("job status: status_succeeded") for entry in entries)


def test_a_failing_init_traceback_is_in_the_log_before_the_final_status(
    client: Client, tmp_path: Path
) -> None:
    """It was missing from the log in 4 runs of 6: the worker reported the failure (which ends
    the job) before its log shipper had sent the traceback. Read as soon as the job has
    ended, the log holds it, every time."""
    api = deploy_fixture(client, "failing_init", tmp_path)
    for _ in range(6):
        job_id = client.submit(
            api.name, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
        )["job_id"]
        status = wait_for_status(client, api.name, job_id, timeout_s=20)
        assert status["status"] == "status_worker_error", status
        lines = list(client.logs(api.name, job_id))
        worker = [line for line in lines if " worker-" in line[:40]]
        text = "\n".join(worker)
        assert "failed to initialise the predictor" in text, lines
        assert "Traceback (most recent call last)" in text, lines
        assert "RuntimeError: model weights missing" in text, lines


def test_the_log_of_an_ended_job_reads_in_time_order(
    server: Server, client: Client, tmp_path: Path
) -> None:
    """Three workers ship every 100 ms and the server writes its lines at once: in arrival
    order `job status: status_succeeded` could come before the hook's `executing
    on_job_complete`. Read after the end, the lines are in time order, each once."""
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _run(client, api, [{"lines": 30}] * 9, workers=3)
    wait_for(lambda: not server.worker_processes(job_id), 15, "the job's workers to exit")
    followed = _json_lines(client, api.name, job_id)  # arrival order, every line
    read = [
        json.loads(line)
        for line in client._request(
            "GET", f"/{api.name}/logs", params={"jobID": job_id, "format": "json"}
        ).text.splitlines()
    ]
    stamps = [line["ts"] for line in read]
    assert stamps == sorted(stamps)
    key = [(line["ts"], line["worker"], line["message"]) for line in read]
    assert sorted(key) == sorted((x["ts"], x["worker"], x["message"]) for x in followed)
    messages = [line["message"] for line in read]
    hook = next(i for i, m in enumerate(messages) if m.endswith("executing on_job_complete"))
    assert hook < messages.index("job status: status_succeeded")
    # The text form (what `cortex logs` prints) is in the same order.
    text = list(client.logs(api.name, job_id))
    assert [line[:24] for line in text] == sorted(line[:24] for line in text)
    tail = list(client.logs(api.name, job_id, tail=40))
    assert len(tail) == 40 and [line[:24] for line in tail] == sorted(line[:24] for line in tail)
