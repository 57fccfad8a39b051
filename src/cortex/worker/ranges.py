"""Batches stored by reference: reading a batch's byte ranges of its JSON-lines files and
making them the payload that copying the lines would have made.

A `delimited_files` batch is stored as a reference (see docs/design.md, "Datasets by
reference"): `{"ref": [segment, ...]}`, a segment per file the batch spans, each
`[url, version, start, end, first_line, items]` (or, for the rare line the scan copies,
`[null, "item,item", items]`). `start`/`end` are byte offsets that always
fall on line boundaries; `first_line` is the 1-based number of the first line in the range (for
error messages); `items` is how many non-blank lines the range holds; `version` is what the
file was when the server scanned it (`{"mtime_ns", "size"}` for a local file, the storage's
`{"etag"|"version_id"|"generation", "size"}` otherwise).

The payload is exactly what the copy made: each line stripped of ASCII whitespace (a `\\r`
before the newline, indentation), blank lines skipped, joined into a JSON array. Every read
checks the file's version first: a file that changed since it was scanned fails its batch
(`Unreadable`) rather than giving other lines. Standard library only: the worker runtime reads
local files with `open`, and remote ones through fsspec where the worker's environment has it
(`read_remote`); the caller falls back to the server otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

# A reference batch's stored payload begins with this; a copied batch's is a JSON array.
REF_PREFIX = '{"ref":'
# Deepest nesting of an item (`cortex.spec.MAX_JSON_DEPTH`, which the worker cannot import).
MAX_JSON_DEPTH = 64
# The whitespace `bytes.strip` removes: a line of only these is blank.
_BLANK = b" \t\n\r\x0b\x0c"

# [url, version, start, end, first_line, items], or [None, "item,item", items] for values the
# scan copied (a line of several values, or one the copy re-encodes).
Segment = list[Any]


class Unreadable(Exception):
    """The batch's data cannot be given as scanned: the file changed, or a line is not one
    JSON value. Trying again does not help; the message names the file (and line)."""


class Unreachable(Exception):
    """This process cannot read the file (no fsspec, no credentials, not on this machine):
    another reader (the server) may."""


def is_ref(payload: str | bytes) -> bool:
    prefix = REF_PREFIX if isinstance(payload, str) else REF_PREFIX.encode()
    return payload.startswith(prefix)  # type: ignore[arg-type]


def lines_of(data: bytes, segment: Segment) -> list[bytes]:
    """The non-blank lines of a segment's bytes, stripped, checked against its item count."""
    url, _, start, end, _, items = segment
    if len(data) != end - start:
        raise Unreadable(
            f"{url}: changed since it was scanned (read {len(data)} bytes of {end - start} "
            f"at offset {start})"
        )
    lines = [line for line in (raw.strip(_BLANK) for raw in data.split(b"\n")) if line]
    if len(lines) != items:
        raise Unreadable(
            f"{url}: changed since it was scanned (bytes {start}-{end} hold {len(lines)} "
            f"lines, not {items})"
        )
    return lines


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def payload(segments: list[Segment], read: Callable[[Segment], bytes]) -> tuple[bytes, Any]:
    """The batch's payload, as a JSON array in UTF-8 bytes and as its value, from its
    segments' bytes as `read` gives them. A line that is not valid UTF-8, not JSON, or nests
    too deeply fails the batch with its file and line named (the copy failed the enqueue)."""
    pieces: list[bytes] = []
    items = 0
    deep: list[int] = []  # the items whose brackets say they may nest too deeply
    for segment in segments:
        if segment[0] is None:  # [None, "item,item", items]: values the scan copied
            pieces.append(segment[1].encode())
            items += segment[2]
            continue
        for line in lines_of(read(segment), segment):
            if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH:
                deep.append(items)
            pieces.append(line)
            items += 1
    body = b"[" + b",".join(pieces) + b"]"
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        _name_bad_line(segments, read)
        raise Unreadable("the batch's lines do not form a JSON array") from None
    for item in deep:
        if _depth(value[item]) > MAX_JSON_DEPTH:
            raise Unreadable(f"item {item} of the batch nests deeper than {MAX_JSON_DEPTH} levels")
    return body, value


