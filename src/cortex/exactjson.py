"""JSON that keeps every number as it was written: orjson's speed, and the standard library's
`json` where orjson would change a value.

orjson reads an integer outside [-2**63, 2**64) as a float, silently (2**64 arrives as
1.8446744073709552e+19), and refuses to write one. A batch service must hand the predictor
what was submitted, so a document that may hold such an integer is read and written by `json`,
which keeps integers of any size. Such an integer has at least 19 digits in a row, and so does
nothing else orjson reads differently; finding a run of 19 digits costs a few milliseconds
for 40 MB (a table lookup in C, a chunk at a time), against 70-110 ms to parse it. A run
inside a string only sends the document down the slower, equally exact path.

The worker (`cortex.worker.queue`, standard library only) decodes with the same rule.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

# The fewest digits of an integer orjson does not read exactly: 2**64 has 20 and
# -(2**63) - 1 has 19 after its sign.
_DIGIT_RUN = b"\x01" * 19
_DIGITS = bytes(1 if c in b"0123456789" else 0 for c in range(256))
_SCAN_BYTES = 1 << 20


def may_change(data: bytes) -> bool:
    """Whether orjson might not read `data` exactly: it holds 19 digits in a row. Scanned a
    chunk at a time (each chunk overlapping the last by a run's length), so the scan's own
    memory stays small whatever the document's size."""
    overlap = len(_DIGIT_RUN) - 1
    for start in range(0, len(data), _SCAN_BYTES):
        if _DIGIT_RUN in data[start : start + _SCAN_BYTES + overlap].translate(_DIGITS):
            return True
    return False


class DigitRuns:
    """`may_change` for a document that arrives in pieces: each piece is scanned as it comes,
    with the end of the one before (a run across two pieces is found), so a request body's
    scan is done while the rest of it is on its way (27 ms for 44 MB, done at once)."""

    def __init__(self) -> None:
        self.found = False
        self._tail = b""

    def feed(self, piece: bytes) -> None:
        if self.found or not piece:
            return
        window = self._tail + piece
        self.found = _DIGIT_RUN in window.translate(_DIGITS)
        self._tail = window[-(len(_DIGIT_RUN) - 1) :]


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range for a float")
    return value


# What orjson refuses, `json` must refuse too: NaN and Infinity, and numbers past a double.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def loads(data: bytes, scanned: DigitRuns | None = None) -> Any:
    """The value of a JSON document, every integer exact; ValueError if it is not JSON.
    `scanned`: the document's pieces already fed to a `DigitRuns` as they came."""
    if not (may_change(data) if scanned is None else scanned.found):
        return orjson.loads(data)
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 at byte {err.start}") from None
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nests too deeply") from None
    try:
        # As orjson does, refuse a lone surrogate (a `\ud800` escape): it cannot be stored.
        _encode(value)
    except TypeError as err:
        raise ValueError(str(err)) from None
    return value


def dumps(value: Any) -> bytes:
    """`value` as compact UTF-8 JSON, integers of any size included; TypeError for what JSON
    cannot hold (orjson's errors are TypeErrors too)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as err:
        if "64-bit" not in str(err):
            raise
    return _encode(value)


def _encode(value: Any) -> bytes:
    try:
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()
    except UnicodeEncodeError as err:
        raise TypeError(f"str is not valid UTF-8: {err.reason}") from None
    except RecursionError:
        raise TypeError("nests too deeply") from None
    except ValueError as err:  # NaN or infinity
        raise TypeError(str(err)) from None
