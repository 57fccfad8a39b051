"""The Python client against a real server: docs/client.md run as written, its records
against the server's OpenAPI document, and every record against the JSON the server really
sends (a field the server adds without declaring it fails here)."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

from cortex import errors, schemas
from cortex.client import Client
from helpers import Server, start_server, stop_server, wait_for_status

DOCS = Path(__file__).parents[2] / "docs" / "client.md"
RECORDS = [
    cls
    for _, cls in inspect.getmembers(schemas, inspect.isclass)
    if issubclass(cls, schemas.Record) and cls is not schemas.Record
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("client-server"))
    yield server
    stop_server(server)


def test_the_client_docs_run_as_written(server: Server, tmp_path: Path) -> None:
    """Every file the page shows is written, then its Python blocks run in order, as one
    script, in a process of their own."""
    text = DOCS.read_text()
    script: list[str] = []
    blocks = re.finditer(
        r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", text, re.S
    )
    for block in blocks:
        if block["file"]:
            target = tmp_path / block["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block["body"])
        elif block["lang"] == "python":
            script.append(block["body"])
    assert len(script) >= 6
    env = {**os.environ, "CORTEX_URL": server.url}
    env.pop("CORTEX_AUTH_TOKEN", None)
    done = subprocess.run(
        [sys.executable, "-c", "\n".join(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "created squares (BatchAPI)" in out
    assert "status_completed_with_failures" in out
    assert "[-1] ValueError: -1 is negative" in out
    assert "batchapi.job_not_found unable to find batch job 0000000000000000" in out
    assert "is still status_" in out
    assert "cannot reach the cortex server at http://127.0.0.1:9" in out
    assert "deleting squares" in out


def _type(schema: dict[str, Any]) -> Any:
    """A property's type, whichever document it comes from: a referenced record by name."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return sorted((_type(option) for option in schema["anyOf"]), key=str)
    if schema.get("type") == "array":
        return ["array", _type(schema.get("items", {}))]
    return schema.get("type", "any")


def _shape(schema: dict[str, Any]) -> dict[str, Any]:
    return {name: _type(prop) for name, prop in schema.get("properties", {}).items()}


def test_records_match_the_openapi_document(server: Server) -> None:
    """Each record of the client is a component of the server's OpenAPI document, with the
    same field names and types: a route that stops declaring a record, or a record that
    drifts from what the server documents, fails here."""
    components = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    for record in RECORDS:
        assert record.__name__ in components, f"{record.__name__} is not in /openapi.json"
        ours = record.model_json_schema(mode="serialization")
        assert _shape(components[record.__name__]) == _shape(ours), record.__name__
        assert set(components[record.__name__].get("required", [])) == set(
            ours.get("required", [])
        ), record.__name__


def _undeclared(record: pydantic.BaseModel, where: str) -> list[str]:
    """Fields the server sent that the record does not declare, in it and in its parts."""
    found = [f"{where}.{key}" for key in record.model_extra or {}]
    for name in type(record).model_fields:
        value = getattr(record, name)
        for i, part in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(part, pydantic.BaseModel):
                found += _undeclared(part, f"{where}.{name}[{i}]")
    return found


PREDICTOR = """
class PythonPredictor:
    def __init__(self, config):
        pass

    def predict(self, payload):
        if payload == ["fail"]:
            raise ValueError("asked to fail")
"""


def test_every_answer_is_a_declared_record(server: Server, tmp_path: Path) -> None:
    """The JSON of every route the client reads, from a real job with a failed batch,
    parses into its record with no undeclared field, and back to the same JSON."""
    (tmp_path / "predictor.py").write_text(PREDICTOR)
    (tmp_path / "cortex.yaml").write_text(
        "- name: declared\n  kind: BatchAPI\n  predictor: {type: python, path: predictor.py}\n"
    )
    with Client(server.url) as client:
        client.deploy(tmp_path)
        job = client.submit(
            "declared",
            {
                "workers": 1,
                "max_attempts": 1,
                "item_list": {"items": ["ok", "fail"], "batch_size": 1},
            },
        )
        wait_for_status(client, "declared", job.job_id)
        retry = client.retry_failed("declared", job.job_id)
        answers: list[tuple[type[schemas.Record], str, str]] = [
            (schemas.JobDetails, "GET", f"/declared?jobID={job.job_id}"),
            (schemas.JobDetails, "GET", f"/declared/{retry.job_id}"),
            (schemas.JobList, "GET", "/declared"),
            (schemas.ApiList, "GET", "/get"),
            (schemas.ApiDetails, "GET", "/get/declared"),
            (schemas.EnvironmentLog, "GET", "/get/declared/environment"),
            (schemas.FailedBatches, "GET", f"/declared/{job.job_id}/failed_batches"),
            (schemas.JobWorkers, "GET", f"/declared/{job.job_id}/workers"),
        ]
        raw = {path: client._json(method, path) for _, method, path in answers}
        raw["submit"] = client._json(
            "POST", "/declared", json={"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
        )
        answers.append((schemas.JobSpec, "POST", "submit"))
        wait_for_status(client, "declared", raw["submit"]["job_id"])
        raw["deploy"] = client._json(
            "POST",
            "/deploy",
            data={
                "spec": '{"name": "declared", "kind": "BatchAPI", "predictor": '
                '{"type": "python", "path": "predictor.py"}}'
            },
            files={"project": ("p.tar.gz", _archive(tmp_path), "application/gzip")},
        )
        answers.append((schemas.DeployResult, "POST", "deploy"))
        raw["delete"] = client._json("DELETE", "/delete/declared")
        answers.append((schemas.Message, "DELETE", "delete"))
    for record, _, path in answers:
        parsed = record.model_validate(raw[path])
        assert _undeclared(parsed, record.__name__) == [], path
        # The same JSON, keys in the same order: `cortex ... -o json` prints what was sent.
        assert json.dumps(parsed.to_json()) == json.dumps(raw[path]), path
        assert parsed == raw[path]


def _archive(folder: Path) -> bytes:
    from cortex import project

    return project.build_archive(folder, folder / "cortex.yaml")


def test_error_answers_raise_their_family(server: Server) -> None:
    with Client(server.url) as client:
        with pytest.raises(errors.NotFound) as missing:
            client.get_job("nothing-here", "0")
        assert missing.value.kind == "resources.api_not_deployed"
        assert missing.value.status_code == 400
        with pytest.raises(errors.NotFound) as route:
            client._json("GET", "/no/such/route/at/all")
        assert route.value.status_code == 404
