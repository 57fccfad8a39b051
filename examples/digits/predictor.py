"""Classify 8x8 handwritten digits with a scikit-learn model trained on the bundled data.

Each item is a list of 64 pixel values (0-16). `predict` writes the batch's predictions to
`<output_dir>/<job_id>/<batch_id>.json`; `on_job_complete` gathers them into `results.json`.
"""

import json
import os
from pathlib import Path

from sklearn.datasets import load_digits
from sklearn.svm import SVC


class PythonPredictor:
    def __init__(self, config, job_spec):
        digits = load_digits()
        self.model = SVC(gamma=0.001).fit(digits.data, digits.target)
        self.out = Path(config["output_dir"]) / job_spec["job_id"]
        self.out.mkdir(parents=True, exist_ok=True)

    def predict(self, payload, batch_id):
        labels = self.model.predict(payload).tolist()
        tmp = self.out / f".{batch_id}.tmp"
        tmp.write_text(json.dumps(labels))
        os.replace(tmp, self.out / f"{batch_id}.json")  # never a half-written file
        print(f"batch {batch_id}: {len(labels)} digits classified")

    def on_job_complete(self):
        results = {}
        for path in sorted(self.out.glob("*.json")):
            if path.name != "results.json":
                results[path.stem] = json.loads(path.read_text())
        count = sum(len(labels) for labels in results.values())
        summary = {"batches": len(results), "predictions": count, "by_batch": results}
        (self.out / "results.json").write_text(json.dumps(summary))
        print(f"aggregated {count} predictions from {len(results)} batches")
