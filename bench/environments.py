"""What an API environment costs: `.venv/bin/python bench/environments.py`.

Starts a real `cortex serve` (SQLite, local launcher) with an empty data folder, so its download
cache starts empty, and times:

- a deploy whose requirements.txt (`humanize==4.9.0`) must be built, cache empty (downloads);
- the same requirements again under a new key (a comment changes the file): a build from a
  warm cache;
- a redeploy of unchanged requirements, and a second API with the same ones: cache hits;
- a one-item job from the POST to `status_succeeded`, worker start-up included, in the API's
  environment and, for comparison, in the server's interpreter (a project without
  requirements), median of `--runs`.

Needs the package registry (it installs humanize). Prints a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import Server  # noqa: E402

from cortex.client import Client  # noqa: E402

PREDICTOR = """
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        return None
"""


def project(root: Path, name: str, requirements: str | None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "predictor.py").write_text(PREDICTOR)
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    api = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {"type": "python", "path": "predictor.py"},
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    return folder / "cortex.yaml"


def timed_deploy(client: Client, config: Path) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    [result] = client.deploy(config)
    env = result["environment"]
    if env["state"] == "building":
        env = client.wait_environment(result["api_name"], poll_s=0.02)
    assert env["state"] in ("ready", "none"), env
    return time.perf_counter() - started, result["environment"]


def job_s(client: Client, api: str) -> float:
    started = time.perf_counter()
    job = client.submit(api, {"item_list": {"items": [1], "batch_size": 1}, "workers": 1})
    while True:
        status = client.get_job(api, job["job_id"])["job_status"]["status"]
        if status not in ("status_enqueuing", "status_running"):
            assert status == "status_succeeded", status
            return time.perf_counter() - started
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cortex-bench-env-") as tmp:
        root = Path(tmp)
        server = Server(root)
        rows: list[tuple[str, str]] = []
        try:
            with Client(server.url) as client:
                cold, _ = timed_deploy(client, project(root, "env-a", "humanize==4.9.0\n"))
                rows.append(("deploy, requirements built, empty cache", f"{cold:.2f} s"))
                warm, _ = timed_deploy(
                    client, project(root, "env-b", "humanize==4.9.0\n# another key\n")
                )
                rows.append(("deploy, requirements built, warm cache", f"{warm:.2f} s"))
                again, env = timed_deploy(client, root / "env-a" / "cortex.yaml")
                assert env["cached"], env
                rows.append(("redeploy, unchanged requirements (cache hit)", f"{again:.3f} s"))
                other, env = timed_deploy(client, project(root, "env-c", "humanize==4.9.0\n"))
                assert env["cached"], env
                rows.append(("another API, same requirements (cache hit)", f"{other:.3f} s"))
                timed_deploy(client, project(root, "plain", None))
                in_env = statistics.median(job_s(client, "env-a") for _ in range(args.runs))
                plain = statistics.median(job_s(client, "plain") for _ in range(args.runs))
                rows.append(("one-item job, worker in the API's environment", f"{in_env:.3f} s"))
                rows.append(("one-item job, worker in the server's interpreter", f"{plain:.3f} s"))
        finally:
            server.close()
    print("| step | time |\n|---|---:|")
    for step, value in rows:
        print(f"| {step} | {value} |")


if __name__ == "__main__":
    main()
