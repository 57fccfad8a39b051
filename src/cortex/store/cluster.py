"""Server replicas in the store: who is up, who leads, and which workers nobody watches.

Every replica renews its row on its reconciler tick. One of them holds the leader lease and does
the store-wide work (lease expiry, timeouts, lost workers). A worker is watched by the replica
that started it; when that replica is gone and the worker has not been heard from for a while,
the leader declares it lost. Times are the servers' clocks (`time.time()`), as everywhere in the
store: replicas need clocks in step (NTP) to well within `leader_lease_s`.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from cortex.jobs import WorkerState
from cortex.store import tables as t
from cortex.store.records import WorkerRecord
from cortex.store.sql import Store, insert_ignore, worker_record

RECONCILER = "reconciler"
_ALIVE = [s.value for s in WorkerState if s.alive]


class Cluster:
    def __init__(self, store: Store) -> None:
        self._store = store

    def register(self, replica_id: str, url: str) -> None:
        """Say that this replica is up (insert its row, or renew it)."""
        now = time.time()
        with self._store.write() as conn:
            renewed = conn.execute(
                t.replicas.update()
                .where(t.replicas.c.replica_id == replica_id)
                .values(url=url, seen_at=now)
            )
            if renewed.rowcount == 0:
                conn.execute(
                    insert_ignore(conn, t.replicas).values(
                        replica_id=replica_id, url=url, started_at=now, seen_at=now
                    )
                )

    def take_leadership(self, replica_id: str, lease_s: float, name: str = RECONCILER) -> bool:
        """Renew the lease if this replica holds it, take it if it has expired; True if this
        replica holds it until now + `lease_s`.

        Both are one compare-and-set UPDATE: of two replicas that find the lease expired at
        once, PostgreSQL makes the second re-check the WHERE against the first one's row, so
        only one takes it.
        """
        now = time.time()
        lease = t.leadership.c
        with self._store.write() as conn:
            taken = conn.execute(
                t.leadership.update()
                .where(
                    lease.name == name,
                    sa.or_(lease.replica_id == replica_id, lease.expires_at < now),
                )
                .values(
                    replica_id=replica_id,
                    expires_at=now + lease_s,
                    since=sa.case((lease.replica_id == replica_id, lease.since), else_=now),
                )
            )
            if taken.rowcount == 1:
                return True
            first = conn.execute(
                insert_ignore(conn, t.leadership).values(
                    name=name, replica_id=replica_id, expires_at=now + lease_s, since=now
                )
            )
            return bool(first.rowcount == 1)

    def resign(self, replica_id: str, name: str = RECONCILER) -> None:
        """Give the lease up now (a clean shutdown), so another replica need not wait."""
        with self._store.write() as conn:
            conn.execute(
                t.leadership.update()
                .where(t.leadership.c.name == name, t.leadership.c.replica_id == replica_id)
                .values(expires_at=0.0)
            )

    def leader(self, name: str = RECONCILER) -> str | None:
        """The replica that holds the lease now, if any."""
        with self._store.read() as conn:
            row = conn.execute(
                sa.select(t.leadership.c.replica_id).where(
                    t.leadership.c.name == name, t.leadership.c.expires_at >= time.time()
                )
            ).first()
        return None if row is None else str(row.replica_id)

    def live_replicas(self, ttl_s: float) -> list[str]:
        with self._store.read() as conn:
            rows = conn.execute(
                sa.select(t.replicas.c.replica_id)
                .where(t.replicas.c.seen_at >= time.time() - ttl_s)
                .order_by(t.replicas.c.replica_id)
            )
            return [str(r) for r in rows.scalars()]

    def lost_workers(self, replica_ttl_s: float, seen_ttl_s: float) -> list[WorkerRecord]:
        """Workers that should be alive but that no live replica watches and that have not
        been heard from for `seen_ttl_s`: their replica died (or never started them)."""
        now = time.time()
        w, r = t.workers.c, t.replicas.c
        with self._store.read() as conn:
            rows = conn.execute(
                sa.select(t.workers)
                .outerjoin(t.replicas, r.replica_id == w.replica_id)
                .where(
                    w.state.in_(_ALIVE),
                    sa.or_(r.replica_id.is_(None), r.seen_at < now - replica_ttl_s),
                    sa.func.coalesce(w.seen_at, w.updated_at) < now - seen_ttl_s,
                )
                .order_by(w.job_id, w.worker_id)
            ).all()
        return [worker_record(row) for row in rows]

    def mark_lost(self, worker_id: str, message: str) -> bool:
        """Mark a worker `unknown` if it is still thought alive; True if this call did it, so
        that of two replicas that find it lost at once only one replaces it."""
        now = time.time()
        with self._store.write() as conn:
            lost = conn.execute(
                t.workers.update()
                .where(t.workers.c.worker_id == worker_id, t.workers.c.state.in_(_ALIVE))
                .values(state=WorkerState.UNKNOWN.value, error_message=message, updated_at=now)
            )
            return bool(lost.rowcount == 1)
