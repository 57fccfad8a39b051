"""Job statuses, their CLI texts, the transition rules, and job ids (spec §4.1, §5.1)."""

from __future__ import annotations

import itertools
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from cortex.jobs import (
    IN_PROGRESS,
    JobStatus,
    WorkerState,
    can_move,
    can_transition,
    moves_to,
    new_batch_ids,
    new_job_id,
)

TERMINAL = {
    JobStatus.ENQUEUE_FAILED,
    JobStatus.COMPLETED_WITH_FAILURES,
    JobStatus.SUCCEEDED,
    JobStatus.UNEXPECTED_ERROR,
    JobStatus.WORKER_ERROR,
    JobStatus.WORKER_OOM,
    JobStatus.STOPPED,
    JobStatus.TIMED_OUT,
}


class TestStatuses:
    @pytest.mark.parametrize(
        ("status", "code", "text"),
        [
            (JobStatus.UNKNOWN, "status_unknown", "unknown"),
            (JobStatus.ENQUEUING, "status_enqueuing", "enqueuing"),
            (JobStatus.RUNNING, "status_running", "running"),
            (JobStatus.ENQUEUE_FAILED, "status_enqueue_failed", "failed while enqueuing"),
            (
                JobStatus.COMPLETED_WITH_FAILURES,
                "status_completed_with_failures",
                "completed with failures",
            ),
            (JobStatus.SUCCEEDED, "status_succeeded", "succeeded"),
            (JobStatus.UNEXPECTED_ERROR, "status_unexpected_error", "unexpected error"),
            (JobStatus.WORKER_ERROR, "status_worker_error", "worker error"),
            (JobStatus.WORKER_OOM, "status_worker_oom", "out of memory"),
            (JobStatus.STOPPED, "status_stopped", "stopped"),
            (JobStatus.TIMED_OUT, "status_timed_out", "timed out"),
        ],
    )
    def test_codes_and_texts(self, status: JobStatus, code: str, text: str) -> None:
        assert status == code
        assert JobStatus(code) is status
        assert status.text == text

    def test_every_status_has_a_text(self) -> None:
        for status in JobStatus:
            assert status.text

    def test_in_progress_set(self) -> None:
        assert {JobStatus.ENQUEUING, JobStatus.RUNNING} == IN_PROGRESS
        assert {s for s in JobStatus if s.in_progress} == IN_PROGRESS

    def test_terminal_set(self) -> None:
        assert {s for s in JobStatus if s.terminal} == TERMINAL

    def test_unknown_is_neither(self) -> None:
        assert not JobStatus.UNKNOWN.in_progress
        assert not JobStatus.UNKNOWN.terminal

    def test_every_status_in_exactly_one_group(self) -> None:
        for status in JobStatus:
            groups = [status.in_progress, status.terminal, status is JobStatus.UNKNOWN]
            assert groups.count(True) == 1, status


class TestTransitions:
    @pytest.mark.parametrize(
        ("current", "new"), list(itertools.product(sorted(TERMINAL), list(JobStatus)))
    )
    def test_terminal_never_changes(self, current: JobStatus, new: JobStatus) -> None:
        assert not can_transition(current, new)

    @pytest.mark.parametrize(
        "new",
        [
            JobStatus.RUNNING,
            JobStatus.ENQUEUE_FAILED,
            JobStatus.UNEXPECTED_ERROR,
            JobStatus.STOPPED,
            JobStatus.TIMED_OUT,
        ],
    )
    def test_from_enqueuing(self, new: JobStatus) -> None:
        assert can_transition(JobStatus.ENQUEUING, new)

    @pytest.mark.parametrize(
        "new",
        [
            JobStatus.SUCCEEDED,
            JobStatus.COMPLETED_WITH_FAILURES,
            JobStatus.WORKER_ERROR,
            JobStatus.WORKER_OOM,
        ],
    )
    def test_enqueuing_cannot_finish_as_if_it_ran(self, new: JobStatus) -> None:
        assert not can_transition(JobStatus.ENQUEUING, new)

    @pytest.mark.parametrize(
        "new",
        [
            JobStatus.SUCCEEDED,
            JobStatus.COMPLETED_WITH_FAILURES,
            JobStatus.UNEXPECTED_ERROR,
            JobStatus.WORKER_ERROR,
            JobStatus.WORKER_OOM,
            JobStatus.STOPPED,
            JobStatus.TIMED_OUT,
        ],
    )
    def test_from_running(self, new: JobStatus) -> None:
        assert can_transition(JobStatus.RUNNING, new)

    def test_running_cannot_fail_enqueuing(self) -> None:
        assert not can_transition(JobStatus.RUNNING, JobStatus.ENQUEUE_FAILED)

    def test_no_going_back(self) -> None:
        assert not can_transition(JobStatus.RUNNING, JobStatus.ENQUEUING)
        assert not can_transition(JobStatus.RUNNING, JobStatus.UNKNOWN)
        assert not can_transition(JobStatus.ENQUEUING, JobStatus.UNKNOWN)

    @pytest.mark.parametrize("status", list(JobStatus))
    def test_no_self_transition(self, status: JobStatus) -> None:
        assert not can_transition(status, status)

    @pytest.mark.parametrize("status", list(JobStatus))
    def test_only_in_progress_statuses_can_change(self, status: JobStatus) -> None:
        can_change = any(can_transition(status, new) for new in JobStatus)
        assert can_change == status.in_progress

    @pytest.mark.parametrize("current", sorted(IN_PROGRESS))
    def test_in_progress_targets(self, current: JobStatus) -> None:
        for new in JobStatus:
            if can_transition(current, new):
                assert new.terminal or new is JobStatus.RUNNING


