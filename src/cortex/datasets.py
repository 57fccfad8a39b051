"""File datasets (spec §6.2): listing files under prefixes, filtered by globs, and streaming the
JSON values of JSON-lines files, as generators over fsspec, so memory stays flat.

Storage is read through fsspec, for these schemes only: `s3://` (s3fs), `gs://` (gcsfs),
`http(s)://` (one URL is one file) and local paths (`/abs/path` or `file:///abs/path`).
Credentials come from each storage's usual places (environment, config files); a submission
never carries them. Local paths are served only under the server's data roots, checked after
links and `..` are resolved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from cortex import errors, exactjson, globs, jobspec, locations, spec
from cortex.locations import SCHEMES, Location, parse_location

# How much of a file is read at once. Lines are cut from each chunk; the rest of a line waits
# for the next chunk, so a value split across chunks (or a UTF-8 character: it never holds a
# newline byte) comes out whole.
READ_CHUNK_BYTES = 8 << 20
# A line (one or more values) longer than this fails rather than growing the buffer without
# end: a 2 GB file without newlines must not be read into memory.
MAX_LINE_BYTES = 32 << 20
_LISTING_PAGE = 1000
_LOCAL = locations.LOCAL
_HTTP = locations.HTTP
__all__ = ["SCHEMES", "Location", "parse_location"]  # where they were defined before


class DatasetError(errors.CortexError):
    """The dataset cannot be read as asked: a bad value, an item over the limit, a path."""

    kind = "batchapi.enqueue_failed"


class StorageError(DatasetError):
    """The storage refused or could not be reached; the message carries its own reason."""

    kind = "batchapi.storage_error"


class PathNotAllowed(DatasetError):
    kind = "batchapi.path_not_allowed"


def check_remote(paths: Iterable[str], allowed: tuple[str, ...]) -> None:
    """Refuse a remote location (s3://, gs://, http(s)://) outside the `allowed` URL prefixes
    (`CORTEX_DATA_URLS`); with none set, every remote location may be read (the server's
    credentials and network are the limit). Local paths are checked against the data roots."""
    if not allowed:
        return
    for path in paths:
        loc = parse_location(path)
        if loc.scheme != _LOCAL and not locations.under_prefixes(loc.prefix, allowed):
            raise PathNotAllowed(
                f"{path}: this server reads remote datasets only under "
                f"{', '.join(allowed)} (CORTEX_DATA_URLS)"
            )


def distinct_locations(paths: Iterable[str]) -> list[Location]:
    """The prefixes to list, each file once: a prefix that starts with another one lists
    nothing the shorter one does not (two string prefixes of one URL always nest)."""
    locations = [parse_location(p) for p in paths]
    kept: list[Location] = []
    for i, loc in enumerate(locations):
        covered = any(
            loc.key.startswith(other.key) and (loc.key != other.key or j < i)
            for j, other in enumerate(locations)
            if j != i
        )
        if not covered:
            kept.append(loc)
    return kept


# -- local paths ---------------------------------------------------------------------------------


def _inside(path: str, roots: Iterable[Path]) -> bool:
    return any(path == str(root) or path.startswith(str(root).rstrip("/") + "/") for root in roots)


def check_local(loc: Location, roots: tuple[Path, ...]) -> None:
    """Refuse a local prefix outside the data roots, or one that climbs out with `..`."""
    if ".." in loc.path.split("/"):
        raise PathNotAllowed(f"{loc.prefix}: a local path may not contain '..'")
    resolved = [Path(os.path.realpath(root)) for root in roots]
    folder = loc.path if loc.path.endswith("/") else os.path.dirname(loc.path)
    real = os.path.realpath(folder)
    if not _inside(os.path.normpath(folder), resolved) and not _inside(real, resolved):
        raise PathNotAllowed(_outside_message(loc.prefix, roots))
    if not _inside(real, resolved):  # inside by its name, outside through a link
        raise PathNotAllowed(f"{loc.prefix}: leads outside the data roots through a link")


def _outside_message(what: str, roots: tuple[Path, ...]) -> str:
    names = ", ".join(str(r) for r in roots)
    return (
        f"{what}: local paths are served only under the server's data roots ({names}; set "
        "CORTEX_DATA_ROOTS or --data-roots to change them)"
    )


def _walk_local(loc: Location, roots: tuple[Path, ...]) -> Iterator[str]:
    """Files whose path starts with the prefix, in name order, without reading whole trees
    into memory. Links to folders are not followed (no loops); links to files are listed, and
    `list_files` refuses those that lead outside the roots."""
    check_local(loc, roots)
    if loc.path.endswith("/"):
        folder, name_prefix = loc.path, ""
    else:
        folder, name_prefix = os.path.dirname(loc.path) or "/", os.path.basename(loc.path)
    base = loc.prefix[: len(loc.prefix) - len(loc.path)]  # "file://" or ""

    def scan(directory: str, name_filter: str) -> Iterator[str]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(
                    (e for e in it if e.name.startswith(name_filter)), key=lambda e: e.name
                )
        except FileNotFoundError:
            return
        except NotADirectoryError:
            return
        except OSError as err:
            raise StorageError(f"cannot list {base}{directory}: {err.strerror or err}") from None
        for entry in entries:
            path = os.path.join(directory, entry.name)
            if entry.is_symlink() and entry.is_dir():
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from scan(path, "")
            elif entry.is_file():
                yield base + path

    yield from scan(folder, name_prefix)


# -- listing -------------------------------------------------------------------------------------


def filesystem(loc: Location) -> Any:
    import fsspec  # imported here: only file datasets need it (and its plugins)

    try:
        return fsspec.filesystem(loc.scheme)
    except (ImportError, ValueError) as err:
        raise errors.InvalidSubmission(
            f"{loc.prefix}: {loc.scheme}:// is not available on this server ({err}; for s3:// "
            "install cortex-batch[s3], for gs:// cortex-batch[gcs])",
            kind="batchapi.invalid_path",
        ) from None


def _list_remote(loc: Location) -> Iterator[str]:
    fs = filesystem(loc)
    bucket, _, key_prefix = loc.path.partition("/")
    scheme = loc.scheme
    iterdir = getattr(fs, "_iterdir", None)
    if iterdir is not None and getattr(fs, "async_impl", False):
        # s3fs: page through list_objects_v2 without a delimiter, a page at a time.
        from fsspec.asyn import sync

        agen = iterdir(bucket, delimiter="", prefix=key_prefix)

        async def page() -> list[str]:
            out: list[str] = []
            async for info in agen:
                name = info["name"]  # bucket/key
                if info.get("type") == "file" and not name.endswith("/"):
                    out.append(name)
                if len(out) >= _LISTING_PAGE:
                    break
            return out

        try:
            while True:
                keys = sync(fs.loop, page)
                if not keys:
                    return
                for name in keys:
                    yield f"{scheme}://{name}"
        finally:
            sync(fs.loop, agen.aclose)
    folder = loc.path.rpartition("/")[0]
    found = fs.find(folder or bucket)  # other filesystems: one listing, then filtered
    for path in sorted(found):
        if path.startswith(loc.path) and not path.endswith("/"):
            yield f"{scheme}://{path}"


def _storage_reason(err: BaseException) -> str:
    """The storage's own words: the error, and what caused it (fsspec wraps a refused
    connection in a FileNotFoundError that names only the URL)."""
    parts: list[str] = []
    seen: BaseException | None = err
    while seen is not None and len(parts) < 3:
        text = str(seen) or type(seen).__name__
        if isinstance(seen, FileNotFoundError) and seen.__cause__ is None:
            text = f"not found: {text}"
        if not parts or text not in parts[-1]:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    reason = ": ".join(parts)
    return reason if len(reason) < 500 else reason[:500] + "..."


storage_reason = _storage_reason  # for the other readers of storage (models)


def list_location(loc: Location, roots: tuple[Path, ...]) -> Iterator[str]:
    """Every file under one prefix, as a URL written like the prefix."""
    if loc.scheme == _LOCAL:
        yield from _walk_local(loc, roots)
        return
    if loc.scheme in _HTTP:
        yield loc.prefix  # an http(s) URL is one file: HTTP has no listing
        return
    try:
        yield from _list_remote(loc)
    except FileNotFoundError:  # no such bucket: nothing matches
        return
    except errors.CortexError:
        raise
    except Exception as err:
        raise StorageError(f"cannot list {loc.prefix}: {_storage_reason(err)}") from None


def list_files(dataset: jobspec.FileDataset, roots: tuple[Path, ...]) -> Generator[str, None, None]:
    """The dataset's files, each once, in prefix order (and name order within a prefix)."""
    includes = globs.Globs(dataset.includes)
    excludes = globs.Globs(dataset.excludes)
    resolved = [Path(os.path.realpath(root)) for root in roots]
    for loc in distinct_locations(dataset.paths):
        for url in list_location(loc, roots):
            if not globs.keep(url, includes, excludes):
                continue
            if loc.scheme == _LOCAL:
                path = parse_location(url).path
                if os.path.islink(path) and not _inside(os.path.realpath(path), resolved):
                    raise PathNotAllowed(f"{url}: a link to a file outside the server's data roots")
            yield url


