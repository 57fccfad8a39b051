"""How the CLI prints durations and statuses (spec §7)."""

from __future__ import annotations

import pytest

from cortex import display
from cortex.display import duration, job_duration, ms_duration, start_time, status_text


class TestDuration:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"),
            (1, "1s"),
            (45, "45s"),
            (45.9, "45s"),  # truncated, not rounded
            (59.999, "59s"),
            (60, "1m0s"),
            (61, "1m1s"),
            (320, "5m20s"),
            (3599, "59m59s"),
            (3600, "1h0m0s"),
            (3723, "1h2m3s"),
            (3605, "1h0m5s"),
            (90061, "25h1m1s"),  # Go has no day unit
            (-5, "0s"),
        ],
    )
    def test_go_style(self, seconds: float, text: str) -> None:
        assert duration(seconds) == text


class TestMsDuration:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (None, "-"),
            (0.25, "250ms"),
            (0.001, "1ms"),
            (0.0019, "1ms"),  # truncated to ms
            (0.58, "580ms"),
            (1.025, "1.025s"),  # the float is 1.02499999..., still 1.025 s to a reader
            (2.05, "2.05s"),
            (1.001, "1.001s"),  # 1.001 * 1000 is 1000.9999999999999
            (12.345, "12.345s"),
            (0.999, "999ms"),
            (1, "1s"),
            (1.5, "1.5s"),
            (1.25, "1.25s"),
            (1.005, "1.005s"),
            (1.0059, "1.005s"),  # truncated to ms, not rounded
            (2.1234, "2.123s"),
            (59.5, "59.5s"),
            (60, "1m0s"),
            (123.25, "2m3.25s"),
            (0, "0s"),
            (0.0004, "0s"),
        ],
    )
    def test_go_style(self, seconds: float | None, text: str) -> None:
        assert ms_duration(seconds) == text


class TestOtherFields:
    @pytest.mark.parametrize(
        ("code", "text"),
        [
            ("status_running", "running"),
            ("status_enqueue_failed", "failed while enqueuing"),
            ("status_worker_oom", "out of memory"),
            ("status_something_new", "status_something_new"),
        ],
    )
    def test_status_text(self, code: str, text: str) -> None:
        assert status_text(code) == text

    @pytest.mark.parametrize("value", [None, ""])
    def test_start_time_missing(self, value: str | None) -> None:
        assert start_time(value) == "-"

    def test_start_time_format(self) -> None:
        text = start_time("2020-07-16T14:56:10.276007Z")
        day, month, year, clock, *_ = text.split(" ")
        assert month == "Jul"
        assert year == "2020"
        assert day.isdigit()
        assert len(day) == 2
        assert len(clock.split(":")) == 3

    def test_job_duration_of_finished_job(self) -> None:
        job = {"start_time": "2020-07-16T14:56:10Z", "end_time": "2020-07-16T15:01:30.9Z"}
        assert job_duration(job) == "5m20s"

    def test_job_duration_without_start(self) -> None:
        assert job_duration({"start_time": None, "end_time": None}) == "-"


JOB = {
    "job_id": "69d9c0013c2d0d97",
    "status": "status_running",
    "total_batch_count": 40,
    "start_time": "2026-12-01T10:00:00.000000Z",
    "end_time": None,
    "batch_counts": {"queued": 20, "leased": 2, "succeeded": 15, "failed": 3},
    "batch_metrics": {"succeeded": 15, "failed": 3, "average_time_per_batch": 0.5},
    "error": None,
}


def test_the_progress_line_snapshot() -> None:
    assert display.progress_line(JOB, 4.0) == (
        "job 69d9c0013c2d0d97: running, 18/40 batches (15 succeeded, 3 failed, 2 running, "
        "20 queued, 4.0 batches/s, ETA 5s)"
    )
    assert display.progress_detail(JOB, None) == "15 succeeded, 3 failed, 2 running, 20 queued"


def test_the_rate_is_over_the_recent_window() -> None:
    rate = display.Rate(window_s=10)
    assert rate.update(0, now=0.0) is None
    assert rate.update(10, now=5.0) == 2.0
    assert rate.update(10, now=20.0) == 0.0  # stalled over the window: no ETA
    assert display.Rate.eta(0.0, 5) is None
    # A slow start is forgotten once it leaves the window.
    assert rate.update(110, now=30.0) == 10.0


def test_the_final_line_says_the_outcome() -> None:
    ended = {**JOB, "status": "status_completed_with_failures", "end_time": "2026-12-01T10:01:05Z"}
    assert display.final_line(ended) == (
        "job 69d9c0013c2d0d97 completed with failures after 1m5s: 15 of 40 batches succeeded, "
        "3 failed"
    )
