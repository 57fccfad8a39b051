"""W5's model, the same code in all three runs: the service's predictor, the limit's pool
initializer and Ray Data's actor.

A scikit-learn classifier is unpickled once, in `__init__`, from config["model"]. Each batch is
a list of rows `{"x": [64 pixel values]}`; `predict` returns the count of predicted labels per
class (ten integers), and the service's predictor also appends that line to
config["out"]/<pid>.jsonl, as a batch job writes its output: the three runs' sums must agree.
"""

import json
import os
import pickle

import numpy as np


class Model:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.model = pickle.load(f)

    def counts(self, rows):
        labels = self.model.predict(np.asarray(rows, dtype=np.float32))
        return np.bincount(labels, minlength=10)


class PythonPredictor:
    def __init__(self, config):
        self.model = Model(config["model"])
        self.out = open(os.path.join(config["out"], f"{os.getpid()}.jsonl"), "a")  # noqa: SIM115

    def predict(self, payload):
        counts = self.model.counts([row["x"] for row in payload])
        self.out.write(json.dumps(counts.tolist()) + "\n")
        self.out.flush()
