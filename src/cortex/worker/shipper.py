"""The log shipper: text queued by the worker's streams and log records, cut into whole lines
per stream, and sent to the server from a thread of its own, every `period_s` or sooner when
much is waiting. At most `max_pending_chars` wait; a writer that finds it full waits up to
`block_s`, then its lines are dropped and counted once each, and the count goes with the next
request. Standard library only: part of the worker runtime (`cortex.envfiles`).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

Line = list[Any]  # [ts, stream, level, batch_id, message]: compact on the wire
Send = Callable[[list[Line], int], None]
# What the shipper queues: (ts, stream, key, level, batch_id, text). Text of stdout/stderr may
# end in part of a line; the shipper cuts it into whole lines, per key (a stream of one thread).
_Chunk = tuple[float, str, str, str | None, str | None, str]
# The level of a queued marker: drop the line the stream's queued text began.
_DISCARD = "discard"


class Shipper(threading.Thread):
    """Queues text and ships it from its own thread as entries of whole lines."""

    def __init__(
        self,
        send: Send,
        *,
        period_s: float = 0.1,
        max_pending_chars: int = 8 << 20,
        max_request_chars: int = 2 << 20,
        block_s: float = 2.0,
    ) -> None:
        super().__init__(name="cortex-logs", daemon=True)
        self._send = send
        self.period_s = period_s
        self.max_pending_chars = max_pending_chars
        self.max_request_chars = max_request_chars
        self.block_s = block_s
        self._chunks: collections.deque[_Chunk] = collections.deque()
        # Characters queued and not yet shipped, and lines dropped since the last request.
        self._pending_chars = 0
        self._dropped = 0
        self._stalled = False  # a writer waited block_s in vain: drop until the shipper moves
        self._lock = threading.Lock()
        # Per key: the beginning of a line (text, ts, batch, stream) waiting for its end; the
        # last queued text ended inside a line (`open`), or a line is being dropped and the
        # text up to its end must be too (`cut`).
        self._partial: dict[str, tuple[str, float, str | None, str]] = {}
        self._open: dict[str, bool] = {}
        self._cut: dict[str, bool] = {}
        self._drained = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._closing = False
        # Lines taken from the queue and not yet sent (or given up on): `drain` waits on it.
        self._sending = False

    def current_batch(self) -> str | None:
        """The batch id stamped on text queued now (`cortex.worker.logship` says which)."""
        return None

    def write(self, stream: str, level: str | None, text: str, key: str | None = None) -> None:
        """Queue `text`: whole lines for a log record (`level` set), any text for a stream.
        Text with the same `key` (default: the stream) is one sequence of lines."""
        key = key or stream
        step = self.max_request_chars
        if len(text) > step:  # one giant write: in pieces that fit a request
            for start in range(0, len(text), step):
                self.write(stream, level, text[start : start + step], key)
            return
        with self._lock:
            if self._pending_chars >= self.max_pending_chars and not self._wait_for_room():
                self._drop(stream, key, level, text)
                return
            if level is None:
                if self._cut.get(key):  # this text ends a line that was dropped
                    end = text.find("\n")
                    if end < 0:
                        return
                    self._cut[key] = False
                    text = text[end + 1 :]
                    if not text:
                        return
                self._open[key] = text[-1] != "\n"
            self._pending_chars += len(text)
            self._chunks.append((time.time(), stream, key, level, self.current_batch(), text))
        if self._pending_chars >= self.max_request_chars:
            self._wake.set()

    def _drop(self, stream: str, key: str, level: str | None, text: str) -> None:
        """Lose `text` (the lock is held), counting each line once, however it was cut: a
        line begun in queued text is taken back, one that goes on in later text is skipped."""
        if level is not None:
            self._dropped += text.count("\n") + 1
            return
        if self._cut.get(key) or self._open.get(key):
            if self._open.get(key):  # its beginning waits in the queue: take it back
                self._open[key] = False
                self._dropped += 1
                self._chunks.append((time.time(), stream, key, _DISCARD, None, ""))
            end = text.find("\n")
            if end < 0:
                self._cut[key] = True
                return
            text = text[end + 1 :]
        lines = text.count("\n")
        self._cut[key] = bool(text) and text[-1] != "\n"
        self._dropped += lines + self._cut[key]

    def _wait_for_room(self) -> bool:
        """The slow path, with the lock held: the shipper is behind. Wait a little, then give
        up on this write. Once a wait has failed, writes are dropped without waiting until the
        shipper takes text again (a server that is away slows a printer once, not per write).
        The shipper's own writes (its log records) never wait."""
        if threading.current_thread() is self:
            return True
        if self._closing or self._stalled:
            return False
        self._wake.set()
        deadline = time.monotonic() + self.block_s
        while self._pending_chars >= self.max_pending_chars and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stalled = True
                return False
            self._drained.wait(remaining)
        return True

    def _take(self) -> list[Line]:
        """Cut queued text into entries of whole lines, at most `max_request_chars` of them.

        An entry holds every whole line of one chunk (joined by newlines; the reader splits
        them), so the shipper's and the server's work is per chunk, not per line.
        """
        lines: list[Line] = []
        taken = 0
        chunks = self._chunks
        while chunks and taken < self.max_request_chars:
            ts, stream, key, level, batch_id, text = chunks.popleft()
            taken += len(text)
            if level is _DISCARD:  # the rest of the line was dropped: so is its beginning
                self._partial.pop(key, None)
                continue
            if level is not None:  # a log record: whole lines already
                lines.append([ts, "log", level, batch_id, text])
                continue
            pending = self._partial.pop(key, None)
            if pending is not None:  # the rest of a line an earlier chunk began
                # The line keeps its batch but takes the time it was finished: a worker's
                # lines stay in time order around log records written meanwhile.
                text = pending[0] + text
                batch_id = pending[2]
            end = text.rfind("\n")
            if end >= 0:
                lines.append([ts, stream, None, batch_id, text[:end]])
            if end + 1 < len(text):
                rest = text[end + 1 :]
                if len(rest) < self.max_request_chars:
                    self._partial[key] = (rest, ts, batch_id, stream)
                else:  # a line without end: ship it in pieces
                    lines.append([ts, stream, None, batch_id, rest])
        with self._drained:
            self._pending_chars -= taken
            if taken:
                self._stalled = False
            self._sending = True
            self._drained.notify_all()
        return lines

    def _flush_partial(self) -> list[Line]:
        lines = [
            [ts, stream, None, batch, text] for text, ts, batch, stream in self._partial.values()
        ]
        self._partial.clear()
        return lines

    def run(self) -> None:
        while True:
            if self._pending_chars < self.max_request_chars and not self._closing:
                self._wake.wait(self.period_s)
                self._wake.clear()
            closing = self._closing
            lines = self._take()
            if closing and not self._chunks:
                lines += self._flush_partial()
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if lines or dropped:
                try:
                    self._send(lines, dropped)
                except Exception as err:  # the server is away: count the lines as lost
                    message = f"cortex: could not ship {len(lines)} log lines: {err}\n"
                    os.write(2, message.encode(errors="replace"))
                    lost = sum(line[4].count("\n") + 1 for line in lines)
                    with self._lock:
                        self._dropped += lost + dropped
            with self._drained:
                self._sending = False
                self._drained.notify_all()
            if closing and not self._chunks:
                return

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued so far has been sent (or given up on), for at most
        `timeout_s`; whether it was. Lines queued meanwhile by other threads may be waited
        for too: this is for the last words before a report that may end the job."""
        if threading.current_thread() is self or not self.is_alive():
            return not self._chunks
        deadline = time.monotonic() + timeout_s
        with self._drained:
            while self._chunks or self._sending:
                self._wake.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.is_alive():
                    return False
                self._drained.wait(min(remaining, self.period_s))
        return True

    def nudge(self) -> None:
        """Ship what is queued now rather than at the end of the period."""
        if self._chunks:
            self._wake.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Ship what is left and stop."""
        with self._drained:
            self._closing = True
            self._drained.notify_all()
        self._wake.set()
        self.join(timeout_s)
