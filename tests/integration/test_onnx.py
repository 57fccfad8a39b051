"""`type: onnx` end to end: tiny models built here with the `onnx` helper API, deployed with a
predictor that writes what the client answers, run by real workers in an environment the
server gave onnxruntime (the test's own interpreter has none)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from cortex.client import Client
from helpers import Server, start_server, stop_server, wait_for_status
from s3server import BUCKET, S3

BUILD_S = 180.0

PREDICTOR = """
import json, os

class ONNXPredictor:
    def __init__(self, onnx_client, config, job_spec):
        self.client = onnx_client
        self.config = config
        self.out = config["out"]
        os.makedirs(self.out, exist_ok=True)
        names = config.get("names") or [None]
        self.signatures = {str(n): onnx_client.input_signature(n) for n in names}

    def predict(self, payload, batch_id):
        answers = {}
        for name in self.config.get("names") or [None]:
            outputs = self.client.predict(_input(self.config, payload), name)
            answers[str(name)] = [o.tolist() for o in outputs]
        with open(os.path.join(self.out, batch_id + ".json"), "w") as f:
            json.dump({"answers": answers, "signatures": self.signatures}, f)


def _input(config, payload):
    if config.get("as_dict"):  # the items' own keys name the model's inputs
        return {key: [item[key] for item in payload] for key in payload[0]}
    return payload
"""


def affine_model(path: Path, scale: float, shift: float, dtype: int = TensorProto.FLOAT) -> Path:
    """y = x * scale + shift, x of shape [N, 3]."""
    x = helper.make_tensor_value_info("x", dtype, [None, 3])
    y = helper.make_tensor_value_info("y", dtype, [None, 3])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["t"]),
            helper.make_node("Add", ["t", "shift"], ["y"]),
        ],
        "affine",
        [x],
        [y],
        [
            helper.make_tensor("scale", dtype, [], [scale]),
            helper.make_tensor("shift", dtype, [], [shift]),
        ],
    )
    return _save(graph, path)


def sum_model(path: Path) -> Path:
    """Two inputs: total = a + b, both float [N]."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [None])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [None])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [None])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["total"])], "sum", [a, b], [total]
    )
    return _save(graph, path)


def _save(graph: Any, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def onnx_server(tmp_path_factory: pytest.TempPathFactory, s3: S3) -> Iterator[Server]:
    # The server fetches models from S3 with its own credentials, as it reads datasets.
    srv = start_server(tmp_path_factory.mktemp("onnx-server"), **s3.env)
    yield srv
    stop_server(srv)


@pytest.fixture
def client(onnx_server: Server) -> Iterator[Client]:
    with onnx_server.client() as c:
        yield c


def project(root: Path, name: str, predictor: dict[str, Any], config: dict[str, Any]) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictor.py").write_text(PREDICTOR)
    api = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {
            "type": "onnx",
            "path": "predictor.py",
            "config": {"out": str(root / f"{name}-out"), **config},
            **predictor,
        },
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    return folder


def deploy(client: Client, folder: Path) -> dict[str, Any]:
    [result] = client.deploy(folder / "cortex.yaml")
    env = client.wait_environment(result["api_name"])
    assert env["state"] == "ready", env
    return result


def run(client: Client, api: str, items: list[Any], batch_size: int = 2) -> dict[str, Any]:
    job = client.submit(
        api, {"item_list": {"items": items, "batch_size": batch_size}, "workers": 1}
    )
    return wait_for_status(client, api, job["job_id"], 90)


def outputs(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / f"{name}-out").glob("*.json"))]


def test_a_single_model_in_the_project_runs_with_lists_converted(
    client: Client, tmp_path: Path
) -> None:
    assert importlib.util.find_spec("onnxruntime") is None  # the server's interpreter has none
    folder = project(tmp_path, "affine", {"model_path": "model.onnx"}, {})
    affine_model(folder / "model.onnx", 2.0, 1.0)
    answer = deploy(client, folder)
    # The server gave the environment onnxruntime: the project has no requirements.txt.
    assert answer["environment"]["state"] == "building"
    log = "\n".join(client.environment("affine")["lines"])
    assert "onnxruntime" in log
    # Integers in JSON, converted to the input's float32.
    status = run(client, "affine", [[1, 2, 3], [4, 5, 6], [0, 0, 0]])
    assert status["status"] == "status_succeeded", status
    results = sorted(
        (row for out in outputs(tmp_path, "affine") for row in out["answers"]["None"][0]),
    )
    assert results == [[1.0, 1.0, 1.0], [3.0, 5.0, 7.0], [9.0, 11.0, 13.0]]
    signature = outputs(tmp_path, "affine")[0]["signatures"]["None"]
    assert signature == {"x": {"shape": [None, 3], "type": "tensor(float)"}}


