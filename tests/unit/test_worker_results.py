"""The worker's result lines and its watchdog (`cortex.worker.results`)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from cortex.worker import results


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_list_as_long_as_the_payload_is_paired_item_by_item() -> None:
    text = results.lines("b1", ["x", "y"], [1, {"k": 2**80}])
    assert _records(text) == [
        {"batch_id": "b1", "index": 0, "result": 1},
        {"batch_id": "b1", "index": 1, "result": {"k": 2**80}},  # exactly, as Python reads it
    ]


@pytest.mark.parametrize("value", [[1], (1, 2), {"a": 1}, "text", 3, True])
def test_anything_else_is_the_batchs_one_result(value: Any) -> None:
    [record] = _records(results.lines("b1", ["x", "y"], value))
    assert record["index"] is None
    assert record["result"] == (list(value) if isinstance(value, tuple) else value)


class FakeArray:
    """What numpy's arrays and scalars offer: `tolist()`."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def tolist(self) -> list[Any]:
        return self.values


def test_arrays_are_written_as_their_lists() -> None:
    [record] = _records(results.lines("b1", [0, 1, 2], {"scores": FakeArray([0.5, 1.5])}))
    assert record["result"] == {"scores": [0.5, 1.5]}
    paired = _records(results.lines("b1", ["a", "b"], FakeArray([1, 2])))
    assert [(r["index"], r["result"]) for r in paired] == [(0, 1), (1, 2)]


@pytest.mark.parametrize("value", [float("nan"), [float("inf")], object(), {1j: 2}, "\ud800"])
def test_values_that_are_not_json_are_refused(value: Any) -> None:
    with pytest.raises(results.ResultError) as refused:
        results.lines("b1", [0], value)
    assert refused.value.kind == results.RESULT_NOT_SERIALISABLE


def test_results_over_the_limit_are_refused_with_the_limit() -> None:
    with pytest.raises(results.ResultError) as refused:
        results.lines("b1", [0], "x" * results.MAX_RESULT_BYTES)
    assert refused.value.kind == results.RESULT_TOO_LARGE
    assert str(results.MAX_RESULT_BYTES) in str(refused.value)


def test_the_watchdog_fires_only_past_the_limit() -> None:
    fired: list[str] = []
    release = threading.Event()

    def on_timeout(batch_id: str, stack: str) -> None:
        fired.append(batch_id)
        assert "wait" in stack  # where the stuck call was
        release.set()  # (a worker ends its process here instead)

    watchdog = results.Watchdog(0.2, on_timeout)
    assert watchdog.run("quick", lambda: 5) == 5
    stuck = threading.Thread(
        target=watchdog.run, args=("stuck", lambda: release.wait(30)), daemon=True
    )
    stuck.start()
    assert release.wait(10)
    assert fired == ["stuck"]
