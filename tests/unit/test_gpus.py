"""The GPU pool of the local launcher: declared devices, disjoint shares, refusals."""

from __future__ import annotations

import pytest

from cortex import errors, gpus


def test_declared_devices_are_parsed() -> None:
    assert gpus.parse("0,1, 2,3") == ("0", "1", "2", "3")
    assert gpus.parse("") == gpus.parse("none") == ()


def test_workers_get_disjoint_devices_until_they_give_them_back() -> None:
    pool = gpus.Pool(("0", "1", "2"))
    assert pool.take("w0", 2) == ("0", "1")
    with pytest.raises(errors.InsufficientGpus):
        pool.take("w1", 2)
    with pytest.raises(errors.InsufficientGpus, match="1 of this server's 3 are free"):
        pool.reserve("job1", 2, 1)
    with pytest.raises(errors.InsufficientGpus, match="this server has 3"):
        pool.reserve("job1", 2, 2)
    pool.release("w0")
    assert pool.take("w1", 3) == ("0", "1", "2")
    pool.reserve("job2", 0, 64)  # no GPUs asked: never refused
    assert pool.free() == 0


def test_an_accepted_job_holds_its_gpus_until_its_workers_take_them() -> None:
    pool = gpus.Pool(("0", "1", "2", "3"))
    pool.reserve("job1", 2, 2)
    # Two submissions racing for the same devices: the second is refused even though no
    # worker of the first has started yet.
    with pytest.raises(errors.InsufficientGpus, match="0 of this server's 4 are free"):
        pool.reserve("job2", 1, 1)
    assert pool.take("job1-0", 2, "job1") == ("0", "1")
    assert pool.take("job1-1", 2, "job1") == ("2", "3")
    assert pool.free() == 0
    pool.release("job1-0")
    assert pool.free() == 2  # the reservation is used up, not given back twice
    # What a job was promised and did not take goes back when it ends.
    pool.reserve("job3", 1, 2)
    assert pool.take("job3-0", 1, "job3") == ("0",)
    assert pool.free() == 0
    pool.unreserve("job3")
    assert pool.free() == 1
