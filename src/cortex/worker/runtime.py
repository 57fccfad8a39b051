"""The worker loop: load the predictor once, then lease, predict and report until done.

The loop speaks to the server through a `WorkerQueue` (`cortex.worker.queue`): over HTTP in a
worker process, straight on the store in the tests, the same loop either way. Configuration
comes from the environment the launcher sets: CORTEX_URL, CORTEX_JOB_ID, CORTEX_WORKER_ID,
CORTEX_WORKER_TOKEN and CORTEX_PROJECT_DIR.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from cortex import predictor as predictor_mod
from cortex.worker import logship, models, ranges
from cortex.worker import results as outputs
from cortex.worker.queue import HttpQueue, JobGone, Refused, Unreachable, WorkerQueue

log = logging.getLogger("cortex")

# Lease enough batches for about this much work per request: many cheap batches travel
# together, while long batches go one at a time so idle workers are not starved at the end.
# At most 1024 a request (each lease and report has a fixed cost on the server: W1, 2,000
# trivial batches, took 0.31-0.32 s with 256, 0.25-0.27 s with 1024).
_PREFETCH_WORK_S = 0.1
_MAX_PREFETCH = 1024
_PREFETCH_BYTES = 4 << 20
_IDLE_POLL_MAX_S = 0.25

# Exit codes. The server takes none of them alone for a clean finish: it also knows whether it
# told the worker that its work was over (`cortex.store.protocol`).
EXIT_OK = 0  # nothing left to do, or the job is gone
EXIT_FAILED = 1  # the predictor failed to load, or on_job_complete raised
EXIT_REFUSED = 2  # the server refused a request: a failure, whose reason is in the job's log
EXIT_UNREACHABLE = 3  # the server stayed unreachable for longer than the retry period
EXIT_BATCH_TIMEOUT = outputs.EXIT_BATCH_TIMEOUT  # a predict ran past the batch_timeout


def _configure_logging() -> None:
    # The worker's own lines go through the root logger, which the log capture ships.
    log.setLevel(logging.INFO)
    # httpx logs every request at INFO: shipping logs must not make more logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # A segfault's Python traceback goes to the process's stderr, which the launcher keeps.
    faulthandler.enable(file=2)


class _Heartbeat(threading.Thread):
    """Keeps this worker's leases alive while a long batch runs."""

    def __init__(self, queue: WorkerQueue, period_s: float) -> None:
        super().__init__(name="cortex-heartbeat", daemon=True)
        self.queue = queue
        self.period_s = period_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.period_s):
            try:
                self.queue.heartbeat()
            except Exception as err:  # the next beat may get through; leases last longer
                log.warning("heartbeat failed: %s", err)


def _error_line(err: BaseException) -> str:
    return f"{err.__class__.__name__}: {err}"


def run(queue: WorkerQueue, project_dir: Path) -> int:
    queue.set_state("initializing", pid=os.getpid())
    info = queue.spec()
    job_spec: dict[str, Any] = info["job_spec"]
    # Heartbeats start before the predictor loads, which can take minutes: they tell the
    # servers this worker is alive even when the replica that started it is gone.
    beat = _Heartbeat(queue, float(info["heartbeat_s"]))
    beat.start()
    try:
        try:
            predictor_spec = info["api_spec"]["predictor"]
            kind = predictor_spec["type"]
            cls = predictor_mod.load_class(project_dir / predictor_spec["path"], kind)
            # The models load once, before the predictor and before the first lease.
            client = models.client_for(kind, _models(info, project_dir))
            predictor = predictor_mod.Predictor(
                cls, info["config"], job_spec, predictor_type=kind, client=client
            )
        except BaseException as err:
            trace = traceback.format_exc()
            log.error("failed to initialise the predictor\n%s", trace.rstrip())
            queue.set_state("failed", error=_error_line(err), traceback=trace)
            return EXIT_FAILED
        queue.set_state("running", has_hook=predictor.has_hook)
        log.info("polling for batches...")
        return work(queue, predictor, job_spec.get("batch_timeout"))
    finally:
        beat.stopped.set()


