"""Webhooks: the deliverer that sends the outbox's due deliveries (`cortex.store.outbox`), each
signed with the server's `CORTEX_WEBHOOK_SECRET`, and retried with backoff until the receiver
answers 2xx or `CORTEX_WEBHOOK_GIVE_UP_S` has passed since the event.

A delivery POSTs the job's status JSON (what `GET /<api>/<job_id>` answers, without the API's
spec: that may hold the deployer's secrets) with the event and the delivery's id, fixed at its
first attempt so that every retry sends the same bytes. Headers:

- `Cortex-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (Stripe's scheme:
  the timestamp lets a receiver refuse old replays);
- `Cortex-Event: job.succeeded` (or another event), `Cortex-Delivery: <id>`, the same on every
  retry of one delivery, so that a receiver can drop the copies that at-least-once brings.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import logging
import random
import threading
import time
from typing import Any

import httpx

from cortex import __version__, errors, exactjson, hookspec, views
from cortex.service import Service
from cortex.store.outbox import Delivery

log = logging.getLogger("cortex.server")

SIGNATURE_HEADER = "Cortex-Signature"
EVENT_HEADER = "Cortex-Event"
DELIVERY_HEADER = "Cortex-Delivery"
# How often the outbox is looked at when nothing wakes the deliverer (another replica's
# events, retries coming due).
_POLL_S = 1.0
# Deliveries sent at once: one slow receiver must not hold the others back.
_SENDERS = 8


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Cortex-Signature` value of a body sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


class Deliverer:
    """Sends due webhook deliveries on a thread of its own (a receiver that takes its time
    must not delay the reconciler's tick). Every replica runs one; claims keep them off each
    other's deliveries."""

    def __init__(self, service: Service, stopped: threading.Event) -> None:
        self.service = service
        self.settings = service.settings
        self._stopped = stopped
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cortex-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def join(self, timeout: float) -> None:
        self._wake.set()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        with httpx.Client(
            timeout=self.settings.webhook_timeout_s,
            follow_redirects=False,  # a redirect could lead anywhere the allow-list forbids
            headers={"User-Agent": f"cortex-batch/{__version__}"},
        ) as client:
            while not self._stopped.is_set():
                self._wake.wait(_POLL_S)
                self._wake.clear()
                try:
                    self.deliver_due(client)
                except Exception:  # one bad pass must not end delivering
                    log.exception("webhook delivery pass failed")

    def deliver_due(self, client: httpx.Client) -> int:
        """Send every delivery due now (once each); how many were attempted."""
        # At most as many as are sent at once, so each is sent within its lease (one attempt's
        # time limit and a margin): a claim that lapses lets another replica send it too.
        lease_s = self.settings.webhook_timeout_s + 5.0
        claimed = self.service.store.claim_deliveries(time.time(), lease_s, limit=_SENDERS)
        if claimed:
            with concurrent.futures.ThreadPoolExecutor(min(_SENDERS, len(claimed))) as pool:
                list(pool.map(lambda d: self._attempt(client, d), claimed))
        return len(claimed)

    def _attempt(self, client: httpx.Client, delivery: Delivery) -> None:
        store = self.service.store
        status: int | None = None
        error: str | None = None
        body = delivery.body
        if body is None:
            body = self._body(delivery)
            store.fix_delivery_body(delivery.delivery_id, body)
        # The settings may have changed since the event was written (a restart): they apply.
        allowed = self.settings.webhook_urls
        if not self.settings.webhook_secret:
            error = "this server has no CORTEX_WEBHOOK_SECRET to sign with"
        elif not _allowed(delivery.url, allowed):
            error = "the URL is not under CORTEX_WEBHOOK_URLS"
        else:
            status, error = self._post(client, delivery, body.encode())
        now = time.time()
        delivered = status is not None and 200 <= status < 300
        give_up = now - delivery.created_at >= self.settings.webhook_give_up_s
        retry_at = None if delivered or give_up else now + self._backoff_s(delivery.attempts)
        store.settle_attempt(
            delivery.delivery_id, now=now, status=status, error=error, retry_at=retry_at
        )
        if not delivered:
            what = "giving up" if retry_at is None else f"retrying in {retry_at - now:.0f} s"
            log.warning(
                "job %s: webhook %s to %s failed (%s); %s",
                delivery.job_id,
                delivery.event,
                delivery.url,
                error,
                what,
            )

    def _post(
        self, client: httpx.Client, delivery: Delivery, body: bytes
    ) -> tuple[int | None, str | None]:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.settings.webhook_secret, int(time.time()), body),
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: delivery.delivery_id,
        }
        try:
            response = client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as err:
            return None, f"{type(err).__name__}: {err}"[:500]
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}: {response.text[:200]}"

    def _backoff_s(self, attempts_before: int) -> float:
        """Exponential from `webhook_retry_base_s`, capped, with jitter (half to all of it):
        receivers that failed together are not retried together."""
        base: float = self.settings.webhook_retry_base_s * 2.0 ** min(attempts_before, 30)
        return min(base, self.settings.webhook_max_backoff_s) * random.uniform(0.5, 1.0)

    def _body(self, delivery: Delivery) -> str:
        """The status JSON a delivery sends. A job deleted with its API before its event was
        first sent is told by what the delivery knows: its id, API and status."""
        progress = self.service.lifecycle.job_progress(delivery.job_id)
        if progress is None:
            gone = {
                "job_id": delivery.job_id,
                "api_name": delivery.api_name,
                "status": "status_" + delivery.event.removeprefix("job."),
                "deleted": True,
            }
            document = {"event": delivery.event, "delivery_id": delivery.delivery_id}
            return exactjson.dumps({**document, "job_status": gone}).decode()
        job = progress[0]
        status: dict[str, Any] = views.status_json(
            progress,
            self.service.lifecycle.api_spec_for(job),
            self.settings.resolved_public_url,
            None,
        )
        del status["api_spec"]
        del status["job_status"]["webhook_deliveries"]
        document = {"event": delivery.event, "delivery_id": delivery.delivery_id, **status}
        return exactjson.dumps(document).decode()


def _allowed(url: str, allowed: tuple[str, ...]) -> bool:
    try:
        hookspec.check_webhook_url(url, allowed)
    except errors.CortexError:
        return False
    return True
