"""Collected results on the store, with the real worker loop (`cortex.worker.runtime`) on the
store adapter, on both engines: big results are sent early without giving back the batches
the worker still holds, and a spent failure budget leaves the rest unrun."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from cortex import outputs
from cortex.jobs import JobStatus
from cortex.settings import Settings
from cortex.store import Store
from cortex.store import tables as t
from cortex.store.submissions import NO_EXTRAS, Extras
from cortex.store.workerqueue import StoreQueue
from cortex.worker import results, runtime

PREDICTOR = """
from pathlib import Path


class PythonPredictor:
    def __init__(self, config, job_spec):
        self.out = Path(config["out"])

    def predict(self, payload, batch_id):
        with open(self.out / "attempts.log", "a") as log:
            log.write(batch_id + "\\n")
        if payload == ["fail"]:
            raise ValueError("this batch fails")
        return str(payload[0]) * (%d)
"""
API_SPEC: dict[str, Any] = {
    "name": "api",
    "kind": "BatchAPI",
    "predictor": {"type": "python", "path": "predictor.py", "config": {}},
}
# Big enough that three batches' results reach the worker's early-report threshold.
RESULT_CHARS = results.REPORT_BYTES // 3 + 1


class CountingQueue(StoreQueue):
    """The store adapter, counting the early reports (`hold`) the worker sends."""

    holds = 0

    def _send(self, op: str, body: dict[str, Any] | None) -> Any:
        if op == "lease" and body and body.get("hold"):
            CountingQueue.holds += 1
        return super()._send(op, body)


def _create(store: Store, payloads: list[str], extras: Extras | None) -> None:
    """Job "job1": one worker, one attempt a batch."""
    store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_job(
        job_id="job1",
        api_name="api",
        workers=1,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="token",
        payloads=payloads,
        replica_id="r1",
        extras=extras or NO_EXTRAS,
    )


def _run(store: Store, tmp_path: Path, payloads: list[str], extras: Extras | None) -> str:
    _create(store, payloads, extras)
    project = tmp_path / "project"
    project.mkdir()
    (project / "predictor.py").write_text(PREDICTOR % RESULT_CHARS)
    out = tmp_path / "out"
    out.mkdir()
    info = {
        "job_spec": {"job_id": "job1", "api_name": "api", "workers": 1},
        "api_spec": API_SPEC,
        "config": {"out": str(out)},
        "models": [],
        "heartbeat_s": 0.05,
        "lease_s": 30.0,
    }
    codes: list[Any] = []

    def worker() -> None:
        codes.append(runtime.run(CountingQueue(store, "job1", "job1-0", info), project))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    thread.join(60)
    assert codes == [runtime.EXIT_OK]
    return (out / "attempts.log").read_text()


def test_big_results_go_early_and_every_batch_runs_once(store: Store, tmp_path: Path) -> None:
    CountingQueue.holds = 0
    attempts = _run(store, tmp_path, [f"[{i}]" for i in range(8)], None)
    assert len(attempts.split()) == 8 == len(set(attempts.split()))
    assert CountingQueue.holds >= 1  # results went early, the other batches kept
    job = store.get_job("job1")
    assert job is not None and job.status is JobStatus.SUCCEEDED
    lines = [
        json.loads(line) for page in store.result_pages("job1") for line in page.split("\n") if line
    ]
    assert [line["result"] for line in lines] == [str(i) * RESULT_CHARS for i in range(8)]


def test_a_spent_failure_budget_leaves_the_rest_not_run(store: Store, tmp_path: Path) -> None:
    payloads = ['["fail"]', '["fail"]', *(f"[{i}]" for i in range(5))]
    _run(store, tmp_path, payloads, Extras(max_failed_batches=1))
    job = store.get_job("job1")
    assert job is not None and job.status is JobStatus.COMPLETED_WITH_FAILURES
    assert job.error_kind == "batchapi.max_failed_batches_exceeded"
    counts = store.batch_counts("job1")
    assert counts["failed"] == 2 and counts["succeeded"] + counts["not_run"] == 5
    states = [e["state"] for page in store.error_pages("job1") for e in page]
    assert states == ["failed", "failed"] + ["not_run"] * counts["not_run"]


def test_results_are_written_in_parts_in_the_jobs_order(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    _create(store, [f"[{i}]" for i in range(40)], Extras(output_path=str(folder)))
    lines = [f'{{"batch_id":"b{i}","index":0,"result":{i}}}\n' for i in range(40)]
    with store.engine.begin() as conn:
        conn.execute(
            t.batch_results.insert(),
            [
                {"job_id": "job1", "seq": i, "lines": line, "size": len(line)}
                for i, line in enumerate(lines)
            ],
        )
    job = store.get_job("job1")
    assert job is not None
    settings = Settings(data_roots=(tmp_path,))

    written = outputs.write(store, job, settings, part_bytes=500)

    assert written["path"] == str(folder)
    assert len(written["files"]) > 1
    text = "".join(Path(name).read_text() for name in written["files"])
    assert text == "".join(lines)
    assert all(Path(name).stat().st_size < 500 + 16 * 40 for name in written["files"])
    assert Path(written["errors"]).read_text() == ""
    assert sorted(p.name for p in (folder / "job1").iterdir()) == sorted(
        [Path(name).name for name in written["files"]] + ["errors.jsonl"]
    )
