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
    with pytest.raises(errors.InsufficientGpus, match="1 of this server's 3 are free"):
        pool.take("w1", 2)
    pool.release("w0")
    assert pool.take("w1", 3) == ("0", "1", "2")
    assert pool.free() == 0
    pool.release("w1")
    assert pool.free() == 3
