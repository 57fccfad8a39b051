"""The benchmark predictor: what `predict` does is chosen by config["mode"].

sum: return the sum of the batch (W1). burn: burn about config["burn_ms"] of CPU in a busy loop
(W2). count: return the number of items (W3). first: record the time of the first predict call
in config["mark"] (cold start). print: print config["lines"] lines per batch (log overhead).
tick: print the time every config["every_s"], config["ticks"] times (log latency).
"""

import os
import time


def burn(ms):
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x


class PythonPredictor:
    def __init__(self, config):
        self.config = config
        self.mode = config.get("mode", "sum")

    def predict(self, payload):
        mode = self.mode
        if mode == "sum":
            return sum(payload)
        if mode == "burn":
            return burn(self.config.get("burn_ms", 5))
        if mode == "count":
            return len(payload)
        if mode == "first":
            mark = self.config["mark"]
            if not os.path.exists(mark):
                with open(mark, "w") as f:
                    f.write(repr(time.time()))
            return None
        if mode == "tick":
            for _ in range(self.config["ticks"]):
                print(f"tick {time.time()!r}")
                time.sleep(self.config["every_s"])
            return None
        if mode == "print":
            for i in range(self.config.get("lines", 100)):
                print(f"batch line {i} of a predictor that talks a lot")
            return burn(self.config.get("burn_ms", 0))
        raise ValueError(f"unknown mode {mode}")
