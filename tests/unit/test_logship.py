"""The worker's log capture in one process: what a predictor prints becomes shipped lines.

The shipper and flusher threads are real; `send` stands for the worker API and keeps what it
is given (the HTTP side is covered by tests/integration/test_logs.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cortex.worker import logship


class Received:
    """What the server would have been sent: entries and the count of dropped lines."""

    def __init__(self) -> None:
        self.entries: list[list] = []
        self.dropped = 0
        self.gate = threading.Event()  # cleared: the "server" does not answer
        self.gate.set()

    def send(self, lines: list[list], dropped: int) -> None:
        assert self.gate.wait(30)
        self.entries.extend(lines)
        self.dropped += dropped

    def lines(self) -> list[tuple[str, str | None, str]]:
        """(stream, batch_id, message) per line, entries split as the server splits them."""
        return [
            (stream if level is None else f"log:{level}", batch_id, message)
            for _ts, stream, level, batch_id, text in self.entries
            for message in text.split("\n")
        ]


@pytest.fixture
def received() -> Received:
    return Received()


@contextlib.contextmanager
def capturing(
    received: Received, *, buffer_size: int = 64 << 10, **shipper: Any
) -> Iterator[logship.Capture]:
    """Install a capture inside the test's body (pytest puts its own sys.stdout back between
    a fixture's setup and the test), and take it out again."""
    shipper.setdefault("period_s", 0.02)
    cap = logship.Capture(logship.Shipper(received.send, **shipper), buffer_size=buffer_size)
    cap.install()
    try:
        yield cap
    finally:
        if logship._installed is cap:
            cap.uninstall()


def test_prints_carry_the_batch_they_were_printed_in(received: Received) -> None:
    with capturing(received):
        print("before")
        with logship.in_batch("b1"):
            print("one")
            print("two", end="")
            print(" halves")
        with logship.in_batch("b2"):
            sys.stdout.write("three\n")
        print("after")
    assert received.lines() == [
        ("stdout", None, "before"),
        ("stdout", "b1", "one"),
        ("stdout", "b1", "two halves"),
        ("stdout", "b2", "three"),
        ("stdout", None, "after"),
    ]


def test_stdout_stderr_and_log_records_keep_their_order(received: Received) -> None:
    logger = logging.getLogger("predictor")
    with capturing(received):
        print("a")
        print("b", file=sys.stderr)
        print("c")
        logger.warning("d")
        print("e")
        sys.stdout.flush()  # as with any text stream, before writing to its buffer
        sys.stdout.buffer.write(b"f bytes\n")
    assert received.lines() == [
        ("stdout", None, "a"),
        ("stderr", None, "b"),
        ("stdout", None, "c"),
        ("log:WARNING", None, "predictor: d"),
        ("stdout", None, "e"),
        ("stdout", None, "f bytes"),
    ]


def test_a_workers_lines_are_in_time_order_around_a_line_finished_later(
    received: Received,
) -> None:
    with capturing(received):
        print("begun", end="")
        logging.getLogger("predictor").warning("meanwhile")
        print(" and finished")
    assert [message for _, _, message in received.lines()] == [
        "predictor: meanwhile",
        "begun and finished",
    ]
    stamps = [entry[0] for entry in received.entries]
    assert stamps == sorted(stamps)


def test_a_slow_printer_is_shipped_without_further_writes(received: Received) -> None:
    with capturing(received):
        printed = time.time()
        print("waiting in the buffer")
        deadline = time.monotonic() + 5
        while not received.entries and time.monotonic() < deadline:
            time.sleep(0.005)
        assert received.lines() == [("stdout", None, "waiting in the buffer")]
    assert 0 <= received.entries[0][0] - printed < 1


def test_a_partial_last_line_and_split_characters_survive(received: Received) -> None:
    # A tiny buffer: multi-byte characters are cut between hand-overs.
    with capturing(received, buffer_size=7):
        print("zürich ✓ 東京 " * 20)
        print("no newline at the end", end="")
    assert received.lines() == [
        ("stdout", None, "zürich ✓ 東京 " * 20),
        ("stdout", None, "no newline at the end"),
    ]


def test_lines_from_threads_arrive_whole_and_in_order_per_thread(received: Received) -> None:
    def talk(name: str) -> None:
        for i in range(20_000):
            print(f"{name} {i}")

    # Small buffers: many hand-overs while the threads write (one shared text stream loses or
    # garbles text here within a few runs).
    with capturing(received, buffer_size=512):
        threads = [threading.Thread(target=talk, args=(f"t{n}",)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    lines = [message for _, _, message in received.lines()]
    assert received.dropped == 0
    for n in range(3):
        mine = [int(line.split()[1]) for line in lines if line.startswith(f"t{n} ")]
        assert mine == list(range(20_000))
    assert len(lines) == 60_000


def test_a_printer_faster_than_the_server_is_slowed_then_counted_not_lost_silently(
    received: Received,
) -> None:
    limits = {"max_pending_chars": 4096, "max_request_chars": 1024, "block_s": 0.1}
    with capturing(received, buffer_size=256, **limits):
        received.gate.clear()  # the server stops answering
        started = time.monotonic()
        for i in range(2000):
            print(f"line {i:05d} padded to some length")
        blocked = time.monotonic() - started
        received.gate.set()
    shipped = [m for _, _, m in received.lines() if m.startswith("line ")]
    # The writer waited for room (block_s once, not once per write: 270 buffers would take
    # 27 s), then dropped and counted the rest.
    assert 0.1 <= blocked < 5
    assert received.dropped > 0
    assert len(shipped) + received.dropped == 2000
    assert shipped == sorted(shipped) and len(set(shipped)) == len(shipped)


def test_lines_the_server_never_took_are_counted() -> None:
    calls = []

    def refuse(lines: list[list], dropped: int) -> None:
        calls.append((lines, dropped))
        if len(calls) == 1:
            raise ConnectionError("server away")

    received = Received()
    received.send = refuse  # type: ignore[method-assign]
    with capturing(received):
        print("one\ntwo")
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.005)
    # The next request says how many lines the first one lost.
    assert calls[0][0][0][4] == "one\ntwo"
    assert calls[1] == ([], 2)


def test_drain_returns_once_what_was_said_has_been_sent(received: Received) -> None:
    """The worker drains before reporting a failed start (which ends the job): the lines
    said before it are with the server, or the wait gave up after its timeout."""
    with capturing(received, period_s=10.0):  # no periodic shipping: only drain sends
        print("a print still in its buffer", end="\n")
        logging.getLogger("predictor").error("failed to initialise the predictor\nTraceback")
        logship.drain(timeout_s=5)
        assert received.lines() == [
            ("stdout", None, "a print still in its buffer"),
            ("log:ERROR", None, "predictor: failed to initialise the predictor"),
            ("log:ERROR", None, "Traceback"),
        ]
        received.gate.clear()  # the server stops answering
        print("stuck")
        started = time.monotonic()
        cap = logship._installed
        assert cap is not None
        cap.flush()
        assert not cap.shipper.drain(timeout_s=0.3)
        assert 0.3 <= time.monotonic() - started < 5
        received.gate.set()
        assert cap.shipper.drain(timeout_s=5)
        assert received.lines()[-1] == ("stdout", None, "stuck")
