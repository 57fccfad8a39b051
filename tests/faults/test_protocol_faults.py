"""The worker protocol and the workers' lifecycle under faults, with real processes on both
stores: a proxy between the workers and the server that loses, in turn, each kind of request
and each kind of answer; a server killed while it holds an answer; a store that fails while
exits are recorded; workers adopted after a restart that finish normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cortex.client import Client
from cortex.jobs import WorkerState
from cortex.launchers.local import worker_environ
from cortex.store import Store, WorkerRecord, schema
from faultproxy import Fault, FaultProxy
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    free_port,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)
from postgres import Databases

ITEMS = 9  # and one more that fails on each of its 2 attempts
# Heartbeats often enough that a job of a second sends several.
ENV = {"CORTEX_HEARTBEAT_S": "0.2"}


@dataclasses.dataclass
class Stack:
    """A server on one store, with the proxy its workers go through."""

    server: Server
    proxy: FaultProxy
    store_url: str
    engine: str

    def store(self) -> Store:
        return Store(self.store_url)

    def workers(self, job_id: str) -> list[WorkerRecord]:
        store = self.store()
        try:
            return store.list_workers(job_id)
        finally:
            store.close()


def _store_env(engine: str, request: pytest.FixtureRequest, data_dir: Path) -> dict[str, str]:
    if engine == "sqlite":
        return {}
    databases: Databases = request.getfixturevalue("pg_databases")
    store = Store(databases.create())
    schema.upgrade(store)
    store.close()
    return {"CORTEX_STORE": store.url}


def _stack(engine: str, request: pytest.FixtureRequest, data_dir: Path) -> Stack:
    env = _store_env(engine, request, data_dir)
    port = free_port()
    proxy = FaultProxy(port).start()
    server = start_server(data_dir, port=port, CORTEX_PUBLIC_URL=proxy.url, **ENV, **env)
    url = env.get("CORTEX_STORE") or f"sqlite:///{data_dir / 'cortex.db'}"
    return Stack(server, proxy, url, engine)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One server per store for the module's jobs, one at a time, with its proxy."""
    made = _stack(request.param, request, tmp_path_factory.mktemp("proxied"))
    yield made
    made.proxy.close()  # first: it waits for a restart in progress
    stop_server(made.server)


@pytest.fixture
def own_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """A stack this test may kill; on the store the test names by its `engine` parameter."""
    made = _stack(request.param, request, tmp_path / "server")
    yield made
    made.proxy.close()  # first: it waits for a restart in progress
    stop_server(made.server)


