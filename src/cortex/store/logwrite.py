"""Writing job logs: a worker's lines fitted to the job's byte budget (whole lines dropped and
counted past it, with one line that says so), packed into compressed chunks of about
`CHUNK_BYTES`, and stored in the caller's transaction. Reading and pruning are
`cortex.store.logs`.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cortex.store import engine
from cortex.store import tables as t

SERVER_SOURCE = "server"
# [ts, stream, level, batch_id, message]
RawLine = Sequence[Any]
# Per job, the bytes of log (JSON before compression) stored before later lines are dropped.
DEFAULT_MAX_BYTES = 128 << 20
# zlib's fastest level: logs still shrink about 5 times, and a 1 MiB chunk costs ~20 ms.
_ZLIB_LEVEL = 1
# What one chunk holds (JSON before compression): a request of a worker is split into chunks
# of about this size, so that a reader holds one at a time.
CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Totals:
    stored_bytes: int = 0
    dropped_lines: int = 0
    dropped_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Shipment:
    """Lines to store and what of them fits the job's budget, encoded and compressed before
    the write transaction (which every lease waits for on SQLite)."""

    lines: Sequence[RawLine]
    kept: Sequence[RawLine]
    chunks: list[_Packed]


def prepare(
    store: engine.BaseStore, job_id: str, lines: Sequence[RawLine], max_bytes: int | None
) -> Shipment:
    """Fit `lines` to what is left of the job's budget (None: no budget) and pack them. A job
    past its budget costs a read and a count, not an encoding."""
    room = None
    if max_bytes is not None:
        with store.read() as conn:
            room = max_bytes - _stored_bytes(conn, job_id)
    kept, chunks = _within(lines, room)
    return Shipment(lines, kept, chunks)


def write(
    conn: Connection, job_id: str, source: str, shipment: Shipment, max_bytes: int | None
) -> int:
    """Store a prepared shipment in the caller's transaction; returns the entries stored.

    The job's totals row is locked (FOR UPDATE) first, so two appends to one job decide on the
    budget one after the other; one that meets another at the budget's edge fits its lines
    again. What does not fit is dropped and counted in `log_totals` (lines, and bytes of text);
    the first drop stores a line that says so."""
    lines, kept, chunks = shipment.lines, shipment.kept, shipment.chunks
    totals = _lock_totals(conn, job_id)
    if max_bytes is not None and sum(chunk.raw_bytes for chunk in chunks) > (
        max_bytes - totals.stored_bytes
    ):
        kept, chunks = _within(lines, max_bytes - totals.stored_bytes)
    stored = 0
    for chunk in chunks:
        _insert_chunk(conn, job_id, source, chunk)
        stored += chunk.raw_bytes
    dropped_lines, dropped_bytes = 0, 0
    if kept is not lines:
        dropped_lines = _line_count(lines) - _line_count(kept)
        dropped_bytes = _text_bytes(lines) - _text_bytes(kept)
    if dropped_lines and totals.dropped_lines == 0:
        (notice,) = _pack([_budget_notice(max_bytes or 0)])
        _insert_chunk(conn, job_id, SERVER_SOURCE, notice)
        stored += notice.raw_bytes
    conn.execute(
        t.log_totals.update()
        .where(t.log_totals.c.job_id == job_id)
        .values(
            stored_bytes=t.log_totals.c.stored_bytes + stored,
            dropped_lines=t.log_totals.c.dropped_lines + dropped_lines,
            dropped_bytes=t.log_totals.c.dropped_bytes + dropped_bytes,
        )
    )
    return len(kept)


def _stored_bytes(conn: Connection, job_id: str) -> int:
    row = conn.execute(
        sa.select(t.log_totals.c.stored_bytes).where(t.log_totals.c.job_id == job_id)
    ).scalar()
    return int(row or 0)


# -- helpers ----------------------------------------------------------------------------------


def _line_count(lines: Sequence[RawLine]) -> int:
    return sum(line[4].count("\n") + 1 for line in lines)


def _text_bytes(lines: Sequence[RawLine]) -> int:
    """The characters of the lines' text: what a count of dropped bytes means to a reader."""
    return sum(len(line[4]) for line in lines)


