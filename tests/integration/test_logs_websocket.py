"""The log websockets of the Cortex CLI, `/logs/<api>?jobID=` and `/logs/<api>/<job_id>`, on a
real server with real workers: one text frame per line, close 1000 at the end, refusals, auth."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

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

TOKEN = "s3cret"
IN_PROGRESS = ("status_enqueuing", "status_running")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a token, logging at debug level (which says when a log socket closes)."""
    srv = start_server(
        tmp_path_factory.mktemp("guarded"), CORTEX_AUTH_TOKEN=TOKEN, CORTEX_LOG_LEVEL="debug"
    )
    yield srv
    stop_server(srv)


def _ws(server: Server, path: str) -> str:
    return server.url.replace("http://", "ws://", 1) + path


def _open(url: str, token: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return connect(url, additional_headers=headers, open_timeout=10)


def _receive_all(socket: ClientConnection, timeout_s: float = 30) -> tuple[list[str], int | None]:
    """Every frame until the server closes the socket, and the close code it sent."""
    frames: list[str] = []
    try:
        while True:
            frame = socket.recv(timeout=timeout_s)
            assert isinstance(frame, str), f"a binary frame: {frame!r}"
            frames.append(frame)
    except ConnectionClosed as closed:
        return frames, closed.rcvd.code if closed.rcvd else None


def _frames(url: str, token: str | None = None) -> tuple[list[str], int | None]:
    with _open(url, token) as socket:
        return _receive_all(socket)


def _refusal(url: str, token: str | None = None) -> tuple[int, dict]:
    with pytest.raises(InvalidStatus) as refused:
        _open(url, token).close()
    return refused.value.response.status_code, json.loads(refused.value.response.body or b"")


def _finished_job(client: Client, api: DeployedApi, items: list) -> str:
    body = {"workers": 1, "item_list": {"items": items, "batch_size": 1}, "max_attempts": 1}
    job_id = str(client.submit(api.name, body)["job_id"])
    wait_for_status(client, api.name, job_id, 60)
    return job_id


def test_a_finished_jobs_lines_come_one_frame_each_as_over_http_then_close_1000(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _finished_job(client, api, [{"stderr": "to stderr"}, "fail", 1, 2])

    def http(**params: object) -> str:
        # follow: the job has ended, so this returns once every worker's lines are in.
        query = {"jobID": job_id, "follow": True, **params}
        return client._request("GET", f"/{api.name}/logs", params=query).text

    # v0.21: /logs/<api>?jobID=, JSON lines: each frame is exactly one line of the HTTP body.
    frames, code = _frames(_ws(server, f"/logs/{api.name}?jobID={job_id}&format=json"))
    assert code == 1000
    assert frames == http(format="json").splitlines(keepends=True)
    assert [json.loads(frame)["chunk"] for frame in frames] == sorted(
        json.loads(frame)["chunk"] for frame in frames
    )
    # v0.20: /logs/<api>/<job_id>, text: one frame per line too (a traceback's rows included).
    text, code = _frames(_ws(server, f"/logs/{api.name}/{job_id}"))
    assert code == 1000
    assert text == http().splitlines(keepends=True)
    assert len(text) == len(frames)
    assert any("ValueError: cannot handle item 'fail'" in frame for frame in text)
    assert any(" worker-0 stderr [batch " in frame for frame in text)
    # The HTTP route's options, with the same meaning.
    tail, code = _frames(_ws(server, f"/logs/{api.name}/{job_id}?tail=3&worker=0"))
    assert code == 1000 and len(tail) == 3
    assert "".join(tail) == http(tail=3, worker="0")
    assert all(" worker-0 " in frame for frame in tail)


def test_a_follower_sees_every_line_once_and_the_socket_closes_when_the_job_ends(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    body = {"workers": 2, "item_list": {"items": [{"sleep": 0.02}] * 30, "batch_size": 1}}
    job_id = str(client.submit(api.name, body)["job_id"])
    # follow is the websocket's default: no parameter asks for it.
    with _open(_ws(server, f"/logs/{api.name}?jobID={job_id}&format=json")) as socket:
        status = client.get_job(api.name, job_id)["job_status"]["status"]
        assert status in IN_PROGRESS, "the job ended before it could be followed"
        frames, code = _receive_all(socket)
    assert code == 1000
    assert client.get_job(api.name, job_id)["job_status"]["status"] == "status_succeeded"
    everything = client._request(  # arrival order, as the follower read it
        "GET", f"/{api.name}/{job_id}/logs", params={"format": "json", "follow": True}
    ).text.splitlines(keepends=True)
    assert frames == everything
    lines = [json.loads(frame) for frame in frames]
    chunks = [line["chunk"] for line in lines]
    assert chunks == sorted(chunks)
    assert len([line for line in lines if line["message"].startswith("done ")]) == 30
    assert "job status: status_succeeded" in [line["message"] for line in lines]


def test_an_unknown_api_or_job_or_a_missing_job_id_is_refused_with_the_http_error(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job_id = _finished_job(client, api, [1])
    log_before = len(server.log())
    cases = {
        "/logs/no-such-api?jobID=abc": "/no-such-api/logs?jobID=abc",
        "/logs/no-such-api/abc": "/no-such-api/abc/logs",
        f"/logs/{api.name}/no-such-job": f"/{api.name}/no-such-job/logs",
        f"/logs/{api.name}": f"/{api.name}/logs",
        f"/logs/{api.name}/{job_id}?tail=-1": f"/{api.name}/{job_id}/logs?tail=-1",
        f"/logs/{api.name}?jobID={job_id}&since=1y": f"/{api.name}/logs?jobID={job_id}&since=1y",
        f"/logs/{api.name}/{job_id}?format=xml": f"/{api.name}/{job_id}/logs?format=xml",
    }
    kinds = set()
    with server.http() as http:
        for socket_path, http_path in cases.items():
            expected = http.get(http_path)
            assert expected.status_code == 400, http_path
            status, error = _refusal(_ws(server, socket_path))
            assert (status, error) == (400, expected.json()), socket_path
            kinds.add(error["kind"])
    assert kinds == {
        "resources.api_not_deployed",
        "batchapi.job_not_found",
        "endpoints.logs_job_id_required",
        "request.invalid",
    }
    # Refused cleanly: no traceback, no error logged.
    assert not [line for line in server.log()[log_before:].splitlines() if " ERROR " in line]
    assert "Traceback" not in server.log()[log_before:]


def test_a_websocket_needs_the_server_token(guarded: Server, tmp_path: Path) -> None:
    with Client(guarded.url, token=TOKEN) as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = _finished_job(client, api, [1])
        expected = client._request("GET", f"/{api.name}/{job_id}/logs?follow=true").text
    url = _ws(guarded, f"/logs/{api.name}?jobID={job_id}")
    for token in (None, "s3cre", "s3cret-not", "nope"):
        status, error = _refusal(url, token)
        assert status == 401 and error["kind"] == "auth.unauthorized", token
    # A refused socket learns nothing, not even whether the API exists.
    assert _refusal(_ws(guarded, "/logs/no-such-api?jobID=abc"))[0] == 401
    frames, code = _frames(url, TOKEN)
    assert code == 1000 and "".join(frames) == expected
    assert TOKEN not in guarded.log()


def test_a_follower_that_leaves_stops_its_stream_at_once(guarded: Server, tmp_path: Path) -> None:
    with Client(guarded.url, token=TOKEN) as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        body = {"workers": 1, "item_list": {"items": [{"sleep": 30}], "batch_size": 1}}
        job_id = str(client.submit(api.name, body)["job_id"])
        with _open(_ws(guarded, f"/logs/{api.name}/{job_id}"), TOKEN) as socket:
            wait_for(lambda: "cortex: processing batch" in str(socket.recv(timeout=10)))
        # The job says nothing more for 30 s, so no failed send would tell the server that the
        # client left: the stream must end anyway, now.
        wait_for(
            lambda: f"log socket of job {job_id} closed: the client left" in guarded.log(),
            5,
            "the server to end the stream of the socket that left",
        )
        assert client.get_job(api.name, job_id)["job_status"]["status"] in IN_PROGRESS
        client.stop_job(api.name, job_id)


def test_a_follower_of_a_job_whose_api_is_deleted_is_closed(
    guarded: Server, tmp_path: Path
) -> None:
    with Client(guarded.url, token=TOKEN) as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        body = {"workers": 1, "item_list": {"items": [{"sleep": 0.5}] * 60, "batch_size": 1}}
        job_id = str(client.submit(api.name, body)["job_id"])
        with _open(_ws(guarded, f"/logs/{api.name}/{job_id}"), TOKEN) as socket:
            assert "partitioning 60 items" in str(socket.recv(timeout=10))
            client.delete_api(api.name)
            # The job and its log are gone: nothing more will come, so the stream ends.
            _, code = _receive_all(socket, timeout_s=10)
        assert code == 1000
