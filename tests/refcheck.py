"""Comparing a `delimited_files` dataset stored by reference with the copy of its items that
enqueuing made before (`datasets.items` + `datasets.batch_payloads`, kept as the reference
behaviour): the same payloads, byte for byte, with the same item counts, in the same order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cortex import datasets, jobspec, scan
from cortex.worker import ranges


def copied(dataset: jobspec.FileDataset, roots: tuple[Path, ...]) -> list[tuple[str, int]]:
    values = datasets.items("delimited_files", dataset, roots)
    return list(datasets.batch_payloads(values, dataset.batch_size))


def by_reference(
    dataset: jobspec.FileDataset, roots: tuple[Path, ...]
) -> list[tuple[str, int]]:
    """Each batch's reference read back as a worker reads it."""
    out = []
    for ref, items, size in scan.reference_batches(dataset, roots):
        assert ranges.is_ref(ref)
        segments = json.loads(ref)["ref"]
        assert size == sum(s[3] - s[2] if s[0] else len(s[1]) for s in segments)
        body, value = ranges.payload(segments, ranges.read_here)
        assert len(value) == items
        out.append((body.decode(), items))
    return out


def file_dataset(paths: list[str], batch_size: int, **more: Any) -> jobspec.FileDataset:
    return jobspec.FileDataset.model_validate(
        {"s3_paths": paths, "batch_size": batch_size, **more}
    )


def assert_same(paths: list[str], roots: tuple[Path, ...], sizes: tuple[int, ...]) -> None:
    for size in sizes:
        dataset = file_dataset(paths, size)
        assert by_reference(dataset, roots) == copied(dataset, roots), f"batch_size {size}"
