"""examples/iris-onnx end to end: prepare.py trains and exports the model, the API deploys as
`type: onnx` (its environment gets onnxruntime from the server), and the job's species agree
with scikit-learn's own predictions for the same flowers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from helpers import start_server, stop_server, wait_for_status

EXAMPLE = Path(__file__).parents[2] / "examples" / "iris-onnx"
LABELS = ["setosa", "versicolor", "virginica"]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_the_iris_onnx_example(tmp_path: Path) -> None:
    folder = tmp_path / "iris-onnx"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("model.onnx"))
    subprocess.run(
        [sys.executable, "prepare.py", "model.onnx"], cwd=folder, check=True, timeout=120
    )
    out = tmp_path / "out"
    config = yaml.safe_load((folder / "cortex.yaml").read_text())
    config[0]["predictor"]["config"]["output_dir"] = str(out)
    (folder / "cortex.yaml").write_text(yaml.safe_dump(config))
    submission = json.loads((folder / "submission.json").read_text())

    server = start_server(tmp_path / "server")
    try:
        with server.client() as client:
            [result] = client.deploy(folder / "cortex.yaml")
            env = client.wait_environment(result["api_name"])
            assert env["state"] == "ready", env
            job = client.submit("iris-onnx", submission)
            status = wait_for_status(client, "iris-onnx", job["job_id"], 90)
            assert status["status"] == "status_succeeded", status
    finally:
        stop_server(server)

    results_dir = out / job["job_id"]
    got = {}
    for path in results_dir.glob("*.json"):
        if path.name != "summary.json":
            for row in json.loads(path.read_text()):
                got[json.dumps(row["item"], sort_keys=True)] = row["species"]
    items = submission["item_list"]["items"]
    assert len(got) == len(items)
    # The same model, trained the same way, in scikit-learn: the ONNX export agrees.
    iris = load_iris()
    model = LogisticRegression(max_iter=500).fit(iris.data.astype("float32"), iris.target)
    rows = np.array([[item[name] for name in FEATURES] for item in items], dtype="float32")
    expected = [LABELS[i] for i in model.predict(rows)]
    assert [got[json.dumps(item, sort_keys=True)] for item in items] == expected
    assert expected[:2] == ["setosa", "setosa"] and expected[-1] == "virginica"
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary == {label: expected.count(label) for label in LABELS}
