"""Enqueuing a file dataset: its items streamed into batch rows, a chunk per transaction.

Memory stays flat: files are read in chunks (`cortex.datasets`), and at most one chunk of
batches is held before it is written. Each chunk moves the job's resume cursor (items written)
in the same transaction as its batches, and every chunk but the last holds whole batches only,
so an enqueuing cut short (a server restart, a replica lost) resumes by skipping the items
already written: the batches come out as one uninterrupted run would have made them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from cortex import datasets, jobspec
from cortex.store import Job, Store

# A chunk is written when it holds this many batches, this many bytes, or has waited this
# long: workers see the first batches within about FLUSH_S, and counts stay live.
CHUNK_BATCHES = 1000
CHUNK_BYTES = 16 << 20
FLUSH_S = 0.5

NO_DATA = "unable to enqueue batches because no data was found; check the files with dryRun=true"


def file_dataset(job: Job) -> tuple[str, jobspec.FileDataset]:
    assert job.dataset is not None
    return job.dataset["kind"], jobspec.FileDataset.model_validate(job.dataset)


def run(
    store: Store,
    job: Job,
    roots: tuple[Path, ...],
    owner: str,
    *,
    on_chunk: Callable[[Job], None],
    on_file: Callable[[str], None] | None = None,
) -> Job | None:
    """Write the rest of a job's batches and finish its enqueuing; returns the job as it
    then is, or None if it stopped being `owner`'s to enqueue (stopped, timed out, taken
    over). Dataset errors (`datasets.DatasetError`) propagate to the caller."""
    kind, dataset = file_dataset(job)
    values = datasets.items(kind, dataset, roots, on_file)
    # Resuming: skip what earlier runs wrote (read again, not written again).
    values = itertools.islice(values, job.enqueued_items, None)
    batches = datasets.batch_payloads(values, dataset.batch_size)
    return write(store, job.job_id, owner, batches, on_chunk)


def write(
    store: Store,
    job_id: str,
    owner: str,
    batches: Iterable[tuple[str, int]],
    on_chunk: Callable[[Job], None],
    chunk_batches: int = CHUNK_BATCHES,
) -> Job | None:
    """Write (payload, item count) batches in chunks, a transaction each, then finish the
    job's enqueuing; None if it stopped being `owner`'s to enqueue. Shared by file datasets
    and item lists (already in memory: bigger chunks, fewer commits)."""
    chunk: list[str] = []
    chunk_items = chunk_bytes = 0
    last_flush = time.monotonic()
    for payload, count in batches:
        chunk.append(payload)
        chunk_items += count
        chunk_bytes += len(payload)
        if (
            len(chunk) >= chunk_batches
            or chunk_bytes >= CHUNK_BYTES
            or time.monotonic() - last_flush >= FLUSH_S
        ):
            written = store.append_batches(job_id, chunk, chunk_items, owner)
            if written is None:
                return None
            on_chunk(written)
            chunk, chunk_items, chunk_bytes = [], 0, 0
            last_flush = time.monotonic()
    if chunk:
        written = store.append_batches(job_id, chunk, chunk_items, owner)
        if written is None:
            return None
        on_chunk(written)
    return store.finish_enqueue(job_id, owner, NO_DATA)
