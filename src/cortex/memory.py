"""Giving memory back to the system after a big request.

A 44 MB item list parses into some 300 MB of Python objects; once they are freed, glibc keeps
most of those pages in its heaps for reuse, so the server's resident size stayed about 100 MB
higher after each big submission. `trim_soon` asks glibc (`malloc_trim`) to return its free
pages a moment after such a request, off the event loop. Elsewhere (another C library) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger("cortex.memory")

# Bodies at least this big are followed by a trim (a trim takes milliseconds; at most one a
# second).
TRIM_ABOVE_BYTES = 1 << 20
# How long after the request: its answer is sent meanwhile, and what it held freed.
TRIM_DELAY_S = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


_TRIM = _malloc_trim()
_lock = threading.Lock()
_pending: threading.Timer | None = None


def trim_soon() -> None:
    """Return free heap memory to the system in TRIM_DELAY_S (once, however many big
    requests come meanwhile). ctypes releases the GIL for the call."""
    global _pending
    if _TRIM is None:
        return
    with _lock:
        if _pending is not None:
            return
        _pending = threading.Timer(TRIM_DELAY_S, _trim)
        _pending.daemon = True
        _pending.start()


def _trim() -> None:
    global _pending
    with _lock:
        _pending = None
    assert _TRIM is not None
    _TRIM(0)