@pytest.fixture(scope="module")
def recorder(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> DeployedApi:
    with stack.server.client() as client:
        return deploy_fixture(client, "recorder", tmp_path_factory.mktemp("recorder"))


def _submit(client: Client, api: str, **extra: Any) -> str:
    items: list[Any] = [{"sleep": 0.15, "n": i} for i in range(ITEMS)] + ["fail"]
    body = {"workers": 2, "max_attempts": 2, "item_list": {"items": items, "batch_size": 1}}
    return str(client.submit(api, {**body, **extra})["job_id"])


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _check_exact(stack: Stack, api: DeployedApi, job_id: str, *, attempts_exact: bool) -> None:
    """The job ended with exact counts and one hook run, and its workers are gone."""
    with stack.server.client() as client:
        status = wait_for_status(client, api.name, job_id, 60)
        assert status["status"] == "status_completed_with_failures", status
        assert status["batch_metrics"]["succeeded"] == ITEMS
        assert status["batch_metrics"]["failed"] == 1
        assert status["batch_counts"] == {
            "queued": 0,
            "leased": 0,
            "succeeded": ITEMS,
            "failed": 1,
        }
        wait_for(lambda: not stack.server.worker_processes(job_id), 30, "the workers to exit")
        # Every line once: a log shipment whose answer was lost is not stored twice.
        text = "\n".join(client.logs(api.name, job_id, follow=True))
    if attempts_exact:
        assert text.count("] done ") == ITEMS, text
    out = api.out / job_id
    assert _lines(out / "hook.log") != [] and len(_lines(out / "hook.log")) == 1
    attempts = _lines(out / "attempts.log")
    assert len(set(attempts)) == ITEMS + 1
    if attempts_exact:  # each batch predicted once, the failing one once per attempt
        assert len(attempts) == ITEMS + 2, attempts


KINDS = [
    ("state", "request"),
    ("state", "answer"),
    ("spec", "request"),
    ("spec", "answer"),
    ("heartbeat", "request"),
    ("heartbeat", "answer"),
    ("lease", "request"),
    ("lease", "answer"),
    ("results", "request"),
    ("results", "answer"),
    ("hook-claim", "answer"),
    ("hook", "request"),
    ("hook", "answer"),
    ("logs", "request"),
    ("logs", "answer"),
]


@pytest.mark.parametrize(("kind", "where"), KINDS, ids=[f"{k}-{w}" for k, w in KINDS])
def test_a_lost_request_or_answer_leaves_exact_counts_and_one_hook(
    stack: Stack, recorder: DeployedApi, kind: str, where: str
) -> None:
    fault = Fault(kind, where, times=2)
    stack.proxy.fault = fault
    try:
        with stack.server.client() as client:
            job_id = _submit(client, recorder.name)
        _check_exact(stack, recorder, job_id, attempts_exact=True)
    finally:
        stack.proxy.fault = None
    assert fault.struck == 2, "the fault never struck: the test tested nothing"
    # No worker was taken for dead, none replaced: each ended cleanly.
    workers = stack.workers(job_id)
    assert [(w.state, w.exit_code) for w in workers] == [(WorkerState.SUCCEEDED, 0)] * 2


def test_a_refused_request_is_a_failure_not_a_finish(stack: Stack, recorder: DeployedApi) -> None:
    """A 4xx that does not say the job is gone (here a proxy's 400 in place of the answer to a
    report of results) makes the worker fail, not exit as if its work were done: it is
    replaced, and its batches are run again."""
    refusal = (400, {"kind": "request.invalid", "message": "refused by the test's proxy"})
    stack.proxy.fault = Fault("results", "request", times=1, action=refusal)
    try:
        with stack.server.client() as client:
            job_id = _submit(client, recorder.name)
        _check_exact(stack, recorder, job_id, attempts_exact=False)
    finally:
        stack.proxy.fault = None
    states = sorted((w.state.value, w.exit_code) for w in stack.workers(job_id))
    assert states == [("failed", 2), ("succeeded", 0), ("succeeded", 0)], states
    with stack.server.client() as client:
        text = "\n".join(client.logs(recorder.name, job_id))
    assert "the server refused a request of this worker: 400 request.invalid" in text
    assert "starting a replacement" in text


def test_a_job_not_found_answer_stops_a_worker_quietly(stack: Stack, recorder: DeployedApi) -> None:
    """404 `batchapi.job_not_found` (what the server answers for a job deleted meanwhile) is
    one of the answers that mean the job is gone: the worker stops and exits 0. Here the proxy
    says it in place of one worker's first lease, so its sibling and the worker the scheduler
    places in its stead (the job still has batches for two) do the work."""
    gone = (404, {"kind": "batchapi.job_not_found", "message": "said by the test's proxy"})
    stack.proxy.fault = Fault("lease", "request", times=1, action=gone)
    try:
        with stack.server.client() as client:
            job_id = _submit(client, recorder.name)
        _check_exact(stack, recorder, job_id, attempts_exact=True)
    finally:
        stack.proxy.fault = None
    workers = [(w.state, w.exit_code) for w in stack.workers(job_id)]
    assert len(workers) in (2, 3) and set(workers) == {(WorkerState.SUCCEEDED, 0)}
    with stack.server.client() as client:
        text = "\n".join(client.logs(recorder.name, job_id))
    assert "the server ended this worker's job: 404 batchapi.job_not_found" in text


def _restart(stack: Stack) -> None:
    """SIGKILL the server and start it again on the same port and store."""
    stack.server.process.send_signal(signal.SIGKILL)
    stack.server.process.wait()
    port = int(stack.server.url.rsplit(":", 1)[1])
    env = {} if stack.engine == "sqlite" else {"CORTEX_STORE": stack.store_url}
    restarted = start_server(
        stack.server.data_dir, port=port, CORTEX_PUBLIC_URL=stack.proxy.url, **ENV, **env
    )
    stack.server.process = restarted.process


@pytest.mark.parametrize("own_stack", ["sqlite", "postgresql"], indirect=True)
def test_a_hook_claim_whose_server_died_before_answering_is_told_by_the_next_one(
    own_stack: Stack, tmp_path: Path
) -> None:
    """The server commits the hook claim and dies before its answer leaves (the proxy holds
    it, the server is SIGKILLed and started again, the answer is lost): the worker asks
    again, and the new server tells it to run the hook, once."""
    restarted = threading.Event()

    def restart() -> None:
        _restart(own_stack)
        restarted.set()

    with own_stack.server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        fault = Fault("hook-claim", "answer", times=1, before=restart)
        own_stack.proxy.fault = fault
        job_id = _submit(client, api.name)
    wait_for(restarted.is_set, 60, "the server to be killed and started again")
    _check_exact(own_stack, api, job_id, attempts_exact=True)
    assert fault.struck == 1
    # The workers were adopted by the new server and ended cleanly: none was replaced.
    workers = own_stack.workers(job_id)
    assert [w.state for w in workers] == [WorkerState.SUCCEEDED] * 2


@pytest.mark.parametrize("own_stack", ["sqlite", "postgresql"], indirect=True)
def test_adopted_workers_that_finish_are_not_taken_for_crashes(
    own_stack: Stack, tmp_path: Path
) -> None:
    """After a restart, a worker's exit code cannot be known (it is not the new server's
    child). One that was told its work was over ended cleanly: while the hook runs on its
    sibling, its exit starts no replacement and does not spend the job's budget."""
    with own_stack.server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path, config={"hook_sleep_s": 2})
        job_id = _submit(client, api.name)
        out = api.out / job_id
        wait_for(lambda: len(_lines(out / "attempts.log")) >= 2, 20, "batches to start")
    _restart(own_stack)
    with own_stack.server.client() as client:
        wait_for(lambda: _lines(out / "hook.log"), 30, "the hook to start")
        running = client.get_job(api.name, job_id)["job_status"]
        # One worker has exited while the hook runs on the other.
        wait_for(lambda: len(own_stack.server.worker_processes(job_id)) <= 1, 10, "an exit")
        assert running["status"] == "status_running"
    _check_exact(own_stack, api, job_id, attempts_exact=True)
    workers = own_stack.workers(job_id)
    assert [w.state for w in workers] == [WorkerState.SUCCEEDED] * 2, workers