def stored_payload(stored: bytes) -> bytes:
    """A batch's payload as JSON bytes from what the store holds for it: a copied payload as
    it is, a reference read by this process (the server, for a worker that cannot read; if
    it cannot either, that is `Unreadable`)."""
    if not is_ref(stored):
        return stored
    try:
        return payload(json.loads(stored)["ref"], read_here)[0]
    except Unreachable as err:  # gone since the scan, or the server's access with it
        raise Unreadable(f"neither the worker nor the server can read it: {err}") from None


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def _name_bad_line(segments: list[Segment], read: Callable[[Segment], bytes]) -> None:
    for segment in segments:
        if segment[0] is None:
            continue
        url, _, _, _, first_line, _ = segment
        for offset, raw in enumerate(read(segment).split(b"\n")):
            line = raw.strip(_BLANK)
            if not line:
                continue
            where = f"{url}, line {first_line + offset}"
            try:
                text = line.decode()
            except UnicodeDecodeError as err:
                raise Unreadable(f"{where}: not valid UTF-8 at byte {err.start + 1}") from None
            try:
                json.loads(text, parse_constant=_no_constants)
            except RecursionError:
                raise Unreadable(f"{where}: nests too deeply") from None
            except ValueError as err:
                if err.args and str(err.args[0]).startswith("Extra data"):
                    raise Unreadable(
                        f"{where}: holds more than one JSON value (a batch by reference takes "
                        "one value a line)"
                    ) from None
                raise Unreadable(f"{where}: not valid JSON: {err}") from None


# -- reading ------------------------------------------------------------------------------------


def local_path(url: str) -> str | None:
    """The path of a local file's URL (`/abs/path` or `file:///abs/path`), None if remote."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url if url.startswith("/") else None


def scheme(url: str) -> str:
    """A URL's storage: its scheme, "file" for a local path."""
    return "file" if local_path(url) is not None else url.partition("://")[0]


def local_version(stat: os.stat_result) -> dict[str, int]:
    return {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def read_local(segment: Segment) -> bytes:
    """A local file's range, after checking that its modification time and size are as
    scanned. `Unreachable` if the file is not on this machine."""
    url, version, start, end = segment[:4]
    path = local_path(url)
    assert path is not None
    try:
        with open(path, "rb") as file:
            found = local_version(os.fstat(file.fileno()))
            if found != version:
                raise Unreadable(_changed(url, version, found))
            file.seek(start)
            return file.read(end - start)
    except FileNotFoundError:
        raise Unreachable(f"{url}: no such file on this machine") from None
    except OSError as err:  # refused, or a disk error: the server may read it yet
        raise Unreachable(f"{url}: {err.strerror or err}") from None


def remote_version(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies one version of a remote file, from fsspec's `info`: the object's version
    id or generation where the storage keeps versions, else its ETag; and its size."""
    for key, name in (
        ("VersionId", "version_id"),
        ("generation", "generation"),
        ("ETag", "etag"),
        ("etag", "etag"),
    ):
        value = info.get(key)
        if value:
            return {name: str(value), "size": info.get("size")}
    return {"size": info.get("size")}


def read_remote(segment: Segment) -> bytes:
    """A remote file's range through fsspec, checking its version before and after the read
    (a rewrite between the two is caught by the second). `Unreachable` if fsspec is not
    importable here or the storage refuses this process."""
    url, version, start, end = segment[:4]
    try:
        import fsspec  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise Unreachable("fsspec is not installed in the worker's environment") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
        before = remote_version(fs.info(path))
        if before != version:
            raise Unreadable(_changed(url, version, before))
        data: bytes = fs.cat_file(path, start=start, end=end)
        after = remote_version(fs.info(path))
    except Unreadable:
        raise
    except Exception as err:
        raise Unreachable(f"{url}: {type(err).__name__}: {err}") from None
    if after != version:
        raise Unreadable(_changed(url, version, after))
    return data


def read_here(segment: Segment) -> bytes:
    """A segment's bytes read by this process: local files with `open`, others with fsspec."""
    return read_local(segment) if local_path(segment[0]) is not None else read_remote(segment)


def _changed(url: str, scanned: dict[str, Any], found: dict[str, Any]) -> str:
    return (
        f"{url} changed since it was scanned for this job (then {_describe(scanned)}, now "
        f"{_describe(found)}): its batches fail rather than give other data; submit the job again"
    )


def _describe(version: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in version.items())
