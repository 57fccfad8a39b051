"""Around a big request: the garbage collector paused, and the heap's free memory returned to
the system after it."""

from __future__ import annotations

import gc
import sys
import threading

import pytest

from cortex import memory
from helpers import wait_for


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_big_requests_in_a_row_trim_once_after_them() -> None:
    assert memory._TRIM is not None  # glibc: found and callable
    # A trim that an earlier test's request scheduled runs first.
    wait_for(lambda: memory._pending is None, 10, "an earlier trim to run")
    memory.trim_soon()
    first = memory._pending
    memory.trim_soon()  # another big request meanwhile: the same trim serves both
    assert first is not None and memory._pending is first
    wait_for(lambda: memory._pending is None, 10, "the trim to run")
    first.join(10)  # it clears `_pending` before it calls malloc_trim
    assert not first.is_alive()


def test_the_collector_is_off_while_any_pause_lasts_and_back_on_after_the_last() -> None:
    assert gc.isenabled()
    first, second = memory.gc_paused(), memory.gc_paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the other request still holds its objects
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_pause_ended_by_an_error_still_turns_the_collector_back_on() -> None:
    try:
        with memory.gc_paused():
            raise ValueError("bad body")
    except ValueError:
        pass
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with memory.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_pauses_from_many_threads_leave_the_collector_on() -> None:
    start = threading.Barrier(8)

    def request() -> None:
        start.wait()
        for _ in range(200):
            with memory.gc_paused():
                pass

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert gc.isenabled()