def _fail_worker_ends(stack: Stack, on: bool) -> None:
    """Make the store refuse (or accept again) every write that ends a worker: a store error
    while exits are recorded."""
    ended = "('succeeded', 'failed', 'unknown')"
    if stack.engine == "sqlite":
        db = stack.store_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn, conn:
            if on:
                conn.execute(
                    "CREATE TRIGGER test_fail_ends BEFORE UPDATE OF state ON workers "
                    f"WHEN NEW.state IN {ended} AND NEW.state != OLD.state "
                    "BEGIN SELECT RAISE(ABORT, 'injected store error'); END"
                )
            else:
                conn.execute("DROP TRIGGER test_fail_ends")
        return
    engine = sa.create_engine(stack.store_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        if on:
            conn.execute(
                sa.text(
                    "CREATE FUNCTION test_fail_ends() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'injected store error'; END $$"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER test_fail_ends BEFORE UPDATE ON workers FOR EACH ROW "
                    f"WHEN (NEW.state IN {ended} AND NEW.state <> OLD.state) "
                    "EXECUTE FUNCTION test_fail_ends()"
                )
            )
        else:
            conn.execute(sa.text("DROP TRIGGER test_fail_ends ON workers"))
            conn.execute(sa.text("DROP FUNCTION test_fail_ends()"))
    engine.dispose()


@pytest.mark.parametrize("own_stack", ["sqlite", "postgresql"], indirect=True)
def test_an_exit_is_not_lost_when_the_store_fails_while_it_is_recorded(
    own_stack: Stack, tmp_path: Path
) -> None:
    with own_stack.server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = _submit(client, api.name)
        out = api.out / job_id
        wait_for(lambda: len(_lines(out / "attempts.log")) >= 2, 20, "batches to start")
        victim = own_stack.server.worker_processes(job_id)[0]
        victim_id = worker_environ(victim)["CORTEX_WORKER_ID"]
        _fail_worker_ends(own_stack, on=True)
        try:
            os.killpg(victim.pid, signal.SIGKILL)
            wait_for(
                lambda: (
                    f"cannot record the exit of worker {victim_id} yet" in own_stack.server.log()
                ),
                20,
                "the store to refuse the exit",
            )
            [row] = [w for w in own_stack.workers(job_id) if w.worker_id == victim_id]
            assert row.state.alive
        finally:
            _fail_worker_ends(own_stack, on=False)
    # The exit was kept and recorded once the store took it: the worker is failed, its batch
    # given back and run again, and a replacement was started.
    _check_exact(own_stack, api, job_id, attempts_exact=False)
    workers = {w.worker_id: w for w in own_stack.workers(job_id)}
    assert (workers[victim_id].state, workers[victim_id].exit_code) == (
        WorkerState.FAILED,
        -signal.SIGKILL,
    )
    assert len(workers) == 3
    assert all(w.state is WorkerState.SUCCEEDED for k, w in workers.items() if k != victim_id)


def test_the_proxy_forwards_what_it_does_not_strike(stack: Stack, recorder: DeployedApi) -> None:
    """The proxy itself: without a fault, a job goes through it as through the server."""
    stack.proxy.seen.clear()
    with stack.server.client() as client:
        job_id = _submit(client, recorder.name)
    _check_exact(stack, recorder, job_id, attempts_exact=True)
    ops = {op for op, status in stack.proxy.seen if status == 200}
    assert {"state", "spec", "lease", "hook", "logs", "heartbeat"} <= ops
    assert json.dumps(sorted(ops))  # every answer was passed on with its status
