"""The webhook outbox, idempotency keys and job metadata in the store, on both engines."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from cortex import errors
from cortex.jobs import JobStatus
from cortex.store import Store
from cortex.store.submissions import IDEMPOTENCY_TTL_S, NO_EXTRAS, Extras

API_SPEC: dict[str, Any] = {"name": "api", "kind": "BatchAPI", "predictor": {"config": {}}}
HOOK = {"url": "http://127.0.0.1:9/h", "events": ["job.running", "job.ended"]}


def _job(store: Store, job_id: str, extras: Extras = NO_EXTRAS) -> str:
    if store.get_api("api") is None:
        store.put_api("api", "spec1", API_SPEC, b"archive")
    store.create_job(
        job_id=job_id,
        api_name="api",
        workers=1,
        config=None,
        timeout_s=None,
        max_attempts=1,
        worker_token="token",
        payloads=["[1]"],
        replica_id="r1",
        extras=extras,
    )
    return job_id


def test_status_changes_write_the_events_the_webhook_asked_for(store: Store) -> None:
    _job(store, "hooked", Extras(webhook=HOOK))
    _job(store, "plain")
    only_stops = {"url": HOOK["url"], "events": ["job.stopped"]}
    _job(store, "picky", Extras(webhook=only_stops))
    for job_id in ("hooked", "plain", "picky"):
        assert store.set_status(job_id, JobStatus.TIMED_OUT)
    # A refused transition (the job ended already) writes nothing.
    assert not store.set_status("hooked", JobStatus.STOPPED)
    assert [d["event"] for d in store.job_deliveries("hooked")] == ["job.running", "job.timed_out"]
    assert store.job_deliveries("plain") == []
    assert store.job_deliveries("picky") == []


def test_a_due_delivery_is_claimed_once_until_its_lease_ends(store: Store) -> None:
    _job(store, "j1", Extras(webhook={**HOOK, "events": ["job.running"]}))
    now = time.time()
    claims: list[list[Any]] = []

    def claim() -> None:
        claims.append(store.claim_deliveries(now, lease_s=60))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(c) for c in claims) == [0, 0, 0, 1]
    (delivery,) = next(c for c in claims if c)
    assert delivery.event == "job.running" and delivery.body is None
    assert store.claim_deliveries(now + 59, lease_s=60) == []
    # Its claimer died: due again once the lease is over, with the body fixed at first.
    store.fix_delivery_body(delivery.delivery_id, '{"a": 1}')
    store.fix_delivery_body(delivery.delivery_id, '{"b": 2}')
    (again,) = store.claim_deliveries(now + 61, lease_s=60)
    assert again.delivery_id == delivery.delivery_id and again.body == '{"a": 1}'


def test_attempts_are_recorded_until_delivered_or_given_up(store: Store) -> None:
    _job(store, "j1", Extras(webhook=HOOK))
    now = time.time()
    (running,) = store.claim_deliveries(now, 60)
    store.settle_attempt(running.delivery_id, now=now, status=500, error="HTTP 500", retry_at=now)
    (retried,) = store.claim_deliveries(now, 60)
    assert retried.attempts == 1
    store.settle_attempt(retried.delivery_id, now=now, status=204, error=None, retry_at=now)
    assert store.claim_deliveries(now + 3600, 60) == []
    assert store.set_status("j1", JobStatus.STOPPED)
    (stopped,) = store.claim_deliveries(time.time(), 60)
    store.settle_attempt(stopped.delivery_id, now=now, status=None, error="refused", retry_at=None)
    assert store.claim_deliveries(now + 3600, 60) == []
    rows = {d["event"]: d for d in store.job_deliveries("j1")}
    assert rows["job.running"]["attempts"] == 2 and rows["job.running"]["delivered_at"]
    assert rows["job.running"]["last_status"] == 204
    assert rows["job.stopped"]["gave_up_at"] and rows["job.stopped"]["last_error"] == "refused"


def test_an_idempotency_key_names_one_job_for_a_day(store: Store) -> None:
    key = Extras(idempotency_key="k1", body_digest="d1")
    _job(store, "first", key)
    with pytest.raises(errors.KeyTaken):
        _job(store, "second", key)
    assert store.get_job("second") is None  # nothing of it was written
    now = time.time()
    assert store.idempotent_job("api", "k1", now) == ("d1", "first")
    assert store.idempotent_job("api", "k2", now) is None
    later = now + IDEMPOTENCY_TTL_S + 1
    assert store.idempotent_job("api", "k1", later) is None
    assert store.prune_idempotency_keys(later) == 1


def test_metadata_filters_listings_and_goes_with_its_api(store: Store) -> None:
    _job(store, "a", Extras(metadata={"team": "x", "stage": "train"}))
    _job(store, "b", Extras(metadata={"team": "x", "stage": "eval"}))
    _job(store, "c")
    assert {j.job_id for j in store.list_jobs("api", metadata={"team": "x"})} == {"a", "b"}
    assert [j.job_id for j in store.list_jobs("api", metadata={"stage": "eval"})] == ["b"]
    assert store.list_jobs("api", metadata={"team": "x", "stage": "nope"}) == []
    assert store.get_job("a").metadata == {"team": "x", "stage": "train"}  # type: ignore[union-attr]
    store.delete_api("api")
    store.put_api("api", "spec1", API_SPEC, b"archive")
    assert store.list_jobs("api", metadata={"team": "x"}) == []


def test_deliveries_outlive_their_deleted_api_until_settled(store: Store) -> None:
    _job(store, "j1", Extras(webhook={**HOOK, "events": ["job.stopped"]}))
    assert store.set_status("j1", JobStatus.STOPPED)
    store.delete_api("api")
    assert store.prune_orphan_deliveries() == 0  # not sent yet: kept
    (delivery,) = store.claim_deliveries(time.time(), 60)
    assert (delivery.job_id, delivery.api_name, delivery.event) == ("j1", "api", "job.stopped")
    store.settle_attempt(
        delivery.delivery_id, now=time.time(), status=200, error=None, retry_at=None
    )
    assert store.prune_orphan_deliveries() == 1