def _models(info: dict[str, Any], project_dir: Path) -> list[dict[str, Any]]:
    """The models to load, each with a path on this machine: a project path is in the
    project's folder; a model from storage was fetched by the server (`model_path` there)."""
    found = []
    for model in info.get("models") or []:
        path = model.get("local_path") or model["path"]
        found.append({**model, "path": str(project_dir / path)})  # an absolute path stays
    return found


def work(
    queue: WorkerQueue, predictor: predictor_mod.Predictor, batch_timeout_s: float | None = None
) -> int:
    """Lease, predict and report until the server says there is nothing left (or, to this
    worker alone, to run `on_job_complete`); returns the worker's exit code."""
    results: list[dict[str, Any]] = []
    result_bytes = 0
    avg_s: float | None = None
    batch_bytes = 0.0
    idle_s = 0.01
    watchdog = None
    if batch_timeout_s:
        watchdog = outputs.Watchdog(
            float(batch_timeout_s), functools.partial(_timed_out, queue, results, batch_timeout_s)
        )
    while True:
        want = 1 if avg_s is None else int(_PREFETCH_WORK_S / max(avg_s, 1e-6))
        if batch_bytes:  # and no more than about _PREFETCH_BYTES of payloads a request
            want = min(want, int(_PREFETCH_BYTES / batch_bytes))
        want = max(1, min(_MAX_PREFETCH, want))
        reply = queue.lease(results, want)
        results.clear()
        result_bytes = 0
        if reply["batches"]:
            batch_bytes = queue.last_response_bytes / len(reply["batches"])
        if reply.get("run_hook"):
            return _run_hook(queue, predictor, reply.get("job_summary"))
        batches = reply["batches"]
        if not batches:
            if reply.get("done"):
                log.info("no batches left in queue, exiting...")
                return EXIT_OK
            time.sleep(idle_s)  # other workers hold the last batches; one may come back
            idle_s = min(idle_s * 2, _IDLE_POLL_MAX_S)
            continue
        idle_s = 0.01
        for batch in batches:
            if queue.draining.is_set() and results:
                # Asked to drain: the batches not started go back unused with the next lease
                # (the server gives back what a worker holds and did not report).
                log.info("asked to make room for other work: stopping after this batch")
                break
            batch_id = batch["batch_id"]
            with logship.in_batch(batch_id):
                if "payload_ref" in batch:
                    started = time.perf_counter()
                    try:
                        payload = _read_payload(queue, batch_id, batch["payload_ref"]["ref"])
                    except ranges.Unreadable as err:
                        log.error("failed to read batch %s: %s", batch_id, err)
                        results.append(
                            _failure(
                                batch_id, started, outputs.PAYLOAD_UNREADABLE, _error_line(err), ""
                            )
                        )
                        continue
                else:
                    payload = batch["payload"]
                result = _predict(predictor, payload, batch_id, watchdog)
            results.append(result)
            result_bytes += len(result.get("lines") or "")
            if result_bytes >= outputs.REPORT_BYTES:
                # Big results go now, the other batches this worker holds staying its own.
                queue.lease(results, 0, hold=True)
                results.clear()
                result_bytes = 0
            duration = result["duration_s"]
            avg_s = duration if avg_s is None else 0.8 * avg_s + 0.2 * duration


def _read_payload(queue: WorkerQueue, batch_id: str, segments: list[ranges.Segment]) -> Any:
    """A batch stored by reference: its lines read from the files here (local files directly,
    remote ones through fsspec), or by the server when this process cannot read them (no
    fsspec here, no credentials for the storage, a local file not on this machine)."""
    schemes = {ranges.scheme(s[0]) for s in segments if s[0] is not None}
    if not schemes & _UNREACHABLE:
        try:
            return ranges.payload(segments, ranges.read_here)[1]
        except ranges.Unreachable as err:
            # Once is enough: this worker asks the server for these files from now on.
            log.warning("reading batches through the server from now on: %s", err)
            _UNREACHABLE.update(schemes)
    answer = queue.payload(batch_id)
    if "error" in answer:
        raise ranges.Unreadable(answer["error"])
    return answer["payload"]


