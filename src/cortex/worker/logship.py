"""Capture everything a worker says and ship it to the server in batches.

`print`, `sys.stdout`/`sys.stderr` writes and `logging` records become lines with a timestamp,
the stream or level, and the id of the batch being predicted. A background thread sends them to
the server's worker API every 100 ms (or sooner when many are waiting).

Cost: `sys.stdout` and `sys.stderr` become C-implemented text streams over a buffer, the way
Python's own stdout works when it is a pipe. A print costs what a print into a file costs; the
capture's Python code runs once per buffer (64 KiB), not once per line, so a predictor printing
100,000 lines a second is slowed by a few percent. The price is the one every pipe pays: stdout
is stamped when its buffer is handed over (when it is full, at a batch's start and end, before a
log record or a stderr line, and by the shipper every `period_s`), so a line's time is at most
`period_s` after its print. stderr is line-buffered, as in Python, and hands over stdout's
pending text first, so the two streams keep their order line by line.

Back-pressure: at most `max_pending_chars` of text wait in memory. A writer that finds it full
waits up to `block_s` for the shipper to catch up (a fast printer is slowed to the shipping rate,
which is far above what a predictor prints), then drops the text and counts its lines; the count
is sent with the next request and the server stores a line that says how many were lost.

Output that bypasses Python (a C library writing to file descriptor 2, a segfault, an error
before this module is installed) goes to the process's own stdout/stderr, which the launcher
keeps, and is stored when the worker exits.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from cortex.worker import shipper

# The batch being predicted, set by the worker loop; stamped on every line.
_current_batch: str | None = None
# The capture installed in this process, if any: batch boundaries hand over its buffers.
_installed: Capture | None = None


def drain(timeout_s: float = 5.0) -> None:
    """Ship what this process has said so far before going on (a no-op without a capture).

    The worker calls it before a report that can end its job (its predictor failed to load,
    its `on_job_complete` finished): the traceback it just logged must be in the job's log
    before the job's final status, which a reader may take as "every line is in"."""
    capture = _installed
    if capture is not None:
        capture.flush()
        capture.shipper.drain(timeout_s)


@contextlib.contextmanager
def in_batch(batch_id: str) -> Iterator[None]:
    """Lines printed inside carry `batch_id`: the buffers are handed over at both ends, so each
    piece of text is stamped with the batch that was current when it was printed."""
    global _current_batch
    capture = _installed
    if capture is not None:
        capture.flush()
    _current_batch = batch_id
    try:
        yield
    finally:
        if capture is not None:
            capture.flush()
        _current_batch = None


class Shipper(shipper.Shipper):
    """The shipper of this process's capture: it stamps text with the batch being predicted."""

    def current_batch(self) -> str | None:
        return _current_batch


class _Sink(io.RawIOBase):
    """The raw end of a captured stream: receives its buffer's bytes, one buffer at a time."""

    def __init__(
        self,
        shipper: Shipper,
        stream: str,
        key: str,
        fd: int,
        before: Callable[[], None] | None,
    ) -> None:
        super().__init__()
        self._shipper = shipper
        self._stream = stream
        self._key = key
        self._fileno = fd
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._before = before

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._before is not None:
            self._before()
        text = self._decoder.decode(data)
        if text:
            self._shipper.write(self._stream, None, text, self._key)
        return len(data)

    def fileno(self) -> int:
        # Code that asks for the descriptor (faulthandler, subprocess) gets the process's own,
        # which the launcher keeps.
        return self._fileno

    def isatty(self) -> bool:
        return False


class _PerThread(threading.local):
    """`sys.stdout` (or `sys.stderr`) of a worker: each thread that writes gets a text stream
    of its own, a C `TextIOWrapper` over a `BufferedWriter` whose raw end is a `_Sink`.

    A `TextIOWrapper` is not safe for several writers (two threads printing at once can lose
    or garble text, in CPython's own stdout too); one stream a thread is, and costs a print
    about 0.2 microseconds more, where a lock in Python would cost a microsecond. Another
    thread may flush a stream (the flusher, a batch boundary): flushing adds no text.
    `threading.local` runs `__init__` in each thread on its first use; attribute lookups stay
    in C, so `print` calls the thread's C `write` directly.
    """

    def __init__(self, capture: Capture, stream: str) -> None:
        text = capture.open_stream(stream)
        self.stream = text
        self.write = text.write
        self.writelines = text.writelines
        self.flush = text.flush
        self.buffer = text.buffer

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, ...
        return getattr(self.stream, name)


