"""Returning the heap's free memory to the system after a big request."""

from __future__ import annotations

import sys

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
