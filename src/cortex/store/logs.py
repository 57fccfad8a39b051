"""Job logs in the store, as chunks of lines: append a chunk, read chunks by id, prune.

A chunk is what one worker shipped in one request (or one server line). Filters by worker
use the chunk's source and time filters skip whole chunks; the rest is decided line by line
after decoding, so reading a huge log streams chunk by chunk and never holds it whole.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import sqlalchemy as sa

from cortex.store import tables as t
from cortex.store.sql import Store

SERVER_SOURCE = "server"
# [ts, stream, level, batch_id, message]
RawLine = Sequence[Any]


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


class LogStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    def append(self, job_id: str, source: str, lines: Sequence[RawLine]) -> None:
        if not lines:
            return
        stamps = [line[0] for line in lines]
        row = {
            "job_id": job_id,
            "source": source,
            "first_ts": min(stamps),
            "last_ts": max(stamps),
            "line_count": sum(line[4].count("\n") + 1 for line in lines),
            "lines": orjson.dumps(lines).decode(),
        }
        with self.store._write() as conn:
            conn.execute(t.log_chunks.insert(), row)

    def server_line(self, job_id: str, message: str, level: str = "INFO") -> None:
        self.append(job_id, SERVER_SOURCE, [[time.time(), "server", level, None, message]])

    def read(
        self, job_id: str, after_chunk: int, max_chunks: int, where: LogFilter = LogFilter()
    ) -> tuple[list[LogLine], int, bool]:
        """Lines of up to `max_chunks` chunks after `after_chunk`, oldest first.

        Returns (lines, the last chunk id read, whether more chunks may follow)."""
        query = (
            _chunks(job_id, where)
            .where(t.log_chunks.c.id > after_chunk)
            .order_by(t.log_chunks.c.id)
            .limit(max_chunks)
        )
        with self.store._read() as conn:
            rows = conn.execute(query).all()
        lines = [line for row in rows for line in _decode(row) if where.keep(line)]
        last = rows[-1].id if rows else after_chunk
        return lines, last, len(rows) == max_chunks

    def read_by_time(
        self,
        job_id: str,
        where: LogFilter = LogFilter(),
        page_chunks: int = 8,
        max_held_lines: int = 100_000,
    ) -> Iterator[list[LogLine]]:
        """Every line in time order (ties in arrival order), a page at a time.

        Chunks arrive from many workers, each in its own time order, so they overlap in time.
        They are read by their first line's time: no chunk still unread holds a line earlier
        than the next one's `first_ts`, so every held line before it is final. What is held
        is the lines of chunks that overlap in time (workers ship every 100 ms); past
        `max_held_lines` (a worker that could not ship for a long time) the earliest held
        lines go out anyway, so memory stays bounded and order is then best effort."""
        held: list[tuple[float, int, int, LogLine]] = []
        after: tuple[float, int] | None = None
        c = t.log_chunks.c
        while True:
            query = _chunks(job_id, where).add_columns(c.first_ts)
            if after is not None:
                query = query.where(
                    sa.or_(c.first_ts > after[0], sa.and_(c.first_ts == after[0], c.id > after[1]))
                )
            with self.store._read() as conn:
                rows = conn.execute(query.order_by(c.first_ts, c.id).limit(page_chunks)).all()
            page: list[LogLine] = []
            for row in rows:
                while held and (held[0][0] < row.first_ts or len(held) > max_held_lines):
                    page.append(heapq.heappop(held)[3])
                for i, line in enumerate(_decode(row)):
                    if where.keep(line):
                        heapq.heappush(held, (line.ts, line.chunk_id, i, line))
            if len(rows) < page_chunks:
                page.extend(heapq.heappop(held)[3] for _ in range(len(held)))
                yield page
                return
            after = (rows[-1].first_ts, rows[-1].id)
            if page:
                yield page

    def tail(
        self, job_id: str, count: int, where: LogFilter = LogFilter()
    ) -> tuple[list[LogLine], int]:
        """The last `count` lines, oldest first, and the newest chunk id: a walk back from the
        end of the index, whatever the size of the log."""
        collected: list[LogLine] = []
        newest = 0
        before: int | None = None
        while len(collected) < count:
            query = _chunks(job_id, where).order_by(t.log_chunks.c.id.desc()).limit(16)
            if before is not None:
                query = query.where(t.log_chunks.c.id < before)
            with self.store._read() as conn:
                rows = conn.execute(query).all()
            if not rows:
                break
            newest = newest or rows[0].id
            for row in rows:
                lines = [line for line in _decode(row) if where.keep(line)]
                collected[:0] = lines
                if len(collected) >= count:
                    break
            before = rows[-1].id
        return collected[-count:] if count else [], newest

    def prune(self, ended_before_ts: float, max_lines_per_job: int) -> int:
        """Delete the logs of jobs that ended before `ended_before_ts`, and the oldest chunks
        of any job over `max_lines_per_job`. Returns how many chunks went."""
        deleted = 0
        with self.store._write() as conn:
            old_jobs = sa.select(t.jobs.c.job_id).where(t.jobs.c.end_time < ended_before_ts)
            deleted += conn.execute(
                t.log_chunks.delete().where(t.log_chunks.c.job_id.in_(old_jobs))
            ).rowcount
            big = conn.execute(
                sa.select(t.log_chunks.c.job_id)
                .group_by(t.log_chunks.c.job_id)
                .having(sa.func.sum(t.log_chunks.c.line_count) > max_lines_per_job)
            ).all()
            for (job_id,) in big:
                kept = 0
                cutoff = None
                for chunk_id, line_count in conn.execute(
                    sa.select(t.log_chunks.c.id, t.log_chunks.c.line_count)
                    .where(t.log_chunks.c.job_id == job_id)
                    .order_by(t.log_chunks.c.id.desc())
                ):
                    kept += line_count
                    if kept > max_lines_per_job:
                        cutoff = chunk_id
                        break
                if cutoff is not None:
                    deleted += conn.execute(
                        t.log_chunks.delete().where(
                            t.log_chunks.c.job_id == job_id, t.log_chunks.c.id <= cutoff
                        )
                    ).rowcount
        return deleted


def _chunks(job_id: str, where: LogFilter) -> sa.Select[Any]:
    query = sa.select(t.log_chunks.c.id, t.log_chunks.c.source, t.log_chunks.c.lines).where(
        t.log_chunks.c.job_id == job_id
    )
    if where.source is not None:
        query = query.where(t.log_chunks.c.source == where.source)
    if where.since_ts is not None:
        query = query.where(t.log_chunks.c.last_ts >= where.since_ts)
    return query


def _decode(row: Any) -> list[LogLine]:
    """The lines of a chunk; an entry may hold several lines that share its fields."""
    return [
        LogLine(row.id, ts, row.source, stream, level, batch_id, message)
        for ts, stream, level, batch_id, text in orjson.loads(row.lines)
        for message in text.split("\n")
    ]