def _within(lines: Sequence[RawLine], room: int | None) -> tuple[Sequence[RawLine], list[_Packed]]:
    """The lines that fit in `room` bytes of JSON (None: all of them), packed as chunks."""
    if room is not None and room <= 2:  # not even the brackets
        return [], []
    chunks = _pack(lines)
    if room is None or sum(chunk.raw_bytes for chunk in chunks) <= room:
        return lines, chunks
    kept = _fit(lines, room)
    return kept, _pack(kept)


def _fit(lines: Sequence[RawLine], room: int) -> list[RawLine]:
    """The first lines of `lines` whose JSON takes at most about `room` bytes, cut at a line
    break inside an entry if need be."""
    kept: list[RawLine] = []
    used = 2  # the brackets
    for line in lines:
        size = len(orjson.dumps(line)) + 1  # and a comma
        if used + size <= room:
            kept.append(line)
            used += size
            continue
        # Whole lines of this entry, as many as fit: a prefix that fits by characters, then
        # shorter ones while escapes (a line break is two bytes of JSON) make it too long.
        text: str = line[4]
        limit = room - used - len(orjson.dumps([*line[:4], ""])) - 1
        while limit > 0:
            cut = text.rfind("\n", 0, limit)
            if cut < 0:
                break
            part = [*line[:4], text[:cut]]
            excess = used + len(orjson.dumps(part)) + 1 - room
            if excess <= 0:
                kept.append(part)
                break
            limit = cut - excess  # each character is at least a byte
        break
    return kept


@dataclasses.dataclass(frozen=True)
class _Packed:
    lines: Sequence[RawLine]
    packed: bytes
    raw_bytes: int


def _pack(lines: Sequence[RawLine]) -> list[_Packed]:
    """Lines as chunks of about `CHUNK_BYTES` of JSON each (an entry bigger than that is a
    chunk of its own), compressed: a reader decodes one chunk at a time, so this bounds its
    memory, whatever a worker sends in one request."""
    groups: list[list[RawLine]] = [[]]
    size = 0
    for line in lines:
        estimate = len(line[4]) + 64  # the message, and the fields around it
        if groups[-1] and size + estimate > CHUNK_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(line)
        size += estimate
    packed = []
    for group in groups:
        if group:
            raw = orjson.dumps(group)
            packed.append(_Packed(group, zlib.compress(raw, _ZLIB_LEVEL), len(raw)))
    return packed


def _budget_notice(max_bytes: int) -> RawLine:
    return [
        time.time(),
        "server",
        "WARNING",
        None,
        f"cortex: this job's log reached its budget of {max_bytes} bytes "
        "(CORTEX_LOG_MAX_BYTES): later lines are dropped, and counted at the end of the log",
    ]


def _lock_totals(conn: Connection, job_id: str) -> Totals:
    """The job's totals row, created if need be and locked (FOR UPDATE) for this append: two
    appends to one job decide on the budget one after the other."""
    conn.execute(engine.insert_ignore(conn, t.log_totals).values(job_id=job_id))
    row = conn.execute(
        sa.select(
            t.log_totals.c.stored_bytes, t.log_totals.c.dropped_lines, t.log_totals.c.dropped_bytes
        )
        .where(t.log_totals.c.job_id == job_id)
        .with_for_update()
    ).one()
    return Totals(*row)


def _insert_chunk(conn: Connection, job_id: str, source: str, chunk: _Packed) -> None:
    stamps = [line[0] for line in chunk.lines]
    conn.execute(
        t.log_chunks.insert(),
        {
            "job_id": job_id,
            "source": source,
            "first_ts": min(stamps),
            "last_ts": max(stamps),
            "line_count": _line_count(chunk.lines),
            "packed": chunk.packed,
            "raw_bytes": chunk.raw_bytes,
        },
    )
