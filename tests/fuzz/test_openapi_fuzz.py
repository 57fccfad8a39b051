"""Property-based fuzzing of every public endpoint from the server's OpenAPI document.

Schemathesis generates requests for each operation in `/openapi.json`: the schema's examples,
boundary and type-breaking values (its coverage phase), then Hypothesis-drawn valid and invalid
requests. Whatever arrives, the server must answer below 500, and every 4xx must be exactly
`{"kind": str, "message": str}`.

Random names would only ever reach "not deployed", so the path parameters are widened to also
draw a real API (the recorder fixture, deployed) and a real finished job with a failed batch:
submissions, status reads, stops and retries then reach the code behind them.
`DELETE /delete/{api_name}` draws a second API instead, which the test deploys again after each
deletion, so the first one stays deployed for every operation.

The generator never builds some hostile inputs (nesting a thousand levels deep, lone surrogates,
integers past 64 bits); `test_hostile_bodies_are_refused` sends those by hand.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from cortex import project
from cortex.api.app import create_app
from cortex.client import Client
from cortex.settings import Settings
from helpers import (
    FIXTURES,
    Server,
    deploy_fixture,
    free_port,
    start_server,
    stop_server,
    wait_for_status,
)

API = "fuzz-target"  # deployed for the whole run
VICTIM = "fuzz-victim"  # what DELETE /delete/{api_name} may delete; deployed again after
JOB = "fuzz-job"  # stands for the real job's id, known only once the server runs
DELETE_API = "/delete/{api_name}"


@dataclass
class Target:
    server: Server
    client: Client
    folder: Path
    job_id: str
    # (operation label, "real" or "random" api name, status code) -> number of cases
    seen: collections.Counter[tuple[str, str, int]] = field(default_factory=collections.Counter)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    # One worker at most per job: valid submissions and retries each start one process. File
    # datasets stay on this machine: local paths under an empty folder, and S3 at a loopback
    # port where nothing listens (refused at once, not a network timeout).
    server = start_server(
        tmp_path_factory.mktemp("fuzz-server"),
        CORTEX_MAX_WORKERS="1",
        CORTEX_DATA_ROOTS=str(tmp_path_factory.mktemp("fuzz-data")),
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AWS_ACCESS_KEY_ID="fuzz",
        AWS_SECRET_ACCESS_KEY="fuzz",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_MAX_ATTEMPTS="1",
        # Webhooks are accepted (signed), but only to a loopback port where nothing listens.
        CORTEX_WEBHOOK_SECRET="fuzz",
        CORTEX_WEBHOOK_URLS=f"http://127.0.0.1:{free_port()}/",
    )
    folder = tmp_path_factory.mktemp("fuzz-apis")
    try:
        with server.client() as client:
            deploy_fixture(client, "recorder", folder, name=API)
            deploy_fixture(client, "recorder", folder, name=VICTIM)
            # A finished job with a failed batch, so failed_batches and retry_failed have data.
            submission = {"workers": 1, "item_list": {"items": ["fail"], "batch_size": 1}}
            job = client.submit(API, {**submission, "max_attempts": 1})
            wait_for_status(client, API, job["job_id"])
            yield Target(server, client, folder, job["job_id"])
    finally:
        stop_server(server)


def _pin(param: dict[str, Any], value: str) -> None:
    """Let a path parameter draw `value` as well as any string, and show it as the example."""
    param["schema"] = {"anyOf": [{"enum": [value]}, param["schema"]]}
    param["example"] = value


def _fuzzed_document() -> dict[str, Any]:
    """The server's OpenAPI document with the real names pinned in.

    Schemathesis must see the schema when it collects tests, before any server runs, so it is
    built from the app in-process; `test_the_fuzzed_document_is_what_the_server_serves` proves
    it is the document the live server answers on /openapi.json. (Loading it from a fixture,
    `schemathesis.pytest.from_fixture`, fails on pytest 9.2: it uses the removed `Node._nodeid`.)
    """
    document = create_app(Settings()).openapi()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param["in"] == "path" and param["name"] == "api_name":
                    _pin(param, VICTIM if path == DELETE_API else API)
                elif param["in"] == "path" and param["name"] == "job_id":
                    _pin(param, JOB)
    return document


def assert_error_contract(status: int, content: bytes) -> None:
    """Below 500; and a 4xx is exactly {"kind": str, "message": str}."""
    assert status < 500, f"server error {status}: {content[:500]!r}"
    if status < 400:
        return
    try:
        body = json.loads(content)
    except ValueError:
        raise AssertionError(f"{status} body is not JSON: {content[:500]!r}") from None
    assert isinstance(body, dict) and set(body) == {"kind", "message"}, (
        f"{status} body is not exactly {{kind, message}}: {body!r}"
    )
    assert isinstance(body["kind"], str) and body["kind"], f"kind is not a string: {body!r}"
    assert isinstance(body["message"], str), f"message is not a string: {body!r}"


def status_below_500(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    assert response.status_code < 500, f"server error {response.status_code}: {response.text}"


def error_body_is_kind_and_message(
    ctx: Any, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    assert_error_contract(response.status_code, response.content)


# An explicit config: a schemathesis.toml lying around must not change what runs.
schema = schemathesis.openapi.from_dict(_fuzzed_document(), config=schemathesis.Config())


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,  # the same cases on every run, locally and in CI
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_public_api_never_answers_5xx(case: schemathesis.Case, target: Target) -> None:
    if (case.path_parameters or {}).get("job_id") == JOB:
        case.path_parameters["job_id"] = target.job_id
    response = case.call_and_validate(
        base_url=target.server.url,
        checks=[status_below_500, error_body_is_kind_and_message],
        timeout=30,
    )
    api_name = (case.path_parameters or {}).get("api_name")
    real = "real" if api_name in (API, VICTIM) else "random"
    target.seen[(case.operation.label, real, response.status_code)] += 1
    if case.operation.path == DELETE_API and response.status_code == 200:
        deploy_fixture(target.client, "recorder", target.folder, name=VICTIM)


def test_the_fuzzed_document_is_what_the_server_serves(target: Target) -> None:
    served = httpx.get(f"{target.server.url}/openapi.json", timeout=10).json()
    assert served == create_app(Settings()).openapi()


def test_fuzzing_reached_every_operation_and_the_real_api(target: Target) -> None:
    """The fuzz run is only worth something if it reached every operation, each operation on a
    path with an API name with the real API, and submitted to it both accepted and refused."""
    if not target.seen:
        pytest.skip("the fuzz test did not run in this session")
    print(f"\n{sum(target.seen.values())} generated cases")
    for (label, real, status), count in sorted(target.seen.items()):
        print(f"  {label:<45} {real:<6} {status}: {count}")
    operations = {
        f"{method.upper()} {path}"
        for path, methods in create_app(Settings()).openapi()["paths"].items()
        for method in methods
    }
    assert {label for label, _, _ in target.seen} == operations
    for label in operations:
        if "{api_name}" in label:
            assert any(lbl == label and real == "real" for lbl, real, _ in target.seen), (
                f"{label} never drew the deployed API"
            )
    submits = {s for lbl, real, s in target.seen if lbl == "POST /{api_name}" and real == "real"}
    assert any(s < 300 for s in submits), "no submission to the real API was accepted"
    assert any(s >= 400 for s in submits), "no submission to the real API was refused"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _submission(**extra: Any) -> dict[str, Any]:
    return {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, **extra}


_SURROGATE = '"\\ud800"'  # a JSON escape Python decodes into a str that UTF-8 cannot encode
_OK_SPEC = '{"name": "fuzz-hostile", "kind": "BatchAPI", "predictor": {"type": "python", '
_OK_SPEC += '"path": "predictor.py", "config": %s}}'

HOSTILE: list[tuple[str, str, dict[str, Any], str]] = [
    # (case id, path, httpx.post arguments, expected kind)
    ("deep-body", f"/{API}", {"content": _deep(100_000)}, "request.invalid"),
    (
        "deep-items",
        f"/{API}?dryRun=true",
        {"content": json.dumps(_submission()).replace("[1]", f"[{_deep(990)}]")},
        "batchapi.invalid_item",
    ),
    (
        "deep-config",
        f"/{API}",
        {"content": json.dumps(_submission(config={"a": "X"})).replace('"X"', _deep(300))},
        "request.invalid",
    ),
    (
        "surrogate-config",
        f"/{API}",
        {"content": json.dumps(_submission(config={"a": "X"})).replace('"X"', _SURROGATE)},
        "request.invalid",
    ),
    # Read exactly (not as a float, as orjson did): refused with its bound.
    ("huge-timeout", f"/{API}", {"json": _submission(timeout=10**30)}, "batchapi.invalid_timeout"),
    (
        "huge-max-attempts",
        f"/{API}",
        {"json": _submission(max_attempts=2**63)},
        "batchapi.invalid_max_attempts",
    ),
    (
        "surrogate-metadata",
        f"/{API}",
        {"content": json.dumps(_submission(metadata={"a": "X"})).replace('"X"', _SURROGATE)},
        "request.invalid",
    ),
    (
        "nul-metadata",
        f"/{API}",
        {"json": _submission(metadata={"a\0": "b"})},
        "batchapi.invalid_metadata",
    ),
    (
        "nul-webhook",
        f"/{API}",
        {"json": _submission(webhook={"url": "http://127.0.0.1/\0"})},
        "batchapi.invalid_webhook",
    ),
    (
        "deep-webhook",
        f"/{API}",
        {"content": json.dumps(_submission(webhook="X")).replace('"X"', _deep(300))},
        "request.invalid",
    ),
    (
        "long-idempotency-key",
        f"/{API}",
        {"json": _submission(), "headers": {"Idempotency-Key": "k" * 10_000}},
        "batchapi.invalid_idempotency_key",
    ),
    ("deploy-deep-spec", "/deploy", {"data": {"spec": _deep(100_000)}}, "request.invalid"),
    ("deploy-deep-config", "/deploy", {"data": {"spec": _OK_SPEC % _deep(300)}}, "spec.invalid"),
    ("deploy-surrogate", "/deploy", {"data": {"spec": _OK_SPEC % _SURROGATE}}, "spec.invalid"),
]


@pytest.mark.parametrize(
    ("path", "post", "kind"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile_bodies_are_refused(
    target: Target, path: str, post: dict[str, Any], kind: str
) -> None:
    """Input the generator does not build: refused with a 4xx, and nothing stored that would
    break a later read (each of these once answered 500, or stored a job or API that did)."""
    if path == "/deploy":
        archive = project.build_archive(FIXTURES / "recorder")
        post = {**post, "files": {"project": ("project.tar.gz", archive)}}
    with target.server.http() as http:
        response = http.post(path, **post)
        assert_error_contract(response.status_code, response.content)
        assert response.status_code == 400, response.text
        assert response.json()["kind"] == kind, response.text
        for read in ("/get", f"/get/{API}", f"/{API}"):
            answer = http.get(read)
            assert answer.status_code == 200, f"GET {read}: {answer.text}"


@pytest.mark.parametrize(
    "query",
    [
        "metadata.a=%00",
        "metadata.%00=a",
        "metadata.a=%ED%A0%80",
        "metadata.=a",
        "metadata.a=1&metadata.a=2",
        "metadata." + "k" * 5000 + "=v",
        "metadata.k=" + "v" * 5000,
    ],
)
def test_hostile_listing_filters_are_refused(target: Target, query: str) -> None:
    """Metadata filters the generator cannot draw (their names are not in the document):
    refused with a 400, or matching nothing, never a 500."""
    with target.server.http() as http:
        response = http.get(f"/{API}?{query}")
    assert_error_contract(response.status_code, response.content)
    if response.status_code == 200:
        assert response.json()["job_statuses"] == []
