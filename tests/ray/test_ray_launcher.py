"""The Ray launcher on a real two-node Ray cluster: placement, a killed actor, a stop, GPUs.

Slow (the cluster takes 15-45 s to start on a small machine): run with `make test-ray`, or
CORTEX_TEST_RAY=1 and Ray installed (`pip install -e '.[ray]'`).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cortex.client import Client
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    job_worker_processes,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("CORTEX_TEST_RAY") != "1", reason="Ray tests are slow: run `make test-ray`"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("ray")
    import raycluster

    started = raycluster.start(tmp_path_factory.mktemp("ray"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def ray_server(cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import raycluster

    assert isinstance(cluster, raycluster.Cluster)
    srv = start_server(
        tmp_path_factory.mktemp("ray-server"),
        CORTEX_LAUNCHER="ray",
        CORTEX_RAY_ADDRESS=cluster.address,
        **cluster.env,
    )
    yield srv
    stop_server(srv)


@pytest.fixture
def ray_client(ray_server: Server) -> Iterator[Client]:
    with ray_server.client() as c:
        yield c


def _submit(client: Client, api: str, items: list[object], workers: int) -> str:
    body = {"workers": workers, "item_list": {"items": items, "batch_size": 1}}
    return str(client.submit(api, body)["job_id"])


def _inits(api: DeployedApi, job_id: str) -> dict[str, dict[str, object]]:
    """What each worker recorded at start-up, by worker id."""
    return {
        p.name[len("init-") : -len(".json")]: json.loads(p.read_text())
        for p in (api.out / job_id).glob("init-*.json")
    }


def _attempts(api: DeployedApi, job_id: str) -> list[str]:
    path = api.out / job_id / "attempts.log"
    return path.read_text().split() if path.exists() else []


def _gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def test_workers_are_actors_on_both_nodes_and_the_job_succeeds(
    ray_client: Client, tmp_path: Path
) -> None:
    # The head has 2 CPUs and node2 1: three workers of one CPU each need both nodes.
    api = deploy_fixture(ray_client, "recorder", tmp_path, compute={"cpu": 1})
    items = [{"await_workers": 3}] * 3 + list(range(9))
    job_id = _submit(ray_client, api.name, items, 3)

    status = wait_for_status(ray_client, api.name, job_id, 120)

    assert status["status"] == "status_succeeded"
    assert status["batch_metrics"]["succeeded"] == 12
    inits = _inits(api, job_id)
    assert len(inits) == 3
    nodes = {init["env"]["CORTEX_RAY_NODE_ID"] for init in inits.values()}  # type: ignore[index]
    assert len(nodes) == 2 and None not in nodes
    assert len((api.out / job_id / "hook.log").read_text().splitlines()) == 1
    wait_for(lambda: not job_worker_processes(job_id), 20, "the workers to exit")


def test_a_killed_actor_is_replaced_and_the_job_finishes(
    ray_client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(ray_client, "recorder", tmp_path, compute={"cpu": 1})
    job_id = _submit(ray_client, api.name, [{"sleep": 0.3, "n": i} for i in range(16)], 2)
    wait_for(lambda: len(_attempts(api, job_id)) >= 3, 90, "batches to start")

    victim = job_worker_processes(job_id)[0]
    actor = victim.parent()
    assert actor is not None
    os.kill(actor.pid, signal.SIGKILL)  # Ray sees its actor die; the worker dies with it

    status = wait_for_status(ray_client, api.name, job_id, 120)
    assert status["status"] == "status_succeeded"
    assert status["batch_counts"] == {"queued": 0, "leased": 0, "succeeded": 16, "failed": 0}
    assert set(_attempts(api, job_id)) == {
        p.stem[len("batch-") :] for p in (api.out / job_id).glob("batch-*.json")
    }
    logs = "\n".join(ray_client.logs(api.name, job_id, follow=True))
    assert "was lost with its Ray actor" in logs and "starting a replacement" in logs
    wait_for(lambda: _gone([victim]), 10, "the killed actor's worker to be gone")


def test_stop_kills_the_actors_and_their_workers(ray_client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(ray_client, "recorder", tmp_path, compute={"cpu": 1})
    job_id = _submit(ray_client, api.name, [{"sleep": 0.3}] * 200, 2)
    wait_for(lambda: len(_attempts(api, job_id)) >= 4, 90, "batches to run")
    workers = job_worker_processes(job_id)
    actors = [p for p in (w.parent() for w in workers) if p is not None]
    assert len(workers) == 2 and len(actors) == 2

    ray_client.stop_job(api.name, job_id)

    assert ray_client.get_job(api.name, job_id)["job_status"]["status"] == "status_stopped"
    wait_for(lambda: _gone(workers + actors), 30, "the actors and their workers to be gone")


def test_gpus_are_ray_gpus(ray_client: Client, tmp_path: Path) -> None:
    # Only node2 has (two, declared) GPUs: both workers land there, one GPU each.
    api = deploy_fixture(ray_client, "recorder", tmp_path, compute={"cpu": "100m", "gpu": 1})
    job_id = _submit(ray_client, api.name, [{"await_workers": 2}] * 2, 2)

    status = wait_for_status(ray_client, api.name, job_id, 120)

    assert status["status"] == "status_succeeded"
    envs = [init["env"] for init in _inits(api, job_id).values()]
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0", "1"]  # type: ignore[index]
    assert len({e["CORTEX_RAY_NODE_ID"] for e in envs}) == 1  # type: ignore[index]