# -- reading -------------------------------------------------------------------------------------


def open_file(url: str, roots: tuple[Path, ...]) -> BinaryIO:
    loc = parse_location(url)
    if loc.scheme == _LOCAL:
        check_local(loc, roots)
        if not _inside(os.path.realpath(loc.path), [Path(os.path.realpath(r)) for r in roots]):
            raise PathNotAllowed(_outside_message(url, roots))
        try:
            return open(loc.path, "rb")
        except OSError as err:
            raise StorageError(f"cannot read {url}: {err.strerror or err}") from None
    fs = filesystem(loc)
    try:
        return fs.open(loc.path if loc.scheme not in _HTTP else url, "rb", block_size=0)  # type: ignore[no-any-return]
    except Exception as err:
        raise StorageError(f"cannot read {url}: {_storage_reason(err)}") from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constants)


def line_values(line: bytes, url: str, line_no: int) -> Iterator[bytes]:
    """The JSON values on one line, each as compact JSON bytes (the common single value keeps
    its own text); errors name the file and the line."""
    text = line.strip()
    if not text:
        return
    if len(text) <= spec.MAX_ITEM_BYTES:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # several values on the line, or an error: the slow path says which
        else:
            _check_depth(value, text, url, line_no)
            yield text
            return
    try:
        decoded = text.decode()
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{url}, line {line_no}: not valid UTF-8 at byte {err.start + 1}",
            kind="batchapi.invalid_item",
        ) from None
    pos = 0
    while pos < len(decoded):
        try:
            value, end = _DECODER.raw_decode(decoded, pos)
        except ValueError as err:
            raise DatasetError(
                f"{url}, line {line_no}: not valid JSON: {err}", kind="batchapi.invalid_item"
            ) from None
        try:
            raw = exactjson.dumps(value)  # an integer past 64 bits stays exact
        except TypeError as err:
            raise DatasetError(
                f"{url}, line {line_no}: cannot be stored as JSON: {err}",
                kind="batchapi.invalid_item",
            ) from None
        if len(raw) > spec.MAX_ITEM_BYTES:
            raise DatasetError(
                f"{url}, line {line_no}: an item has size {len(raw)} bytes which exceeds the "
                f"limit ({spec.MAX_ITEM_BYTES} bytes)",
                kind="batchapi.item_size_exceeds_limit",
            )
        _check_depth(value, raw, url, line_no)
        yield raw
        pos = end
        while pos < len(decoded) and decoded[pos] in " \t\r\n":
            pos += 1


