"""The Ray launcher on a real two-node Ray cluster (on loopback: see conftest.py): placement,
a killed actor, a stop, GPUs, and API environments built on the nodes (requirements.txt,
dependencies.sh, .env).

Slow: run with `make test-ray`, or CORTEX_TEST_RAY=1 and Ray installed
(`pip install -e '.[ray]'`). The environment tests install small packages from the registry.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from cortex.client import Client
from helpers import (
    FIXTURES,
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
def ray_server(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # `cluster`: the two-node loopback cluster of this folder's conftest.
    srv = start_server(
        tmp_path_factory.mktemp("ray-server"),
        CORTEX_LAUNCHER="ray",
        CORTEX_RAY_ADDRESS=cluster.address,
        CORTEX_DATA_ROOTS=str(tmp_path_factory.getbasetemp()),
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


def test_actors_read_batches_stored_by_reference(ray_client: Client, tmp_path: Path) -> None:
    """A `delimited_files` dataset on Ray: the workers in the actors read their batches' byte
    ranges with the same code as local workers, and get the copy's payloads."""
    path = tmp_path / "lines.jsonl"
    lines = b'\xef\xbb\xbf{"n": 0}\r\n\n{"n": 1, "t": "\xc3\xa9"}\n{"n": 2} {"n": 3}\n{"n": 4}'
    path.write_bytes(lines)
    api = deploy_fixture(ray_client, "recorder", tmp_path, compute={"cpu": 1})
    body = {"workers": 2, "delimited_files": {"s3_paths": [str(path)], "batch_size": 2}}
    job_id = str(ray_client.submit(api.name, body)["job_id"])
    status = wait_for_status(ray_client, api.name, job_id, 120)
    assert status["status"] == "status_succeeded", status
    batches = [json.loads(p.read_text()) for p in (api.out / job_id).glob("batch-*.json")]
    batches.sort(key=lambda batch: batch[0]["n"])
    assert batches == [
        [{"n": 0}, {"n": 1, "t": "é"}],
        [{"n": 2}, {"n": 3}],
        [{"n": 4}],
    ]


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

    # The second worker starts once the first has loaded the predictor (slow start).
    def both() -> list[psutil.Process] | None:
        procs = job_worker_processes(job_id)
        return procs if len(procs) == 2 else None

    workers = wait_for(both, 90, "both workers")
    actors = [p for p in (w.parent() for w in workers) if p is not None]
    assert len(actors) == 2

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


# -- API environments on Ray --------------------------------------------------------------------

# Builds download from the registry the first time: generous, but bounded.
BUILD_S = 120.0


def _env_project(
    root: Path,
    name: str,
    *,
    requirements: str | None = None,
    dependencies: str | None = None,
    dotenv: str | None = None,
    env: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A project with the reporting predictor (one JSON report per batch) and the given
    environment files."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "predictor.py").write_text((FIXTURES / "envreport" / "predictor.py").read_text())
    for filename, text in (
        ("requirements.txt", requirements),
        ("dependencies.sh", dependencies),
        (".env", dotenv),
    ):
        if text is not None:
            (folder / filename).write_text(text)
    api = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {
            "type": "python",
            "path": "predictor.py",
            "config": {"out": str(root / f"{name}-out"), **(config or {})},
            "env": env or {},
        },
        "compute": {"cpu": 1},
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    return folder


def _deploy(client: Client, folder: Path) -> None:
    """Deploy; the server builds the environment first (it checks the files at deploy)."""
    [result] = client.deploy(folder / "cortex.yaml")
    name = result["api_name"]

    def built() -> str | None:
        state = str(client.environment(name)["state"])
        return None if state == "building" else state

    assert wait_for(built, BUILD_S, "the server's build to end") == "ready"


def _reports(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / f"{name}-out").glob("*.json"))]


