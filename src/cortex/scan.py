"""Enqueuing a `delimited_files` dataset by reference: one streaming scan of each file for
its line boundaries, and batches stored as the byte ranges of their lines
(`cortex.worker.ranges` reads them back into the payloads a copy would have made).

The scan reads each file once, in blocks of `datasets.READ_CHUNK_BYTES`. A line that starts
with `{` (or `[`) is looked at only as far as finding its newline (`bytes.find`), unless a
regular expression run over the block finds `}` (`]`) followed on the same line by the start of
another value (the only way such a line holds several values). Every other line (blank,
indented, a scalar, over `spec.MAX_ITEM_BYTES`, or found so) is read as the copy read it
(`datasets.line_values`): blank lines are not items; a line of one value keeps its range; a
line of several values (or one the copy re-encodes) is stored as those values, copied, as
before; a bad line among these fails the enqueue with the copy's kind and message (an item over
the size limit: `batchapi.item_size_exceeds_limit`, naming the file and line). A line longer
than `datasets.MAX_LINE_BYTES` without a newline fails the enqueue; a byte order mark at the
start of a file is skipped.

Lines that start with `{` or `[` are not parsed on the server: the worker parses them when it reads
its batch, and a line that is not valid UTF-8 or JSON, or nests too deeply, fails that batch
(naming the file and line) rather than the whole enqueue. Every read checks that the file is
the version scanned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from cortex import datasets, jobspec, locations, spec
from cortex.worker import ranges

_BOM = b"\xef\xbb\xbf"


class Batches:
    """The batches being filled: the open one's segments, and those filled since last taken."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.segments: list[ranges.Segment] = []
        self.items = 0
        self.bytes = 0
        self.filled: list[tuple[str, int, int]] = []

    def room(self) -> int:
        return self.size - self.items

    def add(self, segment: ranges.Segment, items: int, size: int) -> None:
        self.segments.append(segment)
        self.items += items
        self.bytes += size
        if self.items == self.size:
            self.close()

    def close(self) -> None:
        """The open batch as (reference, items, bytes of lines), if it holds any."""
        if self.items:
            self.filled.append((_ref(self.segments), self.items, self.bytes))
        self.segments, self.items, self.bytes = [], 0, 0

    def take(self) -> list[tuple[str, int, int]]:
        filled, self.filled = self.filled, []
        return filled


def _ref(segments: list[ranges.Segment]) -> str:
    """The stored payload: `{"ref": [segment, ...]}` (see `cortex.worker.ranges`)."""
    return orjson.dumps({"ref": segments}).decode()


def _remote_version(url: str) -> dict[str, Any] | None:
    """A remote file's version, asked before it is opened: a rewrite after this is seen by
    every read as a change (the other order could pair new lines with the old version)."""
    loc = locations.parse_location(url)
    if loc.scheme == locations.LOCAL:
        return None
    try:
        info = datasets.filesystem(loc).info(loc.path if loc.scheme not in locations.HTTP else url)
    except Exception as err:
        raise datasets.StorageError(f"cannot read {url}: {datasets.storage_reason(err)}") from None
    return ranges.remote_version(info)


def reference_batches(
    dataset: jobspec.FileDataset,
    roots: tuple[Path, ...],
    on_file: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, int, int]]:
    """The dataset's batches as (reference, item count, bytes of lines): `batch_size` items
    each but the last, filling across file boundaries, as `datasets.batch_payloads` makes
    them from the copied items."""
    batches = Batches(dataset.batch_size)
    for url in datasets.list_files(dataset, roots):
        if on_file is not None:
            on_file(url)
        remote = _remote_version(url)
        with datasets.open_file(url, roots) as file:
            # A local file's version is that of the file opened (the same inode, whatever
            # replaces its name meanwhile).
            version = remote or ranges.local_version(os.fstat(file.fileno()))
            for _ in _scan(file, url, version, batches):
                yield from batches.take()
    batches.close()
    yield from batches.take()


