"""Enqueuing a file dataset: its items streamed into batch rows, a chunk per transaction
(`delimited_files` batches as references to their lines, `cortex.scan`).

Memory stays flat: files are read in chunks (`cortex.datasets`), and at most one chunk of
batches is held before it is written. Each chunk moves the job's resume cursor (items written)
in the same transaction as its batches, and every chunk but the last holds whole batches only,
so an enqueuing cut short (a server restart, a replica lost) resumes by skipping the items
already written: the batches come out as one uninterrupted run would have made them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cortex import datasets, jobspec, scan
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
    batches: Iterable[tuple[str, int] | tuple[str, int, int]]
    if kind == "delimited_files":
        # Stored by reference; resuming skips the whole batches earlier runs wrote.
        batches = _skip(scan.reference_batches(dataset, roots, on_file), job.enqueued_items)
    else:
        values = datasets.items(kind, dataset, roots, on_file)
        # Resuming: skip what earlier runs wrote (read again, not written again).
        values = itertools.islice(values, job.enqueued_items, None)
        batches = datasets.batch_payloads(values, dataset.batch_size)
    return write(store, job.job_id, owner, batches, on_chunk)


def _skip(batches: Iterator[tuple[str, int, int]], items: int) -> Iterator[tuple[str, int, int]]:
    """The batches after the first `items` items (always whole batches: every chunk written
    but the last holds whole batches, and the last one finished the enqueue)."""
    for batch in batches:
        if items <= 0:
            yield batch
        items -= batch[1]


def write(
    store: Store,
    job_id: str,
    owner: str,
    batches: Iterable[tuple[str, int] | tuple[str, int, int]],
    on_chunk: Callable[[Job], None],
    chunk_batches: int = CHUNK_BATCHES,
) -> Job | None:
    """Write (payload, item count) batches in chunks, a transaction each, then finish the
    job's enqueuing; None if it stopped being `owner`'s to enqueue. Shared by file datasets
    and item lists (already in memory: bigger chunks, fewer commits). A reference batch
    comes as (reference, item count, bytes of its lines): its size is that of its lines."""
    chunk: list[str] = []
    sizes: list[int] = []
    chunk_items = chunk_bytes = 0
    last_flush = time.monotonic()
    for batch in batches:
        payload, count = batch[0], batch[1]
        chunk.append(payload)
        sizes.append(batch[2] if len(batch) == 3 else len(payload))
        chunk_items += count
        chunk_bytes += len(payload)
        if (
            len(chunk) >= chunk_batches
            or chunk_bytes >= CHUNK_BYTES
            or time.monotonic() - last_flush >= FLUSH_S
        ):
            written = store.append_batches(job_id, chunk, chunk_items, owner, sizes)
            if written is None:
                return None
            on_chunk(written)
            chunk, sizes, chunk_items, chunk_bytes = [], [], 0, 0
            last_flush = time.monotonic()
    if chunk:
        written = store.append_batches(job_id, chunk, chunk_items, owner, sizes)
        if written is None:
            return None
        on_chunk(written)
    return store.finish_enqueue(job_id, owner, NO_DATA)
