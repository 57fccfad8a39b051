"""Reading a job's log: filters, formatting, and following until every line is in."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterator

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from cortex import errors
from cortex.store import Job
from cortex.store.logs import (
    SERVER_SOURCE,
    Cursor,
    LogFilter,
    LogLine,
    LogStore,
    in_time_order,
)

FOLLOW_POLL_S = 0.1
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float | None = None) -> float:
    """`30s`, `5m`, `2h`, `1d` ago, or an RFC 3339 time, as a UNIX timestamp."""
    now = time.time() if now is None else now
    match = _DURATION.match(value.strip())
    if match:
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise errors.InvalidRequest(
            f"since: {value!r} is neither a duration (30s, 5m, 2h, 1d) nor an RFC 3339 time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def worker_source(job_id: str, worker: str) -> str:
    """Accept `3`, `worker-3` or the full worker id."""
    if worker == "server" or worker.startswith(f"{job_id}-"):
        return worker
    return f"{job_id}-{worker.removeprefix('worker-')}"


def short_source(job_id: str, source: str) -> str:
    if source.startswith(f"{job_id}-"):
        return "worker-" + source[len(job_id) + 1 :]
    return source


def format_text(job_id: str, line: LogLine) -> str:
    moment = datetime.datetime.fromtimestamp(line.ts, datetime.UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    kind = line.level or line.stream
    batch = f" [batch {line.batch_id}]" if line.batch_id else ""
    return f"{stamp} {short_source(job_id, line.source)} {kind}{batch} {line.message}\n"


def format_json(job_id: str, line: LogLine) -> str:
    return (
        json.dumps(
            {
                "chunk": line.chunk_id,
                "ts": line.ts,
                "worker": short_source(job_id, line.source),
                "stream": line.stream,
                "level": line.level,
                "batch_id": line.batch_id,
                "message": line.message,
            }
        )
        + "\n"
    )


async def stream_lines(
    logs: LogStore,
    job: Job,
    *,
    where: LogFilter,
    tail: int | None,
    follow: bool,
    finished: Callable[[], bool],
    fmt: Callable[[str, LogLine], str],
) -> AsyncGenerator[list[str], None]:
    """Yield formatted lines a page at a time. Reading, decoding and formatting run in the
    thread pool, a page per hand-off, so a huge log (or one chunk of millions of lines)
    neither fills memory nor holds the event loop.

    The log of an ended job, read without `follow`, comes in time order: workers ship their
    lines every 100 ms, so in arrival order a worker's last lines could come after the job's
    final status. Following (and reading a running job) stays in arrival order, which is
    what lets a follower see each line once as it comes. With `follow`, keep going until
    `finished()` says the job ended and every worker is gone, then drain what is left. The
    log ends with the count of lines its budget dropped, if any."""
    by_time = not follow and job.status.terminal
    cursor = Cursor()
    if tail is not None:
        cursor = await run_in_threadpool(logs.tail_cursor, job.job_id, tail, where)
    if by_time:
        pages = (
            logs.read_by_time(job.job_id, where)
            if tail is None
            # The last lines to arrive, in time order.
            else in_time_order(logs.pages(job.job_id, cursor, where))
        )
        async for page in iterate_in_threadpool(_formatted(job.job_id, pages, fmt)):
            yield page
    else:
        draining = False
        while True:
            pages = logs.pages(job.job_id, cursor, where)
            async for page in iterate_in_threadpool(_formatted(job.job_id, pages, fmt)):
                yield page
            if not follow or draining:
                break
            # Checked after a read that reached the end: a job seen finished here has every
            # line in the store, so one more read drains it.
            draining = await run_in_threadpool(finished)
            if not draining:
                await asyncio.sleep(FOLLOW_POLL_S)
    if where.batch_id is None and where.source in (None, SERVER_SOURCE):
        dropped = await run_in_threadpool(logs.dropped_line, job.job_id)
        if dropped is not None:
            yield [fmt(job.job_id, dropped)]


def _formatted(
    job_id: str, pages: Iterator[list[LogLine]], fmt: Callable[[str, LogLine], str]
) -> Iterator[list[str]]:
    for page in pages:
        yield [fmt(job_id, line) for line in page]