@pytest.mark.timeout(2 * BUILD_S + 60)
def test_an_api_environment_on_ray_has_its_pins_dotenv_and_dependencies_sh(
    ray_client: Client, ray_server: Server, cluster: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "dependencies-runs.log"
    folder = _env_project(
        tmp_path,
        "ray-env",
        # pydantic<2: the server's own pydantic is 2; a pin of it must not reach the actor.
        requirements="humanize==4.9.0\npydantic<2\n",
        dependencies=(
            'echo "dependencies.sh runs in $VIRTUAL_ENV"\n'
            f'echo "$VIRTUAL_ENV" >> "{runs}"\n'
            'echo built-by-deps > "$VIRTUAL_ENV/deps-marker.txt"\n'
        ),
        dotenv="GREETING=hello\nOVERRIDDEN=from-dotenv\n",
        env={"OVERRIDDEN": "from-yaml"},
        config={
            "modules": ["humanize", "pydantic"],
            "vars": ["GREETING", "OVERRIDDEN", "VIRTUAL_ENV", "PATH", "CORTEX_RAY_NODE_ID"],
        },
    )
    _deploy(ray_client, folder)
    server_envs = (ray_server.data_dir / "envs").resolve()
    # Three workers of one CPU: both nodes; their actors build the environment at once.
    job_id = _submit(ray_client, "ray-env", list(range(6)), 3)

    status = wait_for_status(ray_client, "ray-env", job_id, BUILD_S)

    assert status["status"] == "status_succeeded", status
    reports = _reports(tmp_path, "ray-env")
    assert len(reports) == 6
    for report in reports:
        prefix = Path(report["prefix"]).resolve()
        # The node's own environment, in its Ray session's folder: not the server's.
        assert prefix.is_relative_to(cluster.temp_dir.resolve()), report
        assert not str(prefix).startswith(str(server_envs))
        assert report["versions"]["humanize"][0] == "4.9.0"
        assert report["versions"]["pydantic"][0].startswith("1."), report
        assert Path(report["versions"]["humanize"][1]).resolve().is_relative_to(prefix)
        # The worker runtime pulled none of the server's dependencies in.
        assert report["server_modules"] == []
        variables = report["vars"]
        assert variables["GREETING"] == "hello"
        assert variables["OVERRIDDEN"] == "from-yaml"  # predictor.env wins over .env
        # The environment activated is the node's; nothing of the server's machine leaks.
        assert Path(variables["VIRTUAL_ENV"]).resolve() == prefix
        assert variables["PATH"].split(":")[0] == f"{variables['VIRTUAL_ENV']}/bin"
        assert str(ray_server.data_dir) not in variables["PATH"]
        assert variables["CORTEX_RAY_NODE_ID"]
        assert report["marker"] == "built-by-deps"
    # dependencies.sh ran once in each environment of a node, however many actors started
    # there at once (this cluster's two nodes share one machine's session folder).
    node_runs = [line for line in runs.read_text().split() if not line.startswith(str(server_envs))]
    assert sorted(node_runs) == sorted(set(node_runs))
    assert {str(Path(line).resolve()) for line in node_runs} == {
        str(Path(r["prefix"]).resolve()) for r in reports
    }
    # Its output is in the raw output of the worker that built.
    logs = "\n".join(ray_client.logs("ray-env", job_id, follow=True))
    assert "running dependencies.sh" in logs
    assert "dependencies.sh runs in " in logs and "ready on this Ray node" in logs


@pytest.mark.timeout(2 * BUILD_S + 60)
def test_a_dependencies_sh_that_fails_on_the_node_fails_the_job_with_its_output(
    ray_client: Client, tmp_path: Path
) -> None:
    # It succeeds on the server (the deploy's build) and fails on the Ray nodes only.
    folder = _env_project(
        tmp_path,
        "ray-bad-deps",
        dependencies=(
            'if [ "${TEST_ON_RAY_NODE:-}" = 1 ]; then\n'
            "  echo 'fetching the model tools'\n"
            "  echo 'no compiler on this node' >&2\n"
            "  exit 3\n"
            "fi\n"
        ),
    )
    _deploy(ray_client, folder)
    job_id = _submit(ray_client, "ray-bad-deps", [1, 2], 1)

    status = wait_for_status(ray_client, "ray-bad-deps", job_id, BUILD_S)

    assert status["status"] == "status_worker_error", status
    assert "exited with code 1 before the predictor was loaded" in status["error"]["message"]
    logs = "\n".join(ray_client.logs("ray-bad-deps", job_id, follow=True))
    assert "dependencies.sh failed (exit code 3)" in logs
    assert "fetching the model tools" in logs and "no compiler on this node" in logs
    assert _reports(tmp_path, "ray-bad-deps") == []


@pytest.mark.timeout(2 * BUILD_S + 60)
def test_a_stop_during_the_nodes_build_stops_the_build_and_the_actor(
    ray_client: Client, tmp_path: Path
) -> None:
    started, gate = tmp_path / "build-started", tmp_path / "gate"
    terminated = tmp_path / "build-terminated"
    folder = _env_project(
        tmp_path,
        "ray-slow-build",
        # On the nodes only, the build waits for the gate (a bounded loop: at most 60 s).
        dependencies=(
            'if [ "${TEST_ON_RAY_NODE:-}" = 1 ]; then\n'
            f"  trap 'touch \"{terminated}\"; exit 143' TERM\n"
            f'  echo $$ > "{started}.tmp" && mv "{started}.tmp" "{started}"\n'
            f'  for i in $(seq 600); do [ -f "{gate}" ] && exit 0; sleep 0.1; done\n'
            "  exit 1\n"
            "fi\n"
        ),
    )
    _deploy(ray_client, folder)
    job_id = _submit(ray_client, "ray-slow-build", [1], 1)
    try:
        wait_for(started.exists, 60, "the node's build to run dependencies.sh")
        script = psutil.Process(int(started.read_text()))
        actor = script.parent()
        assert actor is not None
        status = ray_client.get_job("ray-slow-build", job_id)["job_status"]
        assert status["status"] == "status_running"
        assert status["worker_counts"]["pending"] == 1, status

        ray_client.stop_job("ray-slow-build", job_id)

        status = ray_client.get_job("ray-slow-build", job_id)["job_status"]
        assert status["status"] == "status_stopped"
        wait_for(lambda: _gone([script, actor]), 30, "the build and its actor to be gone")
        # The actor stopped its build as it stops a worker: SIGTERM first.
        assert terminated.exists()
        assert _reports(tmp_path, "ray-slow-build") == []
    finally:
        gate.touch()  # whatever is left of the build ends now


def test_an_onnx_api_on_ray_gets_onnxruntime_on_the_nodes(
    ray_client: Client, tmp_path: Path
) -> None:
    """type onnx with no requirements.txt: the model runtime the server adds to the
    environment's definition is installed on the nodes too."""
    from integration.test_onnx import PREDICTOR, affine_model

    folder = tmp_path / "onnx-on-ray"
    folder.mkdir()
    (folder / "predictor.py").write_text(PREDICTOR)
    affine_model(folder / "model.onnx", 2.0, 1.0)
    out = tmp_path / "onnx-on-ray-out"
    api = {
        "name": "onnx-on-ray",
        "kind": "BatchAPI",
        "predictor": {
            "type": "onnx",
            "path": "predictor.py",
            "model_path": "model.onnx",
            "config": {"out": str(out)},
        },
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    _deploy(ray_client, folder)
    job_id = _submit(ray_client, "onnx-on-ray", [[1, 2, 3], [0, 0, 0]], workers=2)
    status = wait_for_status(ray_client, "onnx-on-ray", job_id, 240)
    assert status["status"] == "status_succeeded", status
    answers = sorted(json.loads(p.read_text())["answers"]["None"][0][0] for p in out.glob("*.json"))
    assert answers == [[1.0, 1.0, 1.0], [3.0, 5.0, 7.0]]


def test_an_actor_still_waiting_for_a_node_is_adopted_after_a_restart(
    cluster: Any, tmp_path: Path
) -> None:
    """A worker whose actor no node can place yet has reported no pid; a restarted server
    adopts it by its actor's name all the same, rather than taking it for dead and starting
    another that would wait for the same resources."""
    env = {"CORTEX_LAUNCHER": "ray", "CORTEX_RAY_ADDRESS": cluster.address, **cluster.env}
    srv = start_server(tmp_path / "server", **env)
    try:
        with srv.client() as client:
            # No node has 3 CPUs: the actor waits for one (an autoscaler could add it).
            api = deploy_fixture(client, "recorder", tmp_path, compute={"cpu": 3})
            job_id = _submit(client, api.name, [1], 1)
            counts = client.get_job(api.name, job_id)["job_status"]["worker_counts"]
            assert counts["pending"] == 1
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait()
        port = int(srv.url.rsplit(":", 1)[1])
        srv = start_server(tmp_path / "server", port=port, **env)
        with srv.client() as client:
            status = client.get_job(api.name, job_id)["job_status"]
            assert status["status"] == "status_running"
            # The same worker, still pending: not unknown, and no other started.
            assert status["worker_counts"]["pending"] == 1
            assert sum(status["worker_counts"].values()) == 1
            client.stop_job(api.name, job_id)
    finally:
        stop_server(srv)


def test_the_pool_is_the_clusters_resources(
    ray_server: Server, ray_client: Client, tmp_path: Path
) -> None:
    with ray_server.http() as http:
        assert http.get("/capacity").json()["total"]["cpu"] == 3  # the head's 2 and node2's 1
    api = deploy_fixture(ray_client, "recorder", tmp_path, compute={"cpu": 1})
    items = [{"await_workers": 3}] * 3 + [{"sleep": 0.5}] * 3
    job_id = _submit(ray_client, api.name, items, 5)

    def waiting() -> dict[str, Any] | None:
        status = ray_client.get_job(api.name, job_id)["job_status"]
        return status if status["pending_reason"] else None

    # Three workers fit the cluster; the other two wait, saying why.
    status = wait_for(waiting, 120, "workers beyond the cluster's CPUs to wait")
    assert "cpu=1 (free 0)" in status["pending_reason"]
    assert wait_for_status(ray_client, api.name, job_id, 120)["status"] == "status_succeeded"
    assert len(_inits(api, job_id)) == 3
