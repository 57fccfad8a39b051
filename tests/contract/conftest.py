"""The store contract suite runs against every engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cortex.store import Store


@pytest.fixture(params=["sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'cortex.db'}")
    s.create_schema()
    yield s
    s.close()
