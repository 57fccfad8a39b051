"""Writing a job's results to the output location its submission named (`"output": {"path"}`):
JSON-lines part files of its results and an `errors.jsonl` of its failed batches, under
`<path>/<job_id>/`, once every batch has ended and before the job's final status (or its
hook) is published, so that a pipeline that sees the status finds the files.

One thread a job, on the replica that saw the last batch end; the leader resumes a write that
a restart interrupted. Writing is idempotent (the same files with the same content), and the
step after it is a compare-and-set (`ResultStore.finish_output`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from cortex import datasets, exactjson, jobspec, locations
from cortex.jobs import JobStatus
from cortex.lifecycle import Lifecycle
from cortex.settings import Settings
from cortex.store import Job, Store

log = logging.getLogger("cortex.server")

# A part file of results holds about this much (a batch's results are never split).
PART_BYTES = 64 << 20
_ATTEMPTS = 3
_RETRY_S = 1.0


def check_allowed(path: str, settings: Settings) -> None:
    """Refuse an output path the server must not write (InvalidSubmission, PathNotAllowed):
    the same rules as datasets: a local folder under the data roots, a remote one under
    `CORTEX_DATA_URLS` if that is set, and a scheme this server has the package for."""
    loc = _folder(path)
    if loc.scheme == locations.LOCAL:
        datasets.check_local(loc, settings.resolved_data_roots)
        return
    datasets.check_remote([loc.prefix], settings.data_urls)
    datasets.filesystem(loc)


def _folder(path: str) -> locations.Location:
    jobspec.output_location(path)
    return locations.parse_location(path.rstrip("/") + "/")


def write(
    store: Store, job: Job, settings: Settings, part_bytes: int = PART_BYTES
) -> dict[str, Any]:
    """Write the job's results (a part file about every `part_bytes`) and errors; returns
    what its status shows as `output`."""
    assert job.output is not None
    base = job.output["path"]
    folder = _folder(f"{base.rstrip('/')}/{job.job_id}/")
    if folder.scheme == locations.LOCAL:
        import fsspec

        datasets.check_local(folder, settings.resolved_data_roots)
        fs: Any = fsspec.filesystem("file", auto_mkdir=True)
    else:
        fs = datasets.filesystem(folder)
    local = folder.scheme == locations.LOCAL
    files: list[str] = []
    pages = store.result_pages(job.job_id)
    page: str | None = next(pages, "")  # no results: one empty part, always a file to read
    while page is not None:
        name = f"results-{len(files):05d}.jsonl"
        with _created(fs, folder.path + name, local) as out:
            size = 0
            while page is not None and size < part_bytes:
                data = page.encode()
                out.write(data)
                size += len(data) or 1  # an empty first page still starts this part
                page = next(pages, None)
        files.append(folder.prefix + name)
    with _created(fs, folder.path + "errors.jsonl", local) as errors_file:
        for records in store.error_pages(job.job_id):
            errors_file.write(b"".join(exactjson.dumps(r) + b"\n" for r in records))
    return {"path": base, "files": files, "errors": folder.prefix + "errors.jsonl"}


@contextlib.contextmanager
def _created(fs: Any, path: str, local: bool) -> Iterator[Any]:
    """A file written whole or not at all. An object store's upload is: the object appears
    when it completes. A local file is written under a temporary name and renamed into place,
    so that two writers (a replica and a leader resuming its write) never mix their bytes."""
    target = f"{path}.tmp-{uuid.uuid4().hex}" if local else path
    try:
        with fs.open(target, "wb") as out:
            yield out
    except BaseException:
        if local:
            with contextlib.suppress(OSError):
                fs.rm(target)
        raise
    if local:
        fs.mv(target, path)


class Outputs:
    """The jobs whose results this replica is writing out, a thread each."""

    def __init__(self, settings: Settings, store: Store, lifecycle: Lifecycle) -> None:
        self.settings = settings
        self.store = store
        self.lifecycle = lifecycle
        self._writing: set[str] = set()
        self._lock = threading.Lock()

    def start(self, job_id: str) -> None:
        """Write a job's results out, unless this replica does already."""
        with self._lock:
            if job_id in self._writing:
                return
            self._writing.add(job_id)
        threading.Thread(
            target=self._write, args=(job_id,), name=f"cortex-output-{job_id}", daemon=True
        ).start()

    def resume(self) -> None:
        """Start the writes a restart interrupted (the leader's: no other replica writes)."""
        for job in self.store.writing_outputs():
            self.start(job.job_id)

    def _write(self, job_id: str) -> None:
        try:
            self._write_once(job_id)
        except Exception:
            log.exception("job %s: writing its results failed", job_id)
        finally:
            with self._lock:
                self._writing.discard(job_id)

    def _write_once(self, job_id: str) -> None:
        job = self.store.get_job(job_id)
        if job is None or job.output is None or job.completion_state != "writing":
            return
        reason = ""
        for attempt in range(_ATTEMPTS):
            try:
                output = write(self.store, job, self.settings)
                break
            except Exception as err:
                reason = datasets.storage_reason(err)
                log.warning("job %s: cannot write its results (%s)", job_id, reason)
                if attempt + 1 < _ATTEMPTS:
                    time.sleep(_RETRY_S)
        else:
            self.lifecycle.end_job(
                job_id,
                JobStatus.UNEXPECTED_ERROR,
                "batchapi.output_failed",
                f"cannot write the job's results to {job.output['path']}: {reason}",
            )
            return
        self.lifecycle.job_event(
            job_id,
            f"wrote the job's results to {len(output['files'])} files and its errors to "
            f"{output['errors']}",
        )
        status = self.store.finish_output(job_id, output)
        if status is not None:
            self.lifecycle.ended(job_id, status, job.error_message)
        else:
            self.lifecycle.wake()
