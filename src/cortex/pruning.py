"""Pruning: what is past its retention (logs, succeeded payloads, ended jobs) deleted from the
store by the leader, and this replica's own files that nothing uses any more, on a thread of
its own: deleting a big job and giving its space back can take seconds, which must not delay
the reconciler's tick."""

from __future__ import annotations

import logging
import shutil
import threading
import time

from cortex.replicas import Membership
from cortex.service import Service

log = logging.getLogger("cortex.server")


class Pruner:
    def __init__(self, service: Service, membership: Membership, stopped: threading.Event) -> None:
        self.service = service
        self.settings = service.settings
        self.membership = membership
        self._stopped = stopped  # set by the reconciler's `close`
        self._thread = threading.Thread(target=self._prune_loop, name="cortex-pruner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def _prune_loop(self) -> None:
        while not self._stopped.wait(self.settings.prune_s):
            try:
                self.prune()
            except Exception:  # one bad pass must not end pruning
                log.exception("pruning failed")

    def prune(self) -> None:
        """Delete what is past its retention, and give the space back: rows of the store (by
        the leader: they are everyone's), then this replica's own files."""
        now = time.time()
        store = self.service.store
        if self.membership.is_leader:
            pruned = self.service.logs.prune(
                now - self.settings.log_retention_s, self.settings.log_max_lines_per_job
            )
            if pruned:
                log.info("pruned %d log chunks past the retention settings", pruned)
            # An ended job's succeeded batches are never read again: their payloads (often
            # most of the store) go; failed ones stay for retry_failed.
            freed = store.prune_payloads()
            if freed:
                log.info("deleted the payloads of %d succeeded batches of ended jobs", freed)
            store.prune_idempotency_keys(now)
            store.prune_orphan_deliveries()
            gone = store.prune_jobs(now - self.settings.job_retention_s)
            if gone:
                log.info("deleted %d jobs past CORTEX_JOB_RETENTION_S", len(gone))
        self._prune_outputs()
        removed = self.service.deploys.prune_projects()
        if removed:
            log.info("removed %d unpacked projects that nothing uses", len(removed))
        # Environments used by no API version and no running job, over the budget.
        self.service.deploys.prune_environments()
        freed = store.vacuum()
        if freed:
            log.info("gave %d MiB back to the file system", freed >> 20)

    def _prune_outputs(self) -> None:
        """The output files of workers (`<data>/logs/<job id>/`) of jobs that are gone."""
        root = self.settings.data_dir.resolve() / "logs"
        if not root.is_dir():
            return
        for folder in root.iterdir():
            if self.service.store.get_job(folder.name) is None:
                shutil.rmtree(folder, ignore_errors=True)
