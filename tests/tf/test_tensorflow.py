"""`type: tensorflow` end to end on a tiny SavedModel with two signatures, built in the test.

TensorFlow is large (hundreds of MB): run with `make test-tf`, or CORTEX_TEST_TF=1. The model
is made by the API's own environment (TensorFlow is not in the server's): the test builds that
environment in the server's data folder first, under the key the deploy will ask for, makes
the SavedModel with its Python, and the deploy then finds the environment built.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cortex import envfiles, environments
from helpers import start_server, stop_server, wait_for_status

pytestmark = pytest.mark.skipif(
    os.environ.get("CORTEX_TEST_TF") != "1", reason="TensorFlow is large: run `make test-tf`"
)

MAKE_MODEL = """
import sys
import tensorflow as tf

class Affine(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def affine(self, x):
        return {"y": x * 2.0 + 1.0}

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.float32, name="a"),
        tf.TensorSpec([None], tf.float32, name="b"),
    ])
    def total(self, a, b):
        return {"sum": a + b, "product": a * b}

module = Affine()
tf.saved_model.save(
    module, sys.argv[1], signatures={"affine": module.affine, "total": module.total}
)
"""

PREDICTOR = """
import json, os

class TensorFlowPredictor:
    def __init__(self, tensorflow_client, config, job_spec):
        self.client = tensorflow_client
        self.config = config
        os.makedirs(config["out"], exist_ok=True)
        self.signature = tensorflow_client.input_signature()

    def predict(self, payload, batch_id):
        if self.config.get("pairs"):
            model_input = {"a": [p[0] for p in payload], "b": [p[1] for p in payload]}
        else:
            model_input = payload  # one input: the signature's only one
        outputs = self.client.predict(model_input)
        with open(os.path.join(self.config["out"], batch_id + ".json"), "w") as f:
            json.dump({"outputs": outputs, "signature": self.signature}, f)
"""


def _project(root: Path, name: str, predictor: dict[str, Any], config: dict[str, Any]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "predictor.py").write_text(PREDICTOR)
    api = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {
            "type": "tensorflow",
            "path": "predictor.py",
            "config": {"out": str(root / f"{name}-out"), **config},
            **predictor,
        },
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    return folder


def test_a_savedmodel_runs_by_its_signature(tmp_path: Path) -> None:
    data = tmp_path / "server"
    model_dir = tmp_path / "model"
    # The environment every API here needs: no requirements.txt, tensorflow-cpu added.
    probe = _project(tmp_path, "probe", {"model_path": "m/"}, {})
    extra = envfiles.runtime_requirements("tensorflow", 0, probe)
    assert extra == ("tensorflow-cpu",)
    key = envfiles.key_for(probe, extra)
    assert key is not None
    envs = environments.Environments(data / "envs", data / "cache")
    envs.build(key, probe, extra=extra)
    status = envs.wait(key, 900)
    assert status.state == environments.READY, status
    python = envs.python(key)
    assert python is not None
    (tmp_path / "make_model.py").write_text(MAKE_MODEL)
    subprocess.run([str(python), str(tmp_path / "make_model.py"), str(model_dir)], check=True,
                   timeout=300)  # fmt: skip

    one = _project(tmp_path, "tf-affine", {"model_path": "model/", "signature_key": "affine"}, {})
    pairs = _project(
        tmp_path, "tf-total", {"models": {"path": "model/", "signature_key": "total"}},
        {"pairs": True},
    )  # fmt: skip
    ambiguous = _project(tmp_path, "tf-ambiguous", {"model_path": "model/"}, {})
    for folder in (one, pairs, ambiguous):
        subprocess.run(["cp", "-r", str(model_dir), str(folder / "model")], check=True)

    server = start_server(data)
    try:
        with server.client() as client:
            for folder in (one, pairs, ambiguous):
                [result] = client.deploy(folder / "cortex.yaml")
                assert result["environment"]["cached"], result  # built above, same key
            jobs = {
                "tf-affine": client.submit(
                    "tf-affine",
                    {"item_list": {"items": [[1, 2], [3, 4]], "batch_size": 2}, "workers": 1},
                ),
                "tf-total": client.submit(
                    "tf-total",
                    {"item_list": {"items": [[1, 2], [3, 4]], "batch_size": 2}, "workers": 1},
                ),
                "tf-ambiguous": client.submit(
                    "tf-ambiguous",
                    {"item_list": {"items": [[1, 2]], "batch_size": 1}, "workers": 1},
                ),
            }
            done = {
                api: wait_for_status(client, api, job["job_id"], 180) for api, job in jobs.items()
            }
    finally:
        stop_server(server)

    assert done["tf-affine"]["status"] == "status_succeeded", done["tf-affine"]
    [affine] = [json.loads(p.read_text()) for p in (tmp_path / "tf-affine-out").glob("*.json")]
    assert affine["outputs"] == {"y": [[3.0, 5.0], [7.0, 9.0]]}
    assert affine["signature"] == {"x": {"shape": [None, 2], "type": "float32"}}

    assert done["tf-total"]["status"] == "status_succeeded", done["tf-total"]
    [total] = [json.loads(p.read_text()) for p in (tmp_path / "tf-total-out").glob("*.json")]
    assert total["outputs"] == {"sum": [3.0, 7.0], "product": [2.0, 12.0]}

    failed = done["tf-ambiguous"]
    assert failed["status"] == "status_worker_error"
    assert (
        "has 2 signatures (affine, total): set predictor.signature_key"
        in (failed["error"]["message"])
    )
