"""This server among its replicas: its lasting id, its hold on its data folder, its
registration, and the leader lease.

Any replica answers any request; only the one that holds the leader lease does the store-wide
work of the reconciler. The lease lives in the store with an expiry and is renewed several times
per lease period, so a leader that dies is replaced within about one `leader_lease_s`.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import secrets
import socket
import time
from pathlib import Path

import sqlalchemy as sa

from cortex import errors
from cortex.store.cluster import Cluster

log = logging.getLogger("cortex.server")

# The lease is renewed this many times per lease period: a renewal can be late or fail a few
# times before the lease lapses.
_RENEWALS_PER_LEASE = 5


def load_id(data_dir: Path) -> str:
    """This replica's id, kept in its data folder so that a restarted server is the same
    replica: it finds the workers it started in the store and adopts them."""
    path = data_dir / "replica_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    new = f"r-{secrets.token_hex(6)}"
    try:
        # O_EXCL: of two servers started on one folder at once, both end up with one id.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(new + "\n")
    return new


# The lock files a server holds while it runs: in its data folder, and beside a SQLite store.
LOCK_NAME = "server.lock"
# Taken by this process (real path -> open descriptor): `cortex serve` takes them before it
# migrates the store, and the app's start-up finds them already held.
_held: dict[str, int] = {}


def hold(data_dir: Path, store_url: str, address: str, replica_id: str) -> None:
    """Hold the data folder (and a SQLite store's file) for this server until it exits, or
    raise `errors.InUse` naming the server that holds it.

    Two servers on one folder share its replica id, so each takes the other's workers for its
    own, and on one SQLite file each fails the other's jobs. Replicas on one PostgreSQL store
    each have a data folder of their own, so they never meet here. The lock is an `flock`:
    the kernel releases it when the process ends however it ends (a SIGKILL included), so a
    restarted server never finds a stale one."""
    paths = [data_dir / LOCK_NAME]
    database = _sqlite_file(store_url)
    if database is not None:  # the default store included: another server may name it
        paths.append(database.with_name(database.name + ".lock"))
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    about = (
        f"pid {os.getpid()} on {socket.gethostname()}, listening at {address}, replica "
        f"{replica_id}, since {started}"
    )
    for path in paths:
        _hold_file(path, about)


def release() -> None:
    """Let go of what `hold` took (the process's end does the same)."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)


def _sqlite_file(store_url: str) -> Path | None:
    try:
        url = sa.make_url(store_url)
    except sa.exc.ArgumentError:
        return None
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _hold_file(path: Path, about: str) -> None:
    key = os.path.realpath(path)
    if key in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "a server starting"
        os.close(fd)
        what = "data folder" if path.name == LOCK_NAME else "SQLite store"
        where = path.parent if path.name == LOCK_NAME else path.with_suffix("")
        raise errors.InUse(
            f"the {what} {where} is in use by another cortex server ({holder}): stop it, or "
            "give this server a data folder of its own (--data-dir); replicas share a "
            "PostgreSQL store, never a data folder"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    # Holding it: say who, for the message of the next server that tries.
    os.ftruncate(fd, 0)
    os.pwrite(fd, (about + "\n").encode(), 0)
    _held[key] = fd


class Membership:
    def __init__(self, cluster: Cluster, replica_id: str, address: str, lease_s: float) -> None:
        self.cluster = cluster
        self.replica_id = replica_id
        self.address = address
        self.lease_s = lease_s
        self._leader_until = 0.0  # time.monotonic()
        self._next_renewal = 0.0

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._leader_until

    def renew(self) -> bool:
        """Register this replica and renew (or try to take) the leader lease, at most a few
        times per lease period; returns whether this replica leads now."""
        started = time.monotonic()
        if started < self._next_renewal:
            return self.is_leader
        self._next_renewal = started + self.lease_s / _RENEWALS_PER_LEASE
        was_leader = self.is_leader
        self.cluster.register(self.replica_id, self.address)
        if self.cluster.take_leadership(self.replica_id, self.lease_s):
            # Counted from before the write: this replica stops acting as leader no later
            # than the others may take over.
            self._leader_until = started + self.lease_s
        else:
            self._leader_until = 0.0
        if self.is_leader != was_leader:
            log.info(
                "replica %s %s the reconciler's leader lease",
                self.replica_id,
                "holds" if self.is_leader else "does not hold",
            )
        return self.is_leader

    def resign(self) -> None:
        if self.is_leader:
            self._leader_until = 0.0
            self.cluster.resign(self.replica_id)