def test_a_multi_model_api_chooses_by_model_name(client: Client, tmp_path: Path) -> None:
    folder = project(
        tmp_path,
        "two-models",
        {
            "models": {
                "paths": [
                    {"name": "double", "path": "models/double.onnx"},
                    {"name": "negate", "path": "models/negate.onnx"},
                ]
            }
        },
        {"names": ["double", "negate"]},
    )
    affine_model(folder / "models" / "double.onnx", 2.0, 0.0)
    affine_model(folder / "models" / "negate.onnx", -1.0, 0.0)
    deploy(client, folder)
    status = run(client, "two-models", [[1, 2, 3]], batch_size=1)
    assert status["status"] == "status_succeeded", status
    [out] = outputs(tmp_path, "two-models")
    assert out["answers"] == {"double": [[[2.0, 4.0, 6.0]]], "negate": [[[-1.0, -2.0, -3.0]]]}


def test_model_name_is_required_with_several_models_and_errors_name_it(
    client: Client, tmp_path: Path
) -> None:
    folder = project(
        tmp_path,
        "no-name",
        {"models": [{"name": "a", "model_path": "a.onnx"}, {"name": "b", "model_path": "b.onnx"}]},
        {"names": [None]},
    )
    affine_model(folder / "a.onnx", 1.0, 0.0)
    affine_model(folder / "b.onnx", 1.0, 0.0)
    # __init__ asks for input_signature(None): ambiguous with two models, the worker fails.
    deploy(client, folder)
    status = run(client, "no-name", [[1, 2, 3]])
    assert status["status"] == "status_worker_error"
    assert "model_name is required: this API has 2 models (a, b)" in status["error"]["message"]


def test_a_dict_input_and_a_missing_input_named_in_the_error(
    client: Client, onnx_server: Server, tmp_path: Path
) -> None:
    folder = project(tmp_path, "summer", {"model_path": "sum.onnx"}, {"as_dict": True})
    sum_model(folder / "sum.onnx")
    deploy(client, folder)
    status = run(client, "summer", [{"a": 1, "b": 2}, {"a": 10, "b": 20}])
    assert status["status"] == "status_succeeded", status
    [out] = outputs(tmp_path, "summer")
    assert out["answers"]["None"] == [[3.0, 30.0]]
    status = run(client, "summer", [{"a": 1, "c": 2}])
    assert status["batch_metrics"]["failed"] == 1
    [failed] = httpx.get(
        f"{onnx_server.url}/summer/{status['job_id']}/failed_batches", timeout=30
    ).json()["failed_batches"]
    assert "the model has no input 'c' (its inputs: a, b)" in failed["error"]


def test_a_model_on_s3_is_fetched_once_into_the_cache(
    client: Client, onnx_server: Server, s3: S3, tmp_path: Path
) -> None:
    local = affine_model(tmp_path / "remote.onnx", 3.0, 0.0)
    s3.client().upload_file(str(local), BUCKET, "models/triple.onnx")
    url = f"s3://{BUCKET}/models/triple.onnx"
    folder = project(tmp_path, "remote", {"model_path": url}, {})
    deploy(client, folder)
    for _ in range(2):
        status = run(client, "remote", [[1, 1, 1]], batch_size=1)
        assert status["status"] == "status_succeeded", status
    answers = [out["answers"]["None"][0] for out in outputs(tmp_path, "remote")]
    assert answers == [[[3.0, 3.0, 3.0]], [[3.0, 3.0, 3.0]]]
    cached = list((onnx_server.data_dir / "models").glob("*/triple.onnx"))
    assert len(cached) == 1  # one download for both jobs
    assert cached[0].read_bytes() == local.read_bytes()


def test_a_model_that_fails_to_load_fails_the_job_with_the_reason(
    client: Client, tmp_path: Path
) -> None:
    folder = project(tmp_path, "broken", {"model_path": "broken.onnx"}, {})
    (folder / "broken.onnx").write_bytes(b"this is not an onnx model")
    deploy(client, folder)
    status = run(client, "broken", [[1, 2, 3]])
    assert status["status"] == "status_worker_error"
    message = status["error"]["message"]
    assert "broken.onnx" in message and "failed to load" in message


def test_a_missing_remote_model_fails_the_job_with_the_reason(
    client: Client, tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/models/never-uploaded.onnx"
    folder = project(tmp_path, "gone", {"model_path": url}, {})
    deploy(client, folder)
    status = run(client, "gone", [[1, 2, 3]])
    assert status["status"] == "status_worker_error"
    assert status["error"]["kind"] == "batchapi.model_fetch_failed"
    assert "never-uploaded.onnx" in status["error"]["message"]


def test_a_model_path_missing_from_the_project_is_refused_at_deploy(
    client: Client, tmp_path: Path
) -> None:
    folder = project(tmp_path, "nomodel", {"model_path": "absent.onnx"}, {})
    with pytest.raises(Exception, match=r"the model absent\.onnx is not a file or folder"):
        client.deploy(folder / "cortex.yaml")
