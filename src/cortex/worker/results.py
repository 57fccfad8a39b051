"""What `predict` returns, made into the batch's result lines, and the watchdog that ends a
`predict` running past the job's `batch_timeout`.

Standard library only (see `cortex.environments`). The server imports the limits from here,
so the worker and the server enforce the same ones.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

# The most bytes one batch's results may take as JSON lines: a batch whose results are
# larger fails (`result_too_large`). Kept under half the server's request limit (10 MiB), so
# that a report with one such result always fits.
MAX_RESULT_BYTES = 4 << 20
# A worker sends what it has collected once its results reach this many bytes, rather than
# holding them for its next lease request.
REPORT_BYTES = 4 << 20

# The exit code of a worker that ended itself because a `predict` ran past the job's
# batch_timeout (its main thread is still inside that `predict`): it is replaced.
EXIT_BATCH_TIMEOUT = 4

# Why a batch's attempt failed, as the worker reports it.
PREDICT_ERROR = "predict_error"
BATCH_TIMEOUT = "batch_timeout"
RESULT_TOO_LARGE = "result_too_large"
RESULT_NOT_SERIALISABLE = "result_not_serialisable"
# A batch stored by reference whose lines could not be read, or changed since the scan.
PAYLOAD_UNREADABLE = "payload_unreadable"
KINDS = frozenset(
    {PREDICT_ERROR, BATCH_TIMEOUT, RESULT_TOO_LARGE, RESULT_NOT_SERIALISABLE, PAYLOAD_UNREADABLE}
)


class ResultError(Exception):
    """The value `predict` returned cannot be kept as the batch's result."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def lines(batch_id: str, payload: Any, value: Any) -> str:
    """The batch's result lines: a list as long as the payload is paired with it item by
    item (`{"batch_id", "index", "result"}` a line); anything else is the batch's one result
    (`index` null). Arrays with a `tolist()` (numpy's) are written as their lists. Raises
    `ResultError` for a value that is not JSON or is too large."""
    if callable(getattr(value, "tolist", None)):  # a numpy array pairs as its list does
        value = value.tolist()
    encode = _ENCODER.encode
    # Each line is `{"batch_id":…,"index":…,"result":…}` as `json.dumps` writes the dict, built
    # from its parts: no dict per item, the id and keys encoded once.
    head = '{"batch_id":' + encode(batch_id) + ',"index":'
    try:
        if isinstance(value, list) and isinstance(payload, list) and len(value) == len(payload):
            text = "".join(f'{head}{i},"result":{encode(item)}}}\n' for i, item in enumerate(value))
        else:
            text = f'{head}null,"result":{encode(value)}}}\n'
    except (TypeError, ValueError, RecursionError) as err:
        raise ResultError(
            RESULT_NOT_SERIALISABLE,
            f"predict returned a value that is not JSON ({err.__class__.__name__}: {err}); "
            "return lists, dicts, strings, numbers (not NaN or infinity), booleans or None",
        ) from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise ResultError(
            RESULT_NOT_SERIALISABLE, f"predict returned text that is not valid unicode ({err})"
        ) from None
    if size > MAX_RESULT_BYTES:
        raise ResultError(
            RESULT_TOO_LARGE,
            f"predict returned {size} bytes of results, more than the limit of "
            f"{MAX_RESULT_BYTES} bytes per batch: write large outputs to storage yourself and "
            "return where they are",
        )
    return text


def _plain(value: Any) -> Any:
    """Arrays and scalars of numerical libraries (numpy, and what imitates it) as the lists
    and numbers they hold; anything else is not JSON."""
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# One encoder for every line: `json.dumps` with options builds a new one per call, which was
# most of the cost of a result of 1,000 items (one line each).
_ENCODER = json.JSONEncoder(
    separators=(",", ":"), allow_nan=False, ensure_ascii=False, default=_plain
)


class Watchdog:
    """Runs `predict` with a time limit: past it, `on_timeout(batch_id, stack)` runs on the
    watchdog's thread (and must end the process), while `predict` is left where it hangs."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[str, str], None]) -> None:
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout

    def run(self, batch_id: str, call: Callable[[], Any]) -> Any:
        lock = threading.Lock()
        state = {"done": False, "fired": False}
        caller = threading.get_ident()

        def fire() -> None:
            with lock:
                if state["done"]:
                    return
                state["fired"] = True
            frame = sys._current_frames().get(caller)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
            self.on_timeout(batch_id, stack)

        timer = threading.Timer(self.timeout_s, fire)
        timer.daemon = True
        timer.start()
        try:
            return call()
        finally:
            timer.cancel()
            with lock:
                state["done"] = True
                fired = state["fired"]
            if fired:  # too late: the watchdog reports the batch and ends the process
                threading.Event().wait()
