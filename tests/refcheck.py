"""Comparing a `delimited_files` dataset stored by reference with the copy of its items that
enqueuing made before (`datasets.items` + `datasets.batch_payloads`, kept as the reference
behaviour): the same payloads, byte for byte, with the same item counts, in the same order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cortex import datasets, jobspec, scan, spec
from cortex.worker import ranges

# Each file's bytes exercise one thing the copy did with lines.
FILES = {
    "crlf.jsonl": b'{"a": 1}\r\n{"b": "\xc3\xa9"}\r\n\r\n{"c": 3}\r\n',
    "bom.jsonl": b'\xef\xbb\xbf{"bom": true}\n{"after": 1}\n',
    "blank.jsonl": b'\n\n  \n{"x": 1}\n\t\r\n\x0b\n\x0c\n{"x": 2}\n\n',
    "no-newline.jsonl": b'{"n": 1}\n{"n": 2}',
    # Multi-byte UTF-8 at the edges of every range: first and last characters of lines.
    "utf8.jsonl": "".join(f'"é{n}😀"\n{{"k": "✓{n}"}}\n' for n in range(20)).encode(),
    # Lines that are not one object: several values, scalars, arrays, indentation, a brace
    # inside a string that looks like the end of an object, integers past 64 bits.
    "mixed.jsonl": (
        b'{"a": 1} {"b": 2}\n1 2\n"s" 3\n[1] [2]\n  {"indented": 1}\n{"s": "} {"}\n'
        b'{"t": "}x"}{"u": 1}\n' + str(2**64 + 1).encode() + b"\n[1, 2]\ntrue\nnull\n"
    ),
    # Lines of arrays: read by range once the block's expression for them has run, those of
    # several values copied ("]" in a string is a false alarm, then the line is parsed).
    "arrays.jsonl": (
        b'{"first": "an object"}\n[1, 2]\n[[1], [2, [3]]]\n[1] [2]\n["a] b"]\n[3]{"x": 1}\n'
        b'  [4]\n[5]\t[6]\n[]\n[{"y": [7]}, "z"]\n'
    ),
    # A value over the item limit written with whitespace: the copy stored it compacted.
    "compacts.jsonl": b'{"a": 1}\n[' + b" " * (spec.MAX_ITEM_BYTES + 10) + b'1]\n{"b": 2}\n',
    "empty.jsonl": b"",
}


def copied(dataset: jobspec.FileDataset, roots: tuple[Path, ...]) -> list[tuple[str, int]]:
    values = datasets.items("delimited_files", dataset, roots)
    return list(datasets.batch_payloads(values, dataset.batch_size))


def by_reference(dataset: jobspec.FileDataset, roots: tuple[Path, ...]) -> list[tuple[str, int]]:
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
    return jobspec.FileDataset.model_validate({"s3_paths": paths, "batch_size": batch_size, **more})


def assert_same(paths: list[str], roots: tuple[Path, ...], sizes: tuple[int, ...]) -> None:
    for size in sizes:
        dataset = file_dataset(paths, size)
        assert by_reference(dataset, roots) == copied(dataset, roots), f"batch_size {size}"
