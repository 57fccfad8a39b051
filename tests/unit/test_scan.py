"""`delimited_files` by reference on local files: the scan's references, read back as a
worker reads them, give byte for byte the payloads the copy of the items gave, and a file that
changed after its scan fails its batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cortex import datasets, spec
from cortex.worker import ranges
from refcheck import FILES, assert_same, by_reference, copied, file_dataset

SIZES = (1, 2, 3, 5, 1000)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, body in FILES.items():
        (tmp_path / name).write_bytes(body)
    return tmp_path


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_kind_of_line_gives_the_copys_payloads(root: Path, name: str) -> None:
    assert_same([str(root / name)], (root,), SIZES)


def test_batches_fill_across_files_and_blocks_as_before(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of 7 bytes: lines, characters and the byte order mark straddle block edges.
    monkeypatch.setattr(datasets, "READ_CHUNK_BYTES", 7)
    small = {n: b for n, b in FILES.items() if n != "compacts.jsonl"}
    assert_same([str(root / n) for n in sorted(small)], (root,), SIZES)


def test_a_big_file_in_many_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "READ_CHUNK_BYTES", 4096)
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"n": n, "t": "é" * (n % 50)}, ensure_ascii=False) for n in range(3000)]
    lines[1234] = '{"n": 1234} {"n": "again"}'  # a copied line among ranges
    lines[2000:2100] = [json.dumps([n, [n]]) for n in range(2000, 2100)]  # a run of arrays
    lines[2050] = "[2050] [2050]"
    path.write_text("\n".join(lines) + "\n")
    assert_same([str(path)], (tmp_path,), (7, 100))


def test_an_item_over_the_limit_fails_the_enqueue_as_before(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"a": 1}\n"' + b"x" * (spec.MAX_ITEM_BYTES + 1) + b'"\n')
    dataset = file_dataset([str(path)], 1)
    with pytest.raises(datasets.DatasetError) as copy:
        copied(dataset, (tmp_path,))
    with pytest.raises(datasets.DatasetError) as ref:
        by_reference(dataset, (tmp_path,))
    assert (ref.value.kind, str(ref.value)) == (copy.value.kind, str(copy.value))
    assert ref.value.kind == "batchapi.item_size_exceeds_limit"
    assert f"{path}, line 2:" in str(ref.value)


def _segments(path: Path, batch_size: int) -> list[list[list]]:
    from cortex import scan

    dataset = file_dataset([str(path)], batch_size)
    return [json.loads(ref)["ref"] for ref, _, _ in scan.reference_batches(dataset, (path.parent,))]


def test_a_file_changed_after_its_scan_fails_its_batches(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n')
    (segments,) = _segments(path, 10)
    assert ranges.payload(segments, ranges.read_here)[1] == [{"n": 1}, {"n": 2}]
    # The same size, another modification time: other bytes may be there.
    stat = path.stat()
    path.write_text('{"n": 3}\n{"n": 4}\n')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ranges.Unreadable, match="changed since it was scanned"):
        ranges.payload(segments, ranges.read_here)
    path.unlink()  # not on this machine: another reader (the server) may have it
    with pytest.raises(ranges.Unreachable):
        ranges.payload(segments, ranges.read_here)


def test_a_bad_line_fails_its_batch_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    deep = "[" * (spec.MAX_JSON_DEPTH + 1) + "]" * (spec.MAX_JSON_DEPTH + 1)
    lines = b'{"ok": 1}\n{"ok": \n{"bad": "\xff"}\n{"n": NaN}\n'
    path.write_bytes(lines + b'{"d": ' + deep.encode() + b"}\n")
    batches = _segments(path, 1)
    assert len(batches) == 5
    expected = [
        None,
        f"{path}, line 2: not valid JSON",
        f"{path}, line 3: not valid UTF-8",
        f"{path}, line 4: not valid JSON",
        "nests deeper than 64 levels",
    ]
    for segments, message in zip(batches, expected, strict=True):
        if message is None:
            ranges.payload(segments, ranges.read_here)
            continue
        with pytest.raises(ranges.Unreadable) as err:
            ranges.payload(segments, ranges.read_here)
        assert message in str(err.value)


def test_the_worker_knows_the_depth_limit() -> None:
    assert ranges.MAX_JSON_DEPTH == spec.MAX_JSON_DEPTH