def _check_depth(value: Any, text: bytes, url: str, line_no: int) -> None:
    # Counting brackets is cheap and rules out deep nesting for almost every line.
    deep = text.count(b"[") + text.count(b"{") > spec.MAX_JSON_DEPTH
    if deep and spec.json_depth(value) > spec.MAX_JSON_DEPTH:
        raise DatasetError(
            f"{url}, line {line_no}: nests deeper than {spec.MAX_JSON_DEPTH} levels",
            kind="batchapi.invalid_item",
        )


def read_block(file: BinaryIO, url: str) -> Any:
    """A function that reads the file's next READ_CHUNK_BYTES (b"" at its end)."""

    def read() -> bytes:
        try:
            return file.read(READ_CHUNK_BYTES)
        except Exception as err:
            raise StorageError(f"cannot read {url}: {_storage_reason(err)}") from None

    return read


def read_values(url: str, roots: tuple[Path, ...]) -> Iterator[bytes]:
    """Every JSON value of a JSON-lines file, read in chunks of READ_CHUNK_BYTES."""
    with open_file(url, roots) as file:
        line_no = 0
        carry = b""
        first = True
        read = read_block(file, url)
        while True:
            chunk = read()
            if not chunk:
                break
            if first:
                chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                first = False
            data = carry + chunk if carry else chunk
            lines = data.split(b"\n")
            carry = lines.pop()
            if len(carry) > MAX_LINE_BYTES:
                raise DatasetError(
                    f"{url}, line {line_no + len(lines) + 1}: longer than {MAX_LINE_BYTES} "
                    "bytes without a newline",
                    kind="batchapi.item_size_exceeds_limit",
                )
            for line in lines:
                line_no += 1
                yield from line_values(line, url, line_no)
        if carry:  # a final line without a newline
            yield from line_values(carry, url, line_no + 1)


def items(
    kind: str,
    dataset: jobspec.FileDataset,
    roots: tuple[Path, ...],
    on_file: Any = None,
) -> Iterator[bytes]:
    """The dataset's items as JSON bytes: file URLs (file_path_lister) or the values of the
    files (delimited_files)."""
    for url in list_files(dataset, roots):
        if kind == "file_path_lister":
            yield orjson.dumps(url)
        else:
            if on_file is not None:
                on_file(url)
            yield from read_values(url, roots)


def batch_payloads(values: Iterator[bytes], batch_size: int) -> Iterator[tuple[str, int]]:
    """JSON arrays of `batch_size` items (the last one may be shorter), with their item
    counts; batches fill across file boundaries."""
    buffer: list[bytes] = []
    for value in values:
        buffer.append(value)
        if len(buffer) >= batch_size:
            yield (b"[" + b",".join(buffer) + b"]").decode(), len(buffer)
            buffer = []
    if buffer:
        yield (b"[" + b",".join(buffer) + b"]").decode(), len(buffer)