# The storages (URL schemes, "file" for local paths) this worker could not read itself.
_UNREACHABLE: set[str] = set()


def _predict(
    predictor: predictor_mod.Predictor,
    payload: Any,
    batch_id: str,
    watchdog: outputs.Watchdog | None = None,
) -> dict[str, Any]:
    log.info("processing batch %s", batch_id)
    started = time.perf_counter()
    try:
        if watchdog is None:
            value = predictor.predict(payload, batch_id)
        else:
            value = watchdog.run(batch_id, lambda: predictor.predict(payload, batch_id))
        text = None if value is None else outputs.lines(batch_id, payload, value)
    except outputs.ResultError as err:
        log.error("failed to keep the result of batch %s: %s", batch_id, err)
        return _failure(batch_id, started, err.kind, str(err), "")
    except Exception as err:
        trace = traceback.format_exc()
        log.error("failed to process batch %s\n%s", batch_id, trace.rstrip())
        return _failure(batch_id, started, outputs.PREDICT_ERROR, _error_line(err), trace)
    done = {"batch_id": batch_id, "ok": True, "duration_s": time.perf_counter() - started}
    if text is not None:
        done["lines"] = text
    return done


def _failure(batch_id: str, started: float, kind: str, error: str, trace: str) -> dict[str, Any]:
    return {
        "batch_id": batch_id,
        "ok": False,
        "duration_s": time.perf_counter() - started,
        "error": error,
        "error_kind": kind,
        "traceback": trace,
    }


def _timed_out(
    queue: WorkerQueue,
    results: list[dict[str, Any]],
    batch_timeout_s: float,
    batch_id: str,
    stack: str,
) -> None:
    """On the watchdog's thread, while the main thread is stuck in `predict`: report what is
    done and this batch's failure (an attempt, `batch_timeout`), give back the batches not
    started, and end the process, so that the launcher starts a fresh worker."""
    message = f"predict ran longer than the job's batch_timeout of {batch_timeout_s:g} s"
    log.error("batch %s: %s; this worker stops and is replaced\n%s", batch_id, message, stack)
    failure = {
        "batch_id": batch_id,
        "ok": False,
        "duration_s": float(batch_timeout_s),
        "error": message,
        "error_kind": outputs.BATCH_TIMEOUT,
        "traceback": f"where predict was when it was abandoned:\n{stack}",
    }
    try:
        queue.lease([*results, failure], 0, leaving=True)
        logship.drain()
    except BaseException as err:  # the server's lease expiry ends the batch then
        log.error("could not report the timed out batch: %s", err)
    finally:
        os._exit(EXIT_BATCH_TIMEOUT)


def _run_hook(
    queue: WorkerQueue, predictor: predictor_mod.Predictor, summary: dict[str, Any] | None
) -> int:
    log.info("executing on_job_complete")
    try:
        predictor.on_job_complete(summary or {})
    except Exception as err:
        trace = traceback.format_exc()
        log.error("on_job_complete failed\n%s", trace.rstrip())
        queue.finish_hook(_error_line(err), trace)
        return EXIT_FAILED
    queue.finish_hook(None, None)
    log.info("no batches left in queue, job has been completed")
    return EXIT_OK


def main() -> int:
    _configure_logging()
    env = os.environ
    queue = HttpQueue(
        env["CORTEX_URL"],
        env["CORTEX_JOB_ID"],
        env["CORTEX_WORKER_ID"],
        env["CORTEX_WORKER_TOKEN"],
    )
    capture = logship.Capture(logship.Shipper(queue.ship_logs))
    capture.install()
    try:
        return run(queue, Path(env.get("CORTEX_PROJECT_DIR", ".")))
    except JobGone as err:
        log.info("the server ended this worker's job: %s", err)
        return EXIT_OK
    except Refused as err:
        # Not a clean finish: the server would not take what this worker had to say.
        log.error("the server refused a request of this worker: %s", err)
        return EXIT_REFUSED
    except Unreachable as err:
        log.error("the server is unreachable: %s", err)
        return EXIT_UNREACHABLE
    finally:
        capture.uninstall()  # ships what is left before the process ends
        queue.close()