class _ShipHandler(logging.Handler):
    def __init__(self, shipper: Shipper, before: Callable[[], None]) -> None:
        super().__init__()
        self._shipper = shipper
        self._before = before
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if threading.current_thread() is not self._shipper:
            self._before()  # what was printed before this record comes before it
        self._shipper.write("log", record.levelname, message)


class _Flusher(threading.Thread):
    """Hands over buffered text every `period_s`, so that a slow printer's lines travel too.

    Its own thread, not the shipper's: a writer waiting for room holds its stream's buffer
    lock, and only the shipper can make room."""

    def __init__(self, flush: Callable[[], None], period_s: float) -> None:
        super().__init__(name="cortex-logs-flush", daemon=True)
        self._flush = flush
        self.period_s = period_s
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.period_s):
            with contextlib.suppress(Exception):  # a stream the predictor closed
                self._flush()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive():
            self.join(5.0)


class Capture:
    """Install the shipper for this process: stdout, stderr and the root logger."""

    def __init__(self, shipper: Shipper, *, buffer_size: int = 64 << 10) -> None:
        self.shipper = shipper
        self.buffer_size = buffer_size
        # Every thread's streams: (thread, stream name, text stream), stdout ones flushed first.
        self._streams: list[tuple[threading.Thread, str, io.TextIOWrapper]] = []
        self._streams_lock = threading.Lock()
        # The same streams in flushing order (stdout ones first), a tuple replaced whole under
        # the lock whenever `_streams` changes: a flush, three a batch, reads it without one.
        self._flush_order: tuple[io.TextIOWrapper, ...] = ()
        self.stdout = _PerThread(self, "stdout")
        self.stderr = _PerThread(self, "stderr")
        self._handler = _ShipHandler(shipper, self.flush)
        self._replaced: tuple[TextIO, TextIO] = (sys.stdout, sys.stderr)
        self._flusher = _Flusher(self._flush_and_forget, shipper.period_s)

    def open_stream(self, stream: str) -> io.TextIOWrapper:
        """The current thread's new text stream for `stream` ("stdout" or "stderr")."""
        thread = threading.current_thread()
        stderr = stream == "stderr"
        sink = _Sink(
            self.shipper,
            stream,
            f"{stream}:{thread.ident}",
            2 if stderr else 1,
            # stderr hands over what stdout holds first, so that the two keep their order.
            self._flush_stdout if stderr else None,
        )
        text = io.TextIOWrapper(
            io.BufferedWriter(sink, self.buffer_size),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=stderr,  # as Python's own stderr
        )
        with self._streams_lock:
            self._streams.append((thread, stream, text))
            self._reorder()
        return text

    def _reorder(self) -> None:
        """Rebuild `_flush_order` (under `_streams_lock`)."""
        self._flush_order = tuple(
            [text for _, name, text in self._streams if name == "stdout"]
            + [text for _, name, text in self._streams if name != "stdout"]
        )

    def _each(self, stream: str | None = None) -> list[io.TextIOWrapper]:
        with self._streams_lock:
            streams = list(self._streams)
        return [text for _, name, text in streams if stream is None or name == stream]

    def _flush_stdout(self) -> None:
        for text in self._each("stdout"):
            text.flush()

    def flush(self) -> None:
        """Hand over what waits in every thread's buffers (stdout first)."""
        for text in self._flush_order:
            text.flush()

    def _flush_and_forget(self) -> None:
        """The flusher's round: hand everything over, and forget the streams of threads that
        have ended (after their last flush)."""
        with self._streams_lock:
            ended = [entry for entry in self._streams if not entry[0].is_alive()]
        self.flush()
        # What was handed over travels now: a line waits for one period, not two.
        self.shipper.nudge()
        if ended:
            with self._streams_lock:
                self._streams = [entry for entry in self._streams if entry not in ended]
                self._reorder()

    def install(self) -> None:
        global _installed
        self.shipper.start()
        self._flusher.start()
        self._replaced = (sys.stdout, sys.stderr)
        sys.stdout = self.stdout
        sys.stderr = self.stderr
        _installed = self
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)

    def uninstall(self) -> None:
        global _installed
        self._flusher.stop()
        with contextlib.suppress(Exception):
            self.flush()
        sys.stdout, sys.stderr = self._replaced
        _installed = None
        logging.getLogger().removeHandler(self._handler)
        self.shipper.close()
