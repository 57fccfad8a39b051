"""The fleet simulator's CPU accounting (`bench/fleet.py`): psutil for the servers, the
PostgreSQL backends of the bench's database and the simulator; py-spy for the share of a
server's time in the database driver's calls."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa
from scale import Server


class Cpu:
    """CPU seconds (user + system) of the servers, the store's backends and this process."""

    def __init__(self, servers: list[Server], pg: sa.Engine | None, database: str) -> None:
        self.servers = [psutil.Process(s.process.pid) for s in servers]
        self.pg = pg
        self.database = database
        self.me = psutil.Process()

    def _backends(self) -> dict[int, float]:
        if self.pg is None:
            return {}
        with self.pg.connect() as conn:
            pids = conn.execute(
                sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :d"),
                {"d": self.database},
            ).scalars()
            found = {}
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    times = psutil.Process(pid).cpu_times()
                    found[pid] = times.user + times.system
        return found

    def lock_waits(self) -> int:
        """Backends of the bench's database waiting for a lock now."""
        if self.pg is None:
            return 0
        with self.pg.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = :d AND wait_event_type = 'Lock'"
                    ),
                    {"d": self.database},
                ).scalar_one()
            )

    def snapshot(self) -> dict[str, Any]:
        def secs(proc: psutil.Process) -> float:
            times = proc.cpu_times()
            return float(times.user + times.system)

        return {
            "at": time.perf_counter(),
            "server": sum(secs(p) for p in self.servers),
            "store": self._backends(),
            "me": secs(self.me),
        }

    @staticmethod
    def used(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        """CPU seconds of each part between two snapshots, and the wall time."""
        store = sum(t - before["store"].get(pid, 0.0) for pid, t in after["store"].items())
        return {
            "wall": after["at"] - before["at"],
            "server": after["server"] - before["server"],
            "store": store,
            "me": after["me"] - before["me"],
        }


@contextlib.contextmanager
def sampled(pid: int, seconds: float, folder: Path) -> Iterator[dict[str, float]]:
    """py-spy samples of the server for `seconds`: the share of active samples in the store
    (SQLAlchemy's calls into the database driver) and in the store layer as a whole."""
    out = folder / f"spy-{time.time_ns()}.txt"
    share: dict[str, float] = {}
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():  # the `bench` extra brings it (with Ray)
        yield share
        return
    proc = subprocess.Popen(
        [
            *(spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds)))),
            *("--rate", "50", "--format", "raw", "--nonblocking", "--output", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield share
    finally:
        try:
            proc.wait(seconds + 30)
            total = driver = layer = 0
            for line in out.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                n = int(count)
                total += n
                if any(f in stack for f in ("do_execute", "do_commit", "do_rollback", "fetch")):
                    driver += n
                if "sqlalchemy/" in stack or "cortex/store/" in stack:
                    layer += n
            share.update(driver=driver / total if total else 0.0, layer=layer / total)
        except (OSError, ValueError, subprocess.TimeoutExpired, ZeroDivisionError):
            proc.kill()
