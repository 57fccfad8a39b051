"""Capture everything a worker says and ship it to the server in batches.

`print`, `sys.stdout`/`sys.stderr` writes and `logging` records become lines with a timestamp,
the stream or level, and the id of the batch being predicted. A background thread sends them to
the server's worker API every 100 ms (or sooner when many are waiting).

Back-pressure: at most `max_pending_chars` of text wait in memory. A writer that finds it full
waits up to `block_s` for the shipper to catch up (a fast printer is slowed to the shipping rate,
which is far above what a predictor prints), then drops the line and counts it; the count is
sent with the next request and the server stores a line that says how many were lost.

Output that bypasses Python (a C library writing to file descriptor 2, a segfault, an error
before this module is installed) goes to the process's own stdout/stderr, which the launcher
keeps, and is stored when the worker exits.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

# The batch being predicted, set by the worker loop; stamped on every line.
_current_batch: str | None = None


@contextlib.contextmanager
def in_batch(batch_id: str) -> Iterator[None]:
    global _current_batch
    _current_batch = batch_id
    try:
        yield
    finally:
        _current_batch = None


Line = list[Any]  # [ts, stream, level, batch_id, message]: compact on the wire
Send = Callable[[list[Line], int], None]
# What writers queue: (ts, stream, level, batch_id, text). Text from stdout/stderr may hold
# part of a line or several; the shipper thread cuts it into lines.
_Write = tuple[float, str, str | None, str | None, str]
# Writes up to this size are counted, not measured (at most `max_pending_writes` of them wait).
_SMALL_WRITE = 1024


class Shipper(threading.Thread):
    """Queues writes without a lock on the writer's side (a deque append is atomic), and cuts
    and ships lines from its own thread, so that a print costs the predictor well under a
    microsecond more than it would anyway."""

    def __init__(
        self,
        send: Send,
        *,
        period_s: float = 0.1,
        max_pending_chars: int = 8 << 20,
        max_pending_writes: int = 50_000,
        max_per_request: int = 20_000,
        max_request_chars: int = 2 << 20,
        block_s: float = 2.0,
    ) -> None:
        super().__init__(name="cortex-logs", daemon=True)
        self._send = send
        self.period_s = period_s
        self.max_pending_chars = max_pending_chars
        self.max_pending_writes = max_pending_writes
        self.max_per_request = max_per_request
        self.max_request_chars = max_request_chars
        self.block_s = block_s
        self._writes: collections.deque[_Write] = collections.deque()
        # Characters queued and not yet shipped; the lock makes the count exact across threads.
        self._pending_chars = 0
        self._count_lock = threading.Lock()
        self._partial: dict[str, tuple[str, float, str | None]] = {}
        self._dropped = 0
        self._drained = threading.Condition()
        self._wake = threading.Event()
        self._closing = False

    def write(self, stream: str, level: str | None, text: str) -> None:
        if len(text) <= _SMALL_WRITE:
            # The hot path (a print is two small writes): no lock. Small writes are bounded by
            # their number, big ones by their characters.
            if len(self._writes) >= self.max_pending_writes and not self._wait_for_room():
                with self._count_lock:
                    self._dropped += text.count("\n") or 1
                return
            self._writes.append((time.time(), stream, level, _current_batch, text))
            return
        if len(text) > self.max_request_chars:  # one giant write: keep what fits a request
            with self._count_lock:
                self._dropped += text.count("\n", self.max_request_chars) or 1
            text = text[: self.max_request_chars] + "\n"
        if self._full() and not self._wait_for_room():
            with self._count_lock:
                self._dropped += text.count("\n") or 1
            return
        with self._count_lock:
            self._pending_chars += len(text)
        self._writes.append((time.time(), stream, level, _current_batch, text))

    def _full(self) -> bool:
        return (
            self._pending_chars >= self.max_pending_chars
            or len(self._writes) >= self.max_pending_writes
        )

    def _wait_for_room(self) -> bool:
        """The slow path: the shipper is behind. Wait a little, then give up on this write."""
        if threading.current_thread() is self:
            return False
        self._wake.set()
        deadline = time.monotonic() + self.block_s
        with self._drained:
            while self._full() and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(remaining)
        return True

    def _take(self) -> list[Line]:
        """Cut queued writes into entries of whole lines.

        An entry may hold several lines (joined by newlines) that share a stream, a batch and a
        time: the reader splits them. Coalescing the writes of a run this way keeps the
        shipper's and the server's work per entry, not per line, so a predictor that prints
        100,000 lines a second costs a few runs, not 100,000 list objects.
        """
        lines: list[Line] = []
        taken_chars = 0  # in this request
        accounted_chars = 0  # of big writes, counted in _pending_chars
        writes = self._writes
        while writes and len(lines) < self.max_per_request and taken_chars < self.max_request_chars:
            ts, stream, level, batch_id, text = writes.popleft()
            taken_chars += len(text)
            if len(text) > _SMALL_WRITE:
                accounted_chars += len(text)
            if level is not None:  # a log record: whole lines already
                lines.append([ts, "log", level, batch_id, text])
                continue
            # A run: writes to the same stream in the same batch (print writes the text and the
            # newline separately). Its lines share the time of its first write, at most 10 ms
            # before its last.
            texts = [text]
            while writes:
                nts, nstream, nlevel, nbatch, ntext = writes[0]
                if (
                    nstream != stream
                    or nlevel is not None
                    or nbatch != batch_id
                    or nts - ts > 0.01
                    or taken_chars + len(ntext) > self.max_request_chars
                ):
                    break
                writes.popleft()
                texts.append(ntext)
                taken_chars += len(ntext)
                if len(ntext) > _SMALL_WRITE:
                    accounted_chars += len(ntext)
            text = "".join(texts) if len(texts) > 1 else text
            pending = self._partial.pop(stream, None)
            if pending is not None:  # the rest of a line an earlier write began
                text = pending[0] + text
                ts, batch_id = pending[1], pending[2]
            end = text.rfind("\n")
            if end >= 0:
                lines.append([ts, stream, None, batch_id, text[:end]])
            if end + 1 < len(text):
                self._partial[stream] = (text[end + 1 :], ts, batch_id)
        with self._count_lock:
            self._pending_chars -= accounted_chars
        with self._drained:
            self._drained.notify_all()
        return lines

    def _flush_partial(self) -> list[Line]:
        lines = [
            [ts, stream, None, batch, text] for stream, (text, ts, batch) in self._partial.items()
        ]
        self._partial.clear()
        return lines

    def run(self) -> None:
        while True:
            if len(self._writes) < self.max_per_request and not self._closing:
                self._wake.wait(self.period_s)
                self._wake.clear()
            closing = self._closing
            lines = self._take()
            if closing and not self._writes:
                lines += self._flush_partial()
            with self._count_lock:
                dropped, self._dropped = self._dropped, 0
            if lines or dropped:
                try:
                    self._send(lines, dropped)
                except Exception as err:  # the server is away: count the lines as lost
                    message = f"cortex: could not ship {len(lines)} log lines: {err}\n"
                    os.write(2, message.encode(errors="replace"))
                    with self._count_lock:
                        self._dropped += len(lines) + dropped
            if closing and not self._writes:
                return

    def close(self, timeout_s: float = 30.0) -> None:
        """Ship what is left and stop."""
        self._closing = True
        self._wake.set()
        with self._drained:
            self._drained.notify_all()
        self.join(timeout_s)


class _LineWriter(io.TextIOBase):
    """A text stream whose writes go to the shipper."""

    def __init__(self, shipper: Shipper, stream: str, original: TextIO) -> None:
        self._shipper = shipper
        self._writes = shipper._writes
        self._stream = stream
        self._original = original

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        # Shipper.write's hot path, inlined: this runs twice for every print.
        size = len(text)
        if size <= _SMALL_WRITE and len(self._writes) < self._shipper.max_pending_writes:
            self._writes.append((time.time(), self._stream, None, _current_batch, text))
        else:
            self._shipper.write(self._stream, None, text)
        return size

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._original.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False


class _ShipHandler(logging.Handler):
    def __init__(self, shipper: Shipper) -> None:
        super().__init__()
        self._shipper = shipper
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._shipper.write("log", record.levelname, message)


class Capture:
    """Install the shipper for this process: stdout, stderr and the root logger."""

    def __init__(self, shipper: Shipper) -> None:
        self.shipper = shipper
        self._stdout = _LineWriter(shipper, "stdout", sys.stdout)
        self._stderr = _LineWriter(shipper, "stderr", sys.stderr)
        self._handler = _ShipHandler(shipper)

    def install(self) -> None:
        self.shipper.start()
        sys.stdout = self._stdout
        sys.stderr = self._stderr
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)

    def uninstall(self) -> None:
        sys.stdout = sys.__stdout__
        sys.stderr = sys.__stderr__
        logging.getLogger().removeHandler(self._handler)
        self.shipper.close()
