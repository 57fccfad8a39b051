"""Classify iris flowers with an ONNX model: Cortex's iris classifier, as a Batch API.

Each item is one flower's measurements in centimetres:
`{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}`.
The model (model.onnx, made by prepare.py) runs in ONNX Runtime through `onnx_client`; this
class only turns items into the model's input and its output into species names.
"""

import json
import os

LABELS = ["setosa", "versicolor", "virginica"]
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


class ONNXPredictor:
    def __init__(self, onnx_client, config, job_spec):
        self.client = onnx_client
        self.output_dir = os.path.join(config["output_dir"], job_spec["job_id"])
        os.makedirs(self.output_dir, exist_ok=True)
        print(f"model inputs: {onnx_client.input_signature()}")

    def predict(self, payload, batch_id):
        rows = [[float(item[name]) for name in FEATURES] for item in payload]
        labels, probabilities = self.client.predict(rows)  # lists become float32 arrays
        results = [
            {
                "item": item,
                "species": LABELS[int(label)],
                "probability": round(float(max(probs)), 4),
            }
            for item, label, probs in zip(payload, labels, probabilities, strict=True)
        ]
        with open(os.path.join(self.output_dir, f"{batch_id}.json"), "w") as out:
            json.dump(results, out)

    def on_job_complete(self):
        counts = {label: 0 for label in LABELS}
        for name in sorted(os.listdir(self.output_dir)):
            if name.endswith(".json") and name != "summary.json":
                with open(os.path.join(self.output_dir, name)) as batch:
                    for result in json.load(batch):
                        counts[result["species"]] += 1
        with open(os.path.join(self.output_dir, "summary.json"), "w") as out:
            json.dump(counts, out)
        print(f"species counted: {counts}")