class TestWorkerState:
    def test_values(self) -> None:
        assert {s.value for s in WorkerState} == {
            "pending",
            "initializing",
            "running",
            "succeeded",
            "failed",
            "stalled",
            "unknown",
        }

    def test_alive(self) -> None:
        alive = {s for s in WorkerState if s.alive}
        assert alive == {WorkerState.PENDING, WorkerState.INITIALIZING, WorkerState.RUNNING}


HEX_ID = re.compile(r"[0-9a-f]{15,16}")


class TestNewJobId:
    def test_format(self) -> None:
        job_id = new_job_id()
        assert HEX_ID.fullmatch(job_id), job_id
        assert len(job_id) == 16  # true until the year 2116

    def test_is_max_int64_minus_time(self) -> None:
        value = int(new_job_id(), 16)
        assert 0 < value < (1 << 63) - 1
        now_ns = (1 << 63) - 1 - value
        # somewhere between 2020 and 2100
        assert 1_577_836_800 * 10**9 < now_ns < 4_102_444_800 * 10**9

    def test_strictly_decreasing(self) -> None:
        ids = [new_job_id() for _ in range(2000)]
        values = [int(i, 16) for i in ids]
        assert all(a > b for a, b in itertools.pairwise(values))
        # same length, so the text sorts the same way: newest first in an ascending listing
        assert all(a > b for a, b in itertools.pairwise(ids))
        assert sorted(ids) == ids[::-1]

    def test_unique_across_threads(self) -> None:
        per_thread = 500
        threads = 8
        barrier = threading.Barrier(threads)

        def burst(_: int) -> list[str]:
            barrier.wait()
            return [new_job_id() for _ in range(per_thread)]

        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(burst, range(threads)))
        ids = [job_id for batch in results for job_id in batch]
        assert len(set(ids)) == threads * per_thread
        for batch in results:  # each thread sees its own ids decrease
            values = [int(i, 16) for i in batch]
            assert all(a > b for a, b in itertools.pairwise(values))
        assert all(HEX_ID.fullmatch(i) for i in ids)


ENDED = {WorkerState.SUCCEEDED, WorkerState.FAILED, WorkerState.UNKNOWN}


@pytest.mark.parametrize("ended", sorted(ENDED))
def test_an_ended_worker_stays_ended(ended: WorkerState) -> None:
    assert ended.ended and not ended.alive
    assert not any(can_move(ended, new) for new in WorkerState)


def test_a_worker_moves_forward_only() -> None:
    forward = [WorkerState.PENDING, WorkerState.INITIALIZING, WorkerState.RUNNING]
    for earlier, later in itertools.combinations(forward, 2):
        assert can_move(earlier, later) and not can_move(later, earlier)
    for state in forward:
        assert can_move(state, state)  # told again (a pid learnt later)
        assert all(can_move(state, end) for end in ENDED)


def test_moves_to_lists_the_states_a_report_may_apply_in() -> None:
    for new in WorkerState:
        assert set(moves_to(new)) == {s for s in WorkerState if can_move(s, new)}
    assert set(moves_to(WorkerState.RUNNING)) == {
        WorkerState.PENDING,
        WorkerState.STALLED,
        WorkerState.INITIALIZING,
        WorkerState.RUNNING,
    }


def test_batch_ids_are_distinct_version_4_uuids() -> None:
    ids = new_batch_ids(5000)
    assert len(set(ids)) == 5000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # the canonical form: lowercase, 8-4-4-4-12
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert new_batch_ids(0) == []
