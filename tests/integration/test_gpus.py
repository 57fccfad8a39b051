"""GPUs on the local launcher: each worker gets its own devices through CUDA_VISIBLE_DEVICES.

The server is told of four devices (CORTEX_GPUS), so this runs on any machine: the workers
only see the variable, as a CUDA program would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("gpu-server"), CORTEX_GPUS="0,1,2,3")
    yield srv
    stop_server(srv)


def _post(server: Server, api: str, workers: int, items: list[object]) -> tuple[int, dict]:
    body = {"workers": workers, "item_list": {"items": items, "batch_size": 1}}
    with server.http() as http:
        response = http.post(f"/{api}", json=body)
    return response.status_code, response.json()


def _devices(api: DeployedApi, job_id: str) -> list[str]:
    inits = (api.out / job_id).glob("init-*.json")
    return sorted(json.loads(p.read_text())["env"]["CUDA_VISIBLE_DEVICES"] for p in inits)


def test_each_worker_gets_its_own_gpus_and_a_job_asking_too_many_is_refused(
    gpu_server: Server, tmp_path: Path
) -> None:
    with gpu_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path, compute={"gpu": 2})

    code, body = _post(gpu_server, api.name, 3, [1])
    assert code == 400
    assert body["kind"] == "batchapi.insufficient_gpus"
    assert "needs 6 GPUs (3 workers x 2); this server has 4" in body["message"]

    code, first = _post(gpu_server, api.name, 2, [{"await_workers": 2}] * 2 + [1, 2])
    assert code == 200
    # Its workers hold all four devices until they exit: another GPU job is refused meanwhile.
    code, body = _post(gpu_server, api.name, 1, [1])
    assert code == 400 and body["kind"] == "batchapi.insufficient_gpus"
    assert "0 of this server's 4 are free" in body["message"]

    with gpu_server.client() as client:
        status = wait_for_status(client, api.name, first["job_id"])
    assert status["status"] == "status_succeeded"
    assert _devices(api, first["job_id"]) == ["0,1", "2,3"]

    # Freed once the workers have exited: the same job fits again.
    def resubmitted() -> dict | None:
        code, body = _post(gpu_server, api.name, 2, [1])
        return body if code == 200 else None

    second = wait_for(resubmitted, 20, "the GPUs to be given back")
    with gpu_server.client() as client:
        assert wait_for_status(client, api.name, second["job_id"])["status"] == "status_succeeded"


def test_a_worker_without_gpus_sees_none(gpu_server: Server, tmp_path: Path) -> None:
    with gpu_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = client.submit(
            api.name, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
        )["job_id"]
        assert wait_for_status(client, api.name, job_id)["status"] == "status_succeeded"
    assert _devices(api, job_id) == [""]
