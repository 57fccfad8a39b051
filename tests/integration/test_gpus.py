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


def test_each_worker_gets_its_own_gpus_and_jobs_wait_for_devices(
    gpu_server: Server, tmp_path: Path
) -> None:
    with gpu_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path, compute={"gpu": 2})
        too_big = deploy_fixture(client, "recorder", tmp_path, compute={"gpu": 5})

    # One worker that could never fit is refused; a job that fits waits for devices.
    code, body = _post(gpu_server, too_big.name, 1, [1])
    assert code == 400
    assert body["kind"] == "batchapi.insufficient_gpus"
    assert "needs 5 GPUs; this server has 4" in body["message"]

    # Each worker holds its devices for a batch of 3 s after both have started.
    items: list[object] = [{"await_workers": 2}] * 2 + [{"sleep": 3}] * 2
    code, first = _post(gpu_server, api.name, 2, items)
    assert code == 200
    with gpu_server.client() as client:
        wait_for(
            lambda: len(list((api.out / first["job_id"]).glob("init-*.json"))) == 2,
            30,
            "both workers of the first job to hold two GPUs each",
        )
    # Its workers hold all four devices until they exit: another GPU job is accepted, and
    # its worker waits as pending, with the reason, until they are given back.
    code, second = _post(gpu_server, api.name, 1, [1])
    assert code == 200
    with gpu_server.client() as client:
        status = client.get_job(api.name, second["job_id"])["job_status"]
        assert "gpu=2 (free 0)" in status["pending_reason"]
        assert status["worker_counts"]["pending"] == 1
        status = wait_for_status(client, api.name, first["job_id"])
        assert status["status"] == "status_succeeded"
        assert _devices(api, first["job_id"]) == ["0,1", "2,3"]
        assert wait_for_status(client, api.name, second["job_id"])["status"] == "status_succeeded"
    assert len(_devices(api, second["job_id"])) == 1


def test_a_worker_without_gpus_sees_none(gpu_server: Server, tmp_path: Path) -> None:
    with gpu_server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = client.submit(
            api.name, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
        )["job_id"]
        assert wait_for_status(client, api.name, job_id)["status"] == "status_succeeded"
    assert _devices(api, job_id) == [""]
