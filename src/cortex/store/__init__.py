"""The store: every piece of state (APIs, jobs, the batch queue, workers), behind one class."""

from cortex.store.records import ApiRecord, Job, LeasedBatch, LeaseResult, WorkerRecord
from cortex.store.sql import Store

__all__ = ["ApiRecord", "Job", "LeaseResult", "LeasedBatch", "Store", "WorkerRecord"]
