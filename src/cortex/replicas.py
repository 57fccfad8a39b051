"""This server among its replicas: its lasting id, its registration, and the leader lease.

Any replica answers any request; only the one that holds the leader lease does the store-wide
work of the reconciler. The lease lives in the store with an expiry and is renewed several times
per lease period, so a leader that dies is replaced within about one `leader_lease_s`.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

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
