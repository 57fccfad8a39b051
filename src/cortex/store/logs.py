"""Job logs in the store, as compressed chunks of lines: append within the job's budget, read
in bounded pages, prune.

A chunk is what one worker shipped in one request (split past `CHUNK_BYTES`), or one server
line. Filters by worker use the chunk's source and time filters skip whole chunks; the rest is
decided line by line while decoding. Reading holds one chunk's decoded JSON and one page of
lines at a time, whatever the size of the log or of its chunks (a single entry may hold
millions of lines), and never keeps a database transaction open between pages.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import time
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa

from cortex.store import tables as t
from cortex.store.logwrite import (
    CHUNK_BYTES,
    DEFAULT_MAX_BYTES,
    SERVER_SOURCE,
    RawLine,
    Shipment,
    Totals,
    prepare,
    write,
)

# Written by `cortex.store.logwrite`; read here as they always were.
__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_BYTES",
    "SERVER_SOURCE",
    "LogStore",
    "RawLine",
    "Shipment",
    "Totals",
    "prepare",
    "write",
]

if TYPE_CHECKING:  # `sql` puts `protocol` together, which writes log shipments with this module
    from cortex.store.sql import Store

# A page: what a reader formats and sends at once.
PAGE_LINES = 5000
_PAGE_CHARS = 1 << 20
# Chunks fetched per read transaction: at most this many, and this much JSON once unpacked.
_FETCH_CHUNKS = 64
_FETCH_BYTES = 4 << 20
# Lines an ordered read holds at most to put them in time order.
MAX_HELD_LINES = 100_000
# Chunks deleted per transaction when pruning.
_PRUNE_CHUNKS = 64
# A message is split into lines a slice at a time, so that one entry of millions of short
# lines never becomes one list of millions of strings.
_SPLIT_CHARS = 256 << 10


@dataclasses.dataclass(frozen=True)
class LogLine:
    chunk_id: int
    ts: float
    source: str
    stream: str
    level: str | None
    batch_id: str | None
    message: str


@dataclasses.dataclass(frozen=True)
class LogFilter:
    since_ts: float | None = None
    source: str | None = None
    batch_id: str | None = None

    def keep(self, line: LogLine) -> bool:
        if self.since_ts is not None and line.ts < self.since_ts:
            return False
        return self.batch_id is None or line.batch_id == self.batch_id

    @property
    def by_line(self) -> bool:
        """Whether lines are filtered one by one (not only whole chunks)."""
        return self.since_ts is not None or self.batch_id is not None


@dataclasses.dataclass
class Cursor:
    """Where a reader is: past chunk `after`, and `skip` lines (those the filter keeps) into
    the first chunk it reads next. `pages` moves it as each chunk is read to its end."""

    after: int = 0
    skip: int = 0


class LogStore:
    def __init__(self, store: Store, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store = store
        self.max_bytes = max_bytes

    # -- writing ----------------------------------------------------------------------------

    def append(
        self, job_id: str, source: str, lines: Sequence[RawLine], *, budgeted: bool = True
    ) -> int:
        """Store lines as chunks of about `CHUNK_BYTES`; returns how many entries were stored.

        With `budgeted`, what would take the job's log past `max_bytes` is dropped, whole
        lines from the end, and counted (see `write`). The server's own lines and a dead
        worker's last output are not budgeted: they are few, bounded, and say why a job
        ended."""
        if not lines:
            return 0
        max_bytes = self.max_bytes if budgeted else None
        shipment = prepare(self.store, job_id, lines, max_bytes)
        with self.store.write() as conn:
            return write(conn, job_id, source, shipment, max_bytes)

    def server_line(self, job_id: str, message: str, level: str = "INFO") -> None:
        self.append(
            job_id, SERVER_SOURCE, [[time.time(), "server", level, None, message]], budgeted=False
        )

    def totals(self, job_id: str) -> Totals:
        with self.store.read() as conn:
            row = conn.execute(
                sa.select(
                    t.log_totals.c.stored_bytes,
                    t.log_totals.c.dropped_lines,
                    t.log_totals.c.dropped_bytes,
                ).where(t.log_totals.c.job_id == job_id)
            ).first()
        return Totals() if row is None else Totals(*row)

    def dropped_line(self, job_id: str) -> LogLine | None:
        """A line that says how many lines the job's budget dropped, for the end of a read
        (with the newest chunk's id); None if none were."""
        totals = self.totals(job_id)
        if not totals.dropped_lines:
            return None
        with self.store.read() as conn:
            newest = conn.execute(
                sa.select(sa.func.max(t.log_chunks.c.id)).where(t.log_chunks.c.job_id == job_id)
            ).scalar()
        return LogLine(
            newest or 0,
            time.time(),
            SERVER_SOURCE,
            "server",
            "WARNING",
            None,
            f"cortex: {totals.dropped_lines} log lines ({totals.dropped_bytes} bytes of text) were "
            f"dropped: this job's log reached its budget of {self.max_bytes} bytes "
            "(CORTEX_LOG_MAX_BYTES)",
        )

    # -- reading ----------------------------------------------------------------------------

    def pages(
        self, job_id: str, cursor: Cursor, where: LogFilter = LogFilter()
    ) -> Iterator[list[LogLine]]:
        """The lines after `cursor`, oldest first, in pages of at most `PAGE_LINES` lines
        (and about a MiB of text), up to the last chunk stored when each fetch ran. `cursor`
        moves past each chunk once it is read whole, so the next call goes on from there."""
        page: list[LogLine] = []
        chars = 0
        while True:
            chunks = self._fetch(job_id, cursor.after, where)
            if not chunks:
                break
            for chunk_id, source, packed in chunks:
                skip, cursor.skip = cursor.skip, 0
                for line in _decode(chunk_id, source, packed):
                    if not where.keep(line):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    page.append(line)
                    chars += len(line.message)
                    if len(page) >= PAGE_LINES or chars >= _PAGE_CHARS:
                        yield page
                        page, chars = [], 0
                cursor.after = chunk_id
        if page:
            yield page

    def lines(self, job_id: str, where: LogFilter = LogFilter()) -> Iterator[LogLine]:
        """Every line of a job's log, oldest first (a convenience over `pages`)."""
        for page in self.pages(job_id, Cursor(), where):
            yield from page

    def read_by_time(
        self,
        job_id: str,
        where: LogFilter = LogFilter(),
        max_held_lines: int = MAX_HELD_LINES,
        page_lines: int = PAGE_LINES,
    ) -> Iterator[list[LogLine]]:
        """Every line in time order (ties in arrival order), a page at a time.

        Chunks arrive from many workers, each in its own time order, so they overlap in time.
        They are read by their first line's time: no chunk still unread holds a line earlier
        than the next one's `first_ts`, so every held line before it is final. What is held
        is the lines of chunks that overlap in time (workers ship every 100 ms); past
        `max_held_lines` (a worker that could not ship for a long time, or one entry of
        millions of lines) the earliest held lines go out anyway, so memory stays bounded and
        order is then best effort."""
        held: list[tuple[float, int, int, LogLine]] = []
        page: list[LogLine] = []
        after: tuple[float, int] | None = None
        while True:
            chunks = self._fetch_by_time(job_id, after, where)
            for chunk_id, source, first_ts, packed in chunks:
                while held and held[0][0] < first_ts:
                    page.append(heapq.heappop(held)[3])
                    if len(page) >= page_lines:
                        yield page
                        page = []
                for i, line in enumerate(_decode(chunk_id, source, packed)):
                    if not where.keep(line):
                        continue
                    heapq.heappush(held, (line.ts, chunk_id, i, line))
                    if len(held) > max_held_lines:
                        page.append(heapq.heappop(held)[3])
                        if len(page) >= page_lines:
                            yield page
                            page = []
                after = (first_ts, chunk_id)
            if not chunks:
                break
        while held:
            page.append(heapq.heappop(held)[3])
            if len(page) >= page_lines:
                yield page
                page = []
        if page:
            yield page

    def _fetch_by_time(
        self, job_id: str, after: tuple[float, int] | None, where: LogFilter
    ) -> list[Any]:
        """The next chunks by (first line's time, id) after `after`, as `_fetch` bounds them."""
        c = t.log_chunks.c
        query = _chunks(job_id, where, c.id, c.raw_bytes)
        if after is not None:
            query = query.where(
                sa.or_(c.first_ts > after[0], sa.and_(c.first_ts == after[0], c.id > after[1]))
            )
        with self.store.read() as conn:
            sizes = conn.execute(query.order_by(c.first_ts, c.id).limit(_FETCH_CHUNKS)).all()
            ids = [chunk_id for chunk_id, _ in _within_fetch(sizes)]
            if not ids:
                return []
            rows = conn.execute(
                sa.select(c.id, c.source, c.first_ts, c.packed).where(c.id.in_(ids))
            ).all()
        order = {chunk_id: n for n, chunk_id in enumerate(ids)}
        return sorted(rows, key=lambda row: order[row.id])

    def tail_cursor(self, job_id: str, count: int, where: LogFilter = LogFilter()) -> Cursor:
        """Where to read from for the last `count` lines: a walk back from the end of the
        index, by each chunk's line count, decoding chunks only when lines are filtered one
        by one, so the tail of a log of millions of lines reads only its last chunks."""
        before: int | None = None
        need = count
        while True:
            query = _chunks(job_id, where, t.log_chunks.c.id, t.log_chunks.c.line_count)
            if before is not None:
                query = query.where(t.log_chunks.c.id < before)
            with self.store.read() as conn:
                rows = conn.execute(query.order_by(t.log_chunks.c.id.desc()).limit(256)).all()
            if not rows:
                return Cursor()  # fewer lines than asked for: all of them
            if count == 0:
                return Cursor(after=rows[0].id)
            for chunk_id, line_count in rows:
                if where.by_line:
                    line_count = sum(1 for _ in self._chunk_lines(chunk_id, where))
                if line_count >= need:
                    return Cursor(after=chunk_id - 1, skip=line_count - need)
                need -= line_count
            before = rows[-1].id

    def _fetch(self, job_id: str, after: int, where: LogFilter) -> Sequence[Any]:
        """The next chunks after `after`: as many as fit in `_FETCH_BYTES` once unpacked (at
        least one), in one short read transaction."""
        with self.store.read() as conn:
            sizes = conn.execute(
                _chunks(job_id, where, t.log_chunks.c.id, t.log_chunks.c.raw_bytes)
                .where(t.log_chunks.c.id > after)
                .order_by(t.log_chunks.c.id)
                .limit(_FETCH_CHUNKS)
            ).all()
            if not sizes:
                return []
            last = _within_fetch(sizes)[-1][0]
            columns = (t.log_chunks.c.id, t.log_chunks.c.source, t.log_chunks.c.packed)
            return conn.execute(
                _chunks(job_id, where, *columns)
                .where(t.log_chunks.c.id > after, t.log_chunks.c.id <= last)
                .order_by(t.log_chunks.c.id)
            ).all()

    def _chunk_lines(self, chunk_id: int, where: LogFilter) -> Iterator[LogLine]:
        with self.store.read() as conn:
            row = conn.execute(
                sa.select(t.log_chunks.c.source, t.log_chunks.c.packed).where(
                    t.log_chunks.c.id == chunk_id
                )
            ).one()
        return (line for line in _decode(chunk_id, row.source, row.packed) if where.keep(line))

    # -- pruning ----------------------------------------------------------------------------

    def prune(
        self, ended_before_ts: float, max_lines_per_job: int, max_transactions: int = 200
    ) -> int:
        """Delete the logs of jobs that ended before `ended_before_ts`, and the oldest chunks
        of any job over `max_lines_per_job`, `_PRUNE_CHUNKS` chunks a transaction (chunks are
        up to a MiB each: a job's whole log at once would hold the write lock for seconds).
        Stops after `max_transactions`. Returns how many chunks went."""
        old_jobs = sa.select(t.jobs.c.job_id).where(t.jobs.c.end_time < ended_before_ts)
        deleted, left = self._delete_chunks(t.log_chunks.c.job_id.in_(old_jobs), max_transactions)
        with self.store.write() as conn:
            # Only once their chunks are all gone: a budget must not start over under a log.
            conn.execute(
                t.log_totals.delete().where(
                    t.log_totals.c.job_id.in_(old_jobs),
                    t.log_totals.c.job_id.not_in(sa.select(t.log_chunks.c.job_id).distinct()),
                )
            )
        with self.store.read() as conn:
            big = conn.execute(
                sa.select(t.log_chunks.c.job_id)
                .group_by(t.log_chunks.c.job_id)
                .having(sa.func.sum(t.log_chunks.c.line_count) > max_lines_per_job)
            ).all()
        for (job_id,) in big:
            kept = 0
            cutoff = None
            with self.store.read() as conn:
                for chunk_id, line_count in conn.execute(
                    sa.select(t.log_chunks.c.id, t.log_chunks.c.line_count)
                    .where(t.log_chunks.c.job_id == job_id)
                    .order_by(t.log_chunks.c.id.desc())
                ):
                    kept += line_count
                    if kept > max_lines_per_job:
                        cutoff = chunk_id
                        break
            if cutoff is not None and left > 0:
                where = sa.and_(t.log_chunks.c.job_id == job_id, t.log_chunks.c.id <= cutoff)
                count, left = self._delete_chunks(where, left)
                deleted += count
        return deleted

    def _delete_chunks(self, where: sa.ColumnElement[bool], transactions: int) -> tuple[int, int]:
        """Delete the chunks `where` says, a few a transaction; returns (how many went, the
        transactions left)."""
        deleted = 0
        while transactions > 0:
            transactions -= 1
            with self.store.write() as conn:
                ids = sa.select(t.log_chunks.c.id).where(where).limit(_PRUNE_CHUNKS)
                count = conn.execute(
                    t.log_chunks.delete().where(t.log_chunks.c.id.in_(ids))
                ).rowcount
            deleted += count
            if count < _PRUNE_CHUNKS:
                break
        return deleted, transactions


# -- writing, inside a caller's transaction ---------------------------------------------------


def _chunks(job_id: str, where: LogFilter, *columns: Any) -> sa.Select[Any]:
    query = sa.select(*columns).where(t.log_chunks.c.job_id == job_id)
    if where.source is not None:
        query = query.where(t.log_chunks.c.source == where.source)
    if where.since_ts is not None:
        query = query.where(t.log_chunks.c.last_ts >= where.since_ts)
    return query


def _within_fetch(sizes: Sequence[Any]) -> list[tuple[int, int]]:
    """The first of (chunk id, raw bytes) that fit in `_FETCH_BYTES` together (at least one)."""
    kept: list[tuple[int, int]] = []
    total = 0
    for chunk_id, raw_bytes in sizes:
        if kept and total + raw_bytes > _FETCH_BYTES:
            break
        kept.append((chunk_id, raw_bytes))
        total += raw_bytes
    return kept


def in_time_order(
    pages: Iterator[list[LogLine]], max_held_lines: int = MAX_HELD_LINES
) -> Iterator[list[LogLine]]:
    """Pages of lines read in arrival order, put in time order (ties in arrival order) within
    a window of `max_held_lines`: exact for a tail of up to that many lines, best effort past
    it, and never holding more."""
    held: list[tuple[float, int, LogLine]] = []
    arrival = itertools.count()
    for page in pages:
        out: list[LogLine] = []
        for line in page:
            heapq.heappush(held, (line.ts, next(arrival), line))
            if len(held) > max_held_lines:
                out.append(heapq.heappop(held)[2])
        if out:
            yield out
    while held:
        yield [heapq.heappop(held)[2] for _ in range(min(len(held), PAGE_LINES))]


def _decode(chunk_id: int, source: str, packed: bytes) -> Iterator[LogLine]:
    """The lines of a chunk, one at a time; an entry may hold many lines that share its
    fields."""
    raw = zlib.decompress(packed)
    # orjson reserves about 15 times its input while it parses: right for chunks of about
    # CHUNK_BYTES, not for the rare one that is bigger because one entry is (4 MiB at most),
    # which the standard library parses in twice its size.
    entries = orjson.loads(raw) if len(raw) <= 2 * CHUNK_BYTES else json.loads(raw)
    for ts, stream, level, batch_id, text in entries:
        for message in _split(text):
            yield LogLine(chunk_id, ts, source, stream, level, batch_id, message)


def _split(text: str) -> Iterator[str]:
    """`text.split("\\n")`, a slice of about `_SPLIT_CHARS` at a time."""
    start = 0
    while len(text) - start > _SPLIT_CHARS:
        end = text.rfind("\n", start, start + _SPLIT_CHARS)
        if end < 0:
            end = text.find("\n", start + _SPLIT_CHARS)
            if end < 0:
                break
        yield from text[start:end].split("\n")
        start = end + 1
    yield from text[start:].split("\n")
