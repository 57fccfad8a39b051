"""The service: builds the capability modules over one store and launcher, and holds them.

Each part owns one capability: `lifecycle` (reading, stopping and ending jobs), `deploys`
(API versions, environments, projects), `launching` (starting workers here), `pool` (the
capacity, and placing workers into it), `submissions` (creating jobs, enqueuing), `idempotent`
(submissions with an Idempotency-Key), `outputs` (writing results) and `workers` (the worker
API). The routes and the reconciler call them; none of them reaches into another's state."""

from __future__ import annotations

from cortex.deploys import Deploys
from cortex.idempotency import IdempotentSubmits
from cortex.launchers import Launcher
from cortex.launching import Launching
from cortex.lifecycle import Lifecycle
from cortex.outputs import Outputs
from cortex.pool import Pool
from cortex.settings import Settings
from cortex.store import Store
from cortex.store.logs import LogStore
from cortex.submissions import Submissions
from cortex.workerapi import WorkerApi


class Service:
    def __init__(
        self, settings: Settings, store: Store, launcher: Launcher, replica_id: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.launcher = launcher
        self.logs = LogStore(store, settings.log_max_bytes)
        # The workers this replica starts are its own to watch (see `cortex.replicas`).
        self.replica_id = replica_id
        self.lifecycle = Lifecycle(store, self.logs)
        self.deploys = Deploys(settings, store, launcher, self.lifecycle)
        self.launching = Launching(
            settings, store, launcher, self.logs, replica_id, self.lifecycle, self.deploys
        )
        self.pool = Pool(settings, store, launcher, self.lifecycle, self.launching, replica_id)
        self.submissions = Submissions(settings, store, replica_id, self.lifecycle, self.pool)
        self.idempotent = IdempotentSubmits(store, self.submissions, self.lifecycle)
        self.outputs = Outputs(settings, store, self.lifecycle)
        self.workers = WorkerApi(
            settings, store, self.lifecycle, self.launching.preparation, self.outputs
        )

    @property
    def reads_inline(self) -> bool:
        """Whether a short store read may run on the event loop (see `api.deps.read`)."""
        return self.store.is_sqlite
