"""JSON that keeps every integer: the server's reader and writer, and the worker's reader."""

from __future__ import annotations

import json

import orjson
import pytest

from cortex import exactjson
from cortex.worker import queue

BIG = [2**64, 2**64 + 1, -(2**63) - 1, 10**40, -(10**40), {"k": [2**100]}]


@pytest.mark.parametrize("value", BIG)
def test_integers_past_64_bits_are_read_and_written_exactly(value: object) -> None:
    text = json.dumps(value).encode()
    # repr: 2**64 == float(2**64), but a predictor given a float was not given what was sent
    assert repr(orjson.loads(text)) != repr(value)
    assert repr(exactjson.loads(text)) == repr(value)
    assert repr(json.loads(exactjson.dumps(value))) == repr(value)
    assert repr(queue._loads(text)) == repr(value)  # the worker's reader


@pytest.mark.parametrize(
    "value", [2**64 - 1, -(2**63), 123456789012345678, 1.5, "x" * 40, [1, {"a": None}]]
)
def test_everything_else_reads_as_orjson_reads_it(value: object) -> None:
    text = json.dumps(value).encode()
    assert exactjson.loads(text) == orjson.loads(text) == value
    assert exactjson.dumps(value) == orjson.dumps(value)


def test_a_run_of_digits_across_a_scan_chunk_is_found() -> None:
    pad = b'"' + b"x" * ((1 << 20) - 11) + b'",'
    text = b"[" + pad + str(2**64 + 1).encode() + b"]"
    # The number straddles the first 1 MiB chunk of the scan.
    assert text.index(b"1844") < 1 << 20 < text.index(b"1844") + 20
    assert exactjson.may_change(text)
    assert exactjson.loads(text)[1] == 2**64 + 1
    assert queue._loads(text)[1] == 2**64 + 1


@pytest.mark.parametrize("piece", [1, 5, 18, 19, 20, 64])
def test_a_body_scanned_as_it_arrives_finds_a_run_split_across_its_pieces(piece: int) -> None:
    """The scan of a request body, fed a piece at a time (as `api.body.read_body` does),
    finds what one scan of the whole finds, wherever the pieces cut a run of digits."""
    for at in range(0, 40):
        text = b'{"x": "' + b"y" * at + b'", "n": ' + str(2**64 + 1).encode() + b"}"
        near = b'{"x": "' + b"y" * at + b'", "n": ' + str(2**63).encode()[:18] + b"}"
        for document, big in ((text, True), (near, False)):
            scan = exactjson.DigitRuns()
            for start in range(0, len(document), piece):
                scan.feed(document[start : start + piece])
            assert scan.found is big is exactjson.may_change(document)
            assert exactjson.loads(document, scan) == json.loads(document)


def test_digits_in_a_string_take_the_exact_path_and_read_the_same() -> None:
    text = b'{"id": "12345678901234567890123", "n": 1.25}'
    assert exactjson.may_change(text)
    assert exactjson.loads(text) == orjson.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        b"[NaN, 12345678901234567890]",
        b"[Infinity, 12345678901234567890]",
        b"[1e400, 12345678901234567890]",
        b'["\\ud800", 12345678901234567890]',  # a lone surrogate cannot be stored
        b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000,
        b"[12345678901234567890",
        b"\xff[12345678901234567890]",
        b"[" + b"9" * 5000 + b"]",  # past Python's 4300-digit limit for int()
    ],
)
def test_what_orjson_refuses_the_exact_path_refuses_too(text: bytes) -> None:
    with pytest.raises(ValueError):
        exactjson.loads(text)


def test_writing_refuses_what_json_cannot_hold() -> None:
    for value in (["\ud800", 2**64], [float("nan"), 2**64]):
        with pytest.raises(TypeError):
            exactjson.dumps(value)
