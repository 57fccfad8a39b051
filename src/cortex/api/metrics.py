"""`GET /metrics` in Prometheus's text format: the store's counts per API, read at each scrape,
and what this replica timed itself (batches its workers reported, requests it answered).

Across replicas (docs/scale.md): the store's series are the same on every replica, so aggregate
them with `max`; the process's series count what this replica saw, so `sum` them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    exposition,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cortex.jobs import JobStatus, WorkerState
from cortex.store import stats
from cortex.store.records import BatchResult

log = logging.getLogger("cortex.server")
router = APIRouter(include_in_schema=False)

# Batches run from milliseconds (a small model on a few items) to an hour (a big one on many).
TIME_PER_BATCH_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
# Status reads answer in about a millisecond; a deploy or a big submission takes seconds.
REQUEST_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip
_JOB_STATUSES = [s.value for s in JobStatus if s is not JobStatus.UNKNOWN]
_QUEUE_STATES = ["queued", "leased"]
_WORKER_STATES = [s.value for s in WorkerState]


class Metrics:
    """One app's registry (not the process-wide default: tests run several apps in one
    process, and a registry is what a scrape reads)."""

    def __init__(self, state: Any) -> None:
        # No `_created` series: a sample per counter and histogram that Prometheus's text format
        # does not use. The switch is process-wide; the server has no other registry.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # (unannotated upstream)
        self.registry = CollectorRegistry()
        self.time_per_batch = Histogram(
            "cortex_time_per_batch",
            "Seconds predict took on a batch that succeeded, as its worker reported it to this "
            "replica (sum across replicas)",
            ["api_name"],
            buckets=TIME_PER_BATCH_BUCKETS_S,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "cortex_http_request_duration_seconds",
            "Seconds this replica took to start its answer to a request, by route template "
            "(a streamed log answer counts until its first byte)",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(StoreCollector(state))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def observe_results(self, api_name: str, results: Iterable[BatchResult]) -> None:
        """Called by the lease route: the only work metrics add to a worker's request."""
        child = None
        for result in results:
            if result.ok:
                child = child or self.time_per_batch.labels(api_name)
                child.observe(result.duration_s)


class StoreCollector(Collector):
    """The store's counts, read when scraped: a few grouped reads, nothing kept in between."""

    def __init__(self, state: Any) -> None:
        # The app's state: the service exists only once the app's lifespan has started.
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []  # the families are only known by reading the store

    def collect(self) -> Iterator[Metric]:
        service = getattr(self.state, "service", None)
        membership = getattr(self.state, "membership", None)
        if service is None or membership is None:
            return
        leader = GaugeMetricFamily(
            "cortex_replica_leader",
            "1 on the replica that leads the reconciling, 0 on the others",
            labels=["replica_id"],
        )
        leader.add_metric([membership.replica_id], 1 if membership.is_leader else 0)
        yield leader
        up = GaugeMetricFamily("cortex_store_up", "1 if this scrape could read the store")
        try:
            snap = service.lifecycle.snapshot()
        except sa.exc.SQLAlchemyError as err:
            # The process's own series are still worth a scrape when the database is away.
            log.warning("metrics: cannot read the store: %s", err.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _store_families(snap)


def _store_families(snap: stats.Snapshot) -> Iterator[Metric]:
    # Every deployed API gets every status and state, at 0 when it has none: a series that
    # appears and vanishes graphs as gaps, and `rate` needs its zeros.
    apis = sorted(set(snap.apis) | {api for api, _ in snap.jobs})
    jobs = GaugeMetricFamily(
        "cortex_jobs", "Jobs in the store by status", labels=["api_name", "status"]
    )
    succeeded = CounterMetricFamily(
        "cortex_batch_succeeded",
        "Batches that succeeded, over every job of the API (the store's exact count)",
        labels=["api_name"],
    )
    failed = CounterMetricFamily(
        "cortex_batch_failed",
        "Batches that failed all their attempts, over every job of the API",
        labels=["api_name"],
    )
    queue = GaugeMetricFamily(
        "cortex_queue_depth",
        "Batches of in-progress jobs waiting (queued) or being run (leased); their sum is "
        "the status's batches_in_queue",
        labels=["api_name", "state"],
    )
    workers = GaugeMetricFamily(
        "cortex_workers",
        "Workers of in-progress jobs by state, as the status's worker_counts",
        labels=["api_name", "state"],
    )
    for api in apis:
        for status in _JOB_STATUSES:
            jobs.add_metric([api, status], snap.jobs.get((api, status), 0))
        succeeded.add_metric([api], snap.succeeded.get(api, 0))
        failed.add_metric([api], snap.failed.get(api, 0))
        for state in _QUEUE_STATES:
            queue.add_metric([api, state], snap.batches.get((api, state), 0))
        for state in _WORKER_STATES:
            workers.add_metric([api, state], snap.workers.get((api, state), 0))
    yield from (jobs, succeeded, failed, queue, workers)


async def metrics(conn: HTTPConnection) -> Metrics:
    """The app's metrics, as a dependency (a coroutine: see `deps`)."""
    found: Metrics = conn.app.state.metrics
    return found


MetricsDep = Annotated[Metrics, Depends(metrics)]


@router.get("/metrics")
def scrape(request: Request, found: MetricsDep) -> Response:
    """Prometheus's text format, or OpenMetrics when the scraper asks for it. A plain function:
    FastAPI runs it in its thread pool, since the store's reads may wait on a network."""
    encode, content_type = exposition.choose_encoder(request.headers.get("accept", ""))
    return Response(encode(found.registry), media_type=content_type)


class RequestTimer:
    """Pure ASGI middleware: one histogram observation per HTTP request, labelled with the
    route's template (`/{api_name}/{job_id}`), never the raw path, so that the series stay
    few whatever the API names and job ids."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram
        # Each labelled child once: `labels()` validates and locks on every call, and this runs
        # on every lease. The keys are bounded by the routes, methods and statuses.
        self._children: dict[tuple[str, str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # a websocket lasts as long as it follows a log
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        started = False

        async def timed_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self._observe(scope, message["status"], time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not started:  # Starlette's outermost layer answers 500 for it
                self._observe(scope, 500, time.perf_counter() - start)
            raise

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        # The router writes the matched route into the scope; a request refused before routing
        # (401) or matching nothing (404) has none.
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        key = (scope["method"], route, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.histogram.labels(
                route=route, status=str(status), method=scope["method"]
            )
        child.observe(seconds)
