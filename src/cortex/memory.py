"""Memory around a big request: the cyclic garbage collector paused while it lives, and
memory given back to the system after it.

A 44 MB item list parses into some 300 MB of Python objects: 200,000 dicts and their lists.
Allocating them ran the garbage collector's young generations hundreds of times and, once
they had survived into the old one, a full collection over the whole server's heap: in the
server, orjson's parse of W3's body took 0.10-0.19 s of CPU with the collector, a steady
0.095-0.098 s without (3 runs each). JSON values hold no reference cycles, and the request's
objects are freed by reference counting when it ends, so `gc_paused` keeps the collector off
meanwhile; what other requests leave meanwhile is collected once it is back on.

Once those objects are freed, glibc keeps most of their pages in its heaps for reuse, so the
server's resident size stayed about 100 MB higher after each big submission. `trim_soon` asks
glibc (`malloc_trim`) to return its free pages a moment after such a request, off the event
loop. Elsewhere (another C library) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Callable, Iterator

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


_gc_lock = threading.Lock()
# Requests inside `gc_paused` now, and whether the collector was on before the first.
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while the block runs (and while any other block
    inside `gc_paused` runs): see the module's docstring."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()
