"""Webhooks, idempotent submits and job metadata, on SQLite and on PostgreSQL: a real server
with real workers, and a webhook receiver on loopback that fails when told to."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cortex import errors, spec
from cortex.client import Client
from cortex.jobs import JobStatus
from cortex.store import Store, schema
from cortex.store.submissions import Extras
from cortex.submissions import ENQUEUE_INTERRUPTED
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)
from postgres import Databases

SECRET = "test-webhook-secret"
README = Path(__file__).parents[2] / "README.md"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers 500 to the first `fail_first[path]` attempts
    of each delivery to a path, and 503 to every request of a path in `refuse`; records them
    all."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    refuse: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            delivery = headers.get("Cortex-Delivery")
            seen = sum(
                1
                for r in self.received
                if r.path == path and r.headers.get("Cortex-Delivery") == delivery
            )
            code = 200
            if path in self.refuse:
                code = 503
            elif seen < self.fail_first.get(path, 0):
                code = 500
            self.received.append(Received(path, headers, body, code))
            return code

    def accepted(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path and r.answered == 200]

    def all(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            code = state.answer(self.path, dict(self.headers.items()), body)
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@dataclass
class HookServer:
    server: Server
    env: dict[str, str]
    api: DeployedApi

    def client(self) -> Client:
        return self.server.client()

    def restart(self, kill: bool) -> None:
        """Stop the server (SIGKILL with `kill`) and start it again on the same store."""
        port = int(self.server.url.rsplit(":", 1)[1])
        if kill:
            self.server.process.kill()
            self.server.process.wait()
        else:
            stop_server(self.server)
        self.server = start_server(self.server.data_dir, port=port, **self.env)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def hooks(
    request: pytest.FixtureRequest,
    receiver: Receiver,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HookServer]:
    env = {
        "CORTEX_WEBHOOK_SECRET": SECRET,
        "CORTEX_WEBHOOK_URLS": f"{receiver.url}/hooks/",
        "CORTEX_WEBHOOK_RETRY_BASE_S": "0.2",
        # A delivery claimed by the server killed below is claimed again after this (and 5 s).
        "CORTEX_WEBHOOK_TIMEOUT_S": "2",
    }
    if request.param == "postgresql":
        databases: Databases = request.getfixturevalue("pg_databases")
        store = Store(databases.create())
        schema.upgrade(store)
        store.close()
        env["CORTEX_STORE"] = store.url
    tmp = tmp_path_factory.mktemp(f"hooks-{request.param}")
    server = start_server(tmp / "server", **env)
    try:
        with server.client() as client:
            api = deploy_fixture(client, "recorder", tmp)
        hook_server = HookServer(server, env, api)
        yield hook_server
    finally:
        stop_server(hook_server.server if "hook_server" in locals() else server)


def _readme_verify() -> Any:
    """The signature check README.md gives receivers, run as written."""
    text = README.read_text()
    code = re.search(r"<!-- webhook-verify -->\n```python\n(.*?)```", text, re.S)
    assert code is not None, "README.md lost its webhook-verify snippet"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)
    return namespace["verify"]


def _submit(client: Client, api: str, **extra: Any) -> str:
    body = {"workers": 1, "item_list": {"items": [1, 2, 3], "batch_size": 2}, **extra}
    return str(client.submit(api, body)["job_id"])


def test_a_webhook_refused_twice_is_retried_signed_and_shown_in_the_status(
    hooks: HookServer, receiver: Receiver
) -> None:
    path = f"/hooks/flaky-{uuid.uuid4().hex}"
    receiver.fail_first[path] = 2
    webhook = {"url": receiver.url + path, "events": ["job.running", "job.ended"]}
    with hooks.client() as client:
        job_id = _submit(client, hooks.api.name, webhook=webhook, metadata={"run": "a"})
        wait_for_status(client, hooks.api.name, job_id)
        finals = wait_for(
            lambda: [
                r for r in receiver.accepted(path) if r.headers["Cortex-Event"] != "job.running"
            ],
            20,
            "the final event to be accepted",
        )
        status = wait_for(
            lambda: (
                (s := client.get_job(hooks.api.name, job_id)["job_status"])
                and all(d["state"] == "delivered" for d in s["webhook_deliveries"])
                and s
            ),
            10,
            "both deliveries to show as delivered",
        )
    verify = _readme_verify()
    sent = receiver.all(path)
    events = {r.headers["Cortex-Event"] for r in sent}
    assert events == {"job.running", "job.succeeded"}
    # Each delivery was refused twice, then accepted, with one delivery id and the same
    # body on every attempt, each signed.
    for delivery_id in {r.headers["Cortex-Delivery"] for r in sent}:
        attempts = [r for r in sent if r.headers["Cortex-Delivery"] == delivery_id]
        assert [r.answered for r in attempts] == [500, 500, 200]
        assert len({r.body for r in attempts}) == 1
        assert all(verify(SECRET, r.headers["Cortex-Signature"], r.body) for r in attempts)
        signature, body = attempts[0].headers["Cortex-Signature"], attempts[0].body
        assert not verify("another secret", signature, body)
        assert not verify(SECRET, signature, body + b" ")
        assert not verify(SECRET, "t=1,v1=00", body)
    assert len(finals) == 1
    body = json.loads(finals[0].body)
    assert body["event"] == "job.succeeded"
    assert body["delivery_id"] == finals[0].headers["Cortex-Delivery"]
    assert body["job_status"]["job_id"] == job_id
    assert body["job_status"]["status"] == "status_succeeded"
    assert body["job_status"]["metadata"] == {"run": "a"}
    assert "api_spec" not in body
    deliveries = {d["event"]: d for d in status["webhook_deliveries"]}
    assert set(deliveries) == {"job.running", "job.succeeded"}
    assert len(sent) == 6
    assert all(d["attempts"] == 3 for d in deliveries.values())
    assert all(d["last_status"] == 200 and d["delivered_at"] for d in deliveries.values())
    assert status["webhook"] == {"url": webhook["url"], "events": webhook["events"]}


def test_a_delivery_pending_when_the_server_dies_is_sent_after_its_restart(
    hooks: HookServer, receiver: Receiver
) -> None:
    path = f"/hooks/down-{uuid.uuid4().hex}"
    receiver.refuse.add(path)
    with hooks.client() as client:
        job_id = _submit(client, hooks.api.name, webhook={"url": receiver.url + path})
        wait_for_status(client, hooks.api.name, job_id)
        wait_for(lambda: receiver.all(path), 10, "a first, refused, attempt")
    hooks.restart(kill=True)
    receiver.refuse.discard(path)
    accepted = wait_for(lambda: receiver.accepted(path), 20, "the delivery after the restart")
    assert accepted[0].headers["Cortex-Event"] == "job.succeeded"
    assert json.loads(accepted[0].body)["job_status"]["job_id"] == job_id
    # One delivery, however many attempts it took.
    assert len({r.headers["Cortex-Delivery"] for r in receiver.all(path)}) == 1


def test_webhooks_are_checked_when_submitted(hooks: HookServer, receiver: Receiver) -> None:
    cases = [
        ({"url": "ftp://127.0.0.1/x"}, "batchapi.invalid_webhook"),
        ({"url": receiver.url + "/hooks/x", "events": ["job.nope"]}, "batchapi.invalid_webhook"),
        ({"url": receiver.url + "/hooks/x", "events": []}, "batchapi.invalid_webhook"),
        ({"events": ["job.ended"]}, "batchapi.invalid_webhook"),
        ("https://x", "batchapi.invalid_webhook"),
        # Outside CORTEX_WEBHOOK_URLS: another path, another host that starts alike.
        ({"url": receiver.url + "/elsewhere"}, "batchapi.webhook_not_allowed"),
        ({"url": receiver.url + "0/hooks/x"}, "batchapi.webhook_not_allowed"),
    ]
    with hooks.server.http() as http:
        for webhook, kind in cases:
            body = {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "webhook": webhook}
            response = http.post(f"/{hooks.api.name}", json=body)
            assert response.status_code == 400, (webhook, response.text)
            assert response.json()["kind"] == kind, webhook


def test_a_server_without_a_secret_refuses_webhooks(client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    body = {
        "workers": 1,
        "item_list": {"items": [1], "batch_size": 1},
        "webhook": {"url": "http://127.0.0.1:9/x"},
    }
    with pytest.raises(errors.CortexError, match="CORTEX_WEBHOOK_SECRET") as err:
        client.submit(api.name, body)
    assert err.value.kind == "batchapi.webhook_unsigned"


def test_an_idempotency_key_answers_the_first_job_and_refuses_another_body(
    hooks: HookServer,
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    body = {"workers": 1, "item_list": {"items": [1, 2], "batch_size": 1}}
    url = f"/{hooks.api.name}"
    with hooks.server.http() as http:
        first = http.post(url, json=body, headers={"Idempotency-Key": key})
        # The same body, its keys in another order: the same submission.
        again = http.post(
            url,
            content=json.dumps(dict(reversed(list(body.items())))),
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
        )
        other = http.post(url, json={**body, "workers": 2}, headers={"Idempotency-Key": key})
        bad = http.post(url, json=body, headers={"Idempotency-Key": "x" * 256})
        spaced = http.post(url, json=body, headers={"Idempotency-Key": "a b"})
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["job_id"] == first.json()["job_id"]
    assert other.status_code == 409
    assert other.json()["kind"] == "batchapi.idempotency_conflict"
    assert bad.status_code == spaced.status_code == 400
    assert bad.json()["kind"] == "batchapi.invalid_idempotency_key"
    # The CLI's client sends the key too.
    with hooks.client() as client:
        replay = client.submit(hooks.api.name, body, idempotency_key=key)
    assert replay["job_id"] == first.json()["job_id"]


def test_concurrent_submits_with_one_key_create_one_job(hooks: HookServer) -> None:
    key = f"race-{uuid.uuid4().hex}"
    tag = uuid.uuid4().hex
    body = {
        "workers": 1,
        "item_list": {"items": list(range(200)), "batch_size": 1},
        "metadata": {"race": tag},
    }

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=hooks.server.url, timeout=60) as http:
            return http.post(f"/{hooks.api.name}", json=body, headers={"Idempotency-Key": key})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert sum(1 for r in responses if "Idempotent-Replayed" not in r.headers) == 1
    with hooks.client() as client:
        assert len(client.list_jobs(hooks.api.name, {"race": tag})) == 1


def test_metadata_is_shown_and_filters_the_listing(hooks: HookServer) -> None:
    tag = uuid.uuid4().hex
    with hooks.client() as client:
        a = _submit(client, hooks.api.name, metadata={"batch": tag, "stage": "train"})
        b = _submit(client, hooks.api.name, metadata={"batch": tag, "stage": "eval"})
        plain = _submit(client, hooks.api.name)
        status = client.get_job(hooks.api.name, a)["job_status"]
        both = client.list_jobs(hooks.api.name, {"batch": tag})
        train = client.list_jobs(hooks.api.name, {"batch": tag, "stage": "train"})
        none = client.list_jobs(hooks.api.name, {"batch": tag, "stage": "nope"})
        everything = client.list_jobs(hooks.api.name)
    assert status["metadata"] == {"batch": tag, "stage": "train"}
    assert {j["job_id"] for j in both} == {a, b}
    assert [j["job_id"] for j in train] == [a]
    assert train[0]["metadata"] == {"batch": tag, "stage": "train"}
    assert none == []
    listed = {j["job_id"]: j["metadata"] for j in everything}
    assert listed[plain] == {}
    with hooks.server.http() as http:
        bad_filter = http.get(f"/{hooks.api.name}", params={"metadata.": "x"})
        assert bad_filter.status_code == 400
        for metadata in (
            {str(i): "v" for i in range(17)},
            {"k": 1},
            {"k": "v" * 513},
            {"": "v"},
            ["k"],
        ):
            body = {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
            response = http.post(f"/{hooks.api.name}", json={**body, "metadata": metadata})
            assert response.status_code == 400, metadata
            assert response.json()["kind"] == "batchapi.invalid_metadata"


def test_an_apis_default_webhook_applies_unless_a_submission_turns_it_off(
    hooks: HookServer, receiver: Receiver, tmp_path: Path
) -> None:
    path = f"/hooks/default-{uuid.uuid4().hex}"
    api = yaml.safe_load((hooks.api.folder / "cortex.yaml").read_text())[0]
    api["name"] = f"defaulted-{uuid.uuid4().hex[:8]}"
    api["webhook"] = {"url": receiver.url + path, "events": ["job.succeeded"]}
    folder = tmp_path / api["name"]
    shutil.copytree(hooks.api.folder, folder)
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    with hooks.client() as client:
        client.deploy(folder / "cortex.yaml")
        hooked = _submit(client, api["name"])
        silent = _submit(client, api["name"], webhook=None)
        wait_for_status(client, api["name"], silent)
        wait_for(lambda: receiver.accepted(path), 20, "the default webhook's delivery")
        assert client.get_job(api["name"], silent)["job_status"]["webhook"] is None
    (delivery,) = receiver.all(path)
    assert json.loads(delivery.body)["job_status"]["job_id"] == hooked


def test_the_cli_submits_with_a_key_and_metadata_and_shows_them(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    submission = tmp_path / "job.json"
    submission.write_text(json.dumps({"workers": 1, "item_list": {"items": [1], "batch_size": 1}}))

    def cortex(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cortex.cli", *args],
            env={**os.environ, "CORTEX_URL": server.url, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )

    key = f"cli-{uuid.uuid4().hex}"
    args = ["submit", api.name, str(submission), "--idempotency-key", key, "-o", "json"]
    first = cortex(*args, "--metadata", "team=vision", "--metadata", "run=7")
    again = cortex(*args, "--metadata", "team=vision", "--metadata", "run=7")
    other = cortex(*args, "--metadata", "team=other")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    job_id = json.loads(first.stdout)["job_id"]
    assert json.loads(again.stdout)["job_id"] == job_id
    assert json.loads(first.stdout)["metadata"] == {"team": "vision", "run": "7"}
    assert other.returncode == 1 and "another request body" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    bad = cortex("submit", api.name, str(submission), "--metadata", "novalue")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    wait_for_status(client, api.name, job_id)
    shown = cortex("get", api.name, job_id)
    assert shown.returncode == 0, shown.stderr
    assert "team: vision" in shown.stdout and "run: 7" in shown.stdout


def test_a_key_whose_job_lost_its_items_creates_a_new_job(hooks: HookServer) -> None:
    """The server died while writing the items of the key's job (before it answered): that
    job failed asking for the request again, so the key is free for the new one."""
    key = f"lost-{uuid.uuid4().hex}"
    body = {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
    url = hooks.env.get("CORTEX_STORE") or f"sqlite:///{hooks.server.data_dir / 'cortex.db'}"
    store = Store(url)
    try:
        lost = store.create_enqueuing_job(
            job_id=f"lost{uuid.uuid4().hex[:12]}",
            api_name=hooks.api.name,
            workers=1,
            config=None,
            timeout_s=None,
            max_attempts=1,
            worker_token="t",
            dataset={"kind": "item_list"},
            replica_id="gone",
            extras=Extras(idempotency_key=key, body_digest=spec.digest(spec.canonical_json(body))),
        )
        assert store.set_status(
            lost.job_id, JobStatus.ENQUEUE_FAILED, error_kind=ENQUEUE_INTERRUPTED
        )
    finally:
        store.close()
    with hooks.server.http() as http:
        fresh = http.post(f"/{hooks.api.name}", json=body, headers={"Idempotency-Key": key})
        again = http.post(f"/{hooks.api.name}", json=body, headers={"Idempotency-Key": key})
    assert fresh.status_code == 200 and "Idempotent-Replayed" not in fresh.headers
    assert fresh.json()["job_id"] != lost.job_id
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["job_id"] == fresh.json()["job_id"]


def test_deleting_an_api_sends_the_stops_of_its_running_jobs(
    hooks: HookServer, receiver: Receiver, tmp_path: Path
) -> None:
    path = f"/hooks/deleted-{uuid.uuid4().hex}"
    with hooks.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        body = {
            "workers": 1,
            "item_list": {"items": [{"sleep": 60}], "batch_size": 1},
            "webhook": {"url": receiver.url + path},
        }
        job_id = client.submit(api.name, body)["job_id"]
        client.delete_api(api.name)
    (stop,) = wait_for(lambda: receiver.accepted(path), 20, "the stop's delivery")
    assert stop.headers["Cortex-Event"] == "job.stopped"
    status = json.loads(stop.body)["job_status"]
    assert status["job_id"] == job_id and status["status"] == "status_stopped"