def _scan(file: BinaryIO, url: str, version: dict[str, Any], out: Batches) -> Iterator[None]:
    """Add a file's lines to `out`, yielding after each block read (`out.take()` then holds
    the batches filled meanwhile)."""
    read = datasets.read_block(file, url)
    data = read()
    base = 0  # the file offset of data[0]
    pos = 3 if data.startswith(_BOM) else 0
    # The open segment: where it starts, its first line's number, its items so far and the
    # blank lines among them (line numbers are counted only where one is needed).
    seg_start, seg_line, items, skipped = pos, 1, 0, 0
    want = out.room()
    while True:
        ahead = read() if data else b""
        last = not ahead
        find = data.find
        # Where a line may hold an object and more after it: those lines are looked at.
        maybe = [m.start() for m in _MORE_AFTER_OBJECT.finditer(data, pos)]
        opens = _OBJECTS  # arrays join once their expression has run over this block
        maybe.append(len(data) + 1)
        next_maybe = 0
        cand = maybe[0]
        while True:
            # The common line: an object within the item limit, with no candidate in it.
            while True:
                nl = find(b"\n", pos)
                if nl < 0 or nl >= cand or data[pos] not in opens or nl - pos > _MAX_ITEM:
                    break
                pos = nl + 1
                items += 1
                if items == want:
                    break
            if items == want:
                _add(out, url, version, seg_start, base + pos, seg_line, items)
                seg_start, seg_line = base + pos, seg_line + items + skipped
                items = skipped = 0
                want = out.room()
                continue
            if nl < 0:
                if not last or pos >= len(data):
                    break
                nl = len(data)  # a last line without a newline
            while cand < pos:
                next_maybe += 1
                cand = maybe[next_maybe]
            line_no = seg_line + items + skipped
            if data[pos] == _OPEN_ARRAY and opens is _OBJECTS:  # the block's first array line
                more = [m.start() for m in _MORE_AFTER_ARRAY.finditer(data, pos)]
                maybe, next_maybe = sorted(maybe[next_maybe:] + more), 0
                cand, opens = maybe[0], _OBJECTS_AND_ARRAYS
            if data[pos] not in opens or nl - pos > _MAX_ITEM or cand < nl:
                values = _look(data[pos:nl], url, line_no)
                if values is _BLANK_LINE:
                    skipped += 1
                    pos = nl + 1
                    continue
                if values is not _ONE_VALUE:  # several values, or one re-encoded: copied
                    _add(out, url, version, seg_start, base + pos, seg_line, items)
                    for value in values:
                        out.add([None, value.decode(), 1], 1, len(value))
                    pos = nl + 1
                    seg_start, seg_line = base + min(pos, len(data)), line_no + 1
                    items = skipped = 0
                    want = out.room()
                    continue
            items += 1
            pos = nl + 1
            if items == want:
                _add(out, url, version, seg_start, base + min(pos, len(data)), seg_line, items)
                seg_start, seg_line = base + pos, line_no + 1
                items = skipped = 0
                want = out.room()
        if last:
            break
        rest = data[pos:]
        if len(rest) > datasets.MAX_LINE_BYTES:
            raise datasets.DatasetError(
                f"{url}, line {seg_line + items + skipped}: longer than "
                f"{datasets.MAX_LINE_BYTES} bytes without a newline",
                kind="batchapi.item_size_exceeds_limit",
            )
        base += pos
        data, pos = rest + ahead, 0
        yield
    _add(out, url, version, seg_start, base + min(pos, len(data)), seg_line, items)
    yield


def _add(
    out: Batches, url: str, version: dict[str, Any], start: int, end: int, line: int, items: int
) -> None:
    if items:
        out.add([url, version, start, end, line, items], items, end - start)


_MAX_ITEM = spec.MAX_ITEM_BYTES
_OBJECTS = frozenset(b"{")
_OBJECTS_AND_ARRAYS = frozenset(b"{[")
_OPEN_ARRAY = ord("[")
# An object's closing brace followed, on the same line, by the start of another value: the
# only way a line that starts with `{` holds more than one value (inside a string it is rare).
_MORE_AFTER_OBJECT = re.compile(rb'\}[ \t\r\x0b\x0c]*[\[{"\-0-9tfn]')
# The same for a line that starts with `[`: run over a block from its first such line on.
_MORE_AFTER_ARRAY = re.compile(rb'\][ \t\r\x0b\x0c]*[\[{"\-0-9tfn]')
_BLANK_LINE: list[bytes] = []
_ONE_VALUE: list[bytes] = []


def _look(line: bytes, url: str, line_no: int) -> list[bytes]:
    """What a line the fast path cannot vouch for holds, read as the copy read it: nothing
    (`_BLANK_LINE`), one value to read from the file as it is (`_ONE_VALUE`), or the values
    the copy stored (several on the line, or one it re-encodes); a bad line fails as the copy
    failed it."""
    text = line.strip()
    values = list(datasets.line_values(text, url, line_no))
    if not values:
        return _BLANK_LINE
    return _ONE_VALUE if values == [text] else values
