"""File datasets end to end: a real server reading local folders and a real S3-compatible
server (moto's, on loopback), real workers recording the items they get."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cortex import datasets, enqueuer, scan
from cortex.client import Client
from cortex.worker import ranges
from helpers import (
    DeployedApi,
    Server,
    deploy_fixture,
    free_port,
    job_worker_processes,
    kill_processes,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)
from refcheck import FILES, assert_same, file_dataset
from s3server import BUCKET, S3


@dataclass
class DataServer:
    server: Server
    root: Path


@pytest.fixture(scope="module")
def data(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataServer]:
    """A server that reads local files under its own data root and S3 through moto."""
    root = tmp_path_factory.mktemp("data-root")
    server = start_server(tmp_path_factory.mktemp("server"), CORTEX_DATA_ROOTS=str(root), **s3.env)
    yield DataServer(server, root)
    stop_server(server)


@pytest.fixture
def dclient(data: DataServer) -> Iterator[Client]:
    with data.server.client() as c:
        yield c


def _recorded(api: DeployedApi, job_id: str) -> list[list[Any]]:
    return [json.loads(f.read_text()) for f in (api.out / job_id).glob("batch-*.json")]


def _put(s3: S3, objects: dict[str, bytes]) -> None:
    client = s3.client()
    for key, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=body)


def _server_lines(client: Client, api: str, job_id: str) -> list[str]:
    return [line for line in client.logs(api, job_id) if " server " in line]


def test_file_path_lister_on_s3(s3: S3, dclient: Client, tmp_path: Path) -> None:
    _put(
        s3,
        {
            "lister/images/a/1.jpg": b"x",
            "lister/images/a/2.png": b"x",
            "lister/images/b/3.jpg": b"x",
            "lister/images/c/": b"",  # a "directory" object: skipped
            "lister/images2/4.jpg": b"",
            "lister/other/5.jpg": b"x",
            "lister/unrelated/6.jpg": b"x",
        },
    )
    api = deploy_fixture(dclient, "recorder", tmp_path)
    base = f"s3://{BUCKET}/lister"
    dataset = {
        # images/a/ lies under images (a string prefix, which also covers images2/): each
        # file is listed once.
        "s3_paths": [f"{base}/images/a/", f"{base}/other/", f"{base}/images"],
        "includes": ["**.jpg"],
        "excludes": [f"{base}/images/b/*"],
        "batch_size": 2,
    }
    expected = [f"{base}/other/5.jpg", f"{base}/images/a/1.jpg", f"{base}/images2/4.jpg"]
    dry = dclient.submit(api.name, {"workers": 1, "file_path_lister": dataset}, dry_run=True)
    assert dry == "\n".join(expected) + "\nvalidations passed\n"

    job = dclient.submit(api.name, {"workers": 2, "file_path_lister": dataset})
    assert job["total_batch_count"] == 0  # answered before enqueuing
    status = wait_for_status(dclient, api.name, job["job_id"])
    assert status["status"] == "status_succeeded", status
    assert status["total_batch_count"] == 2
    batches = sorted(_recorded(api, job["job_id"]), key=len, reverse=True)
    assert batches == [expected[:2], expected[2:]]  # the first batch spans two prefixes


def test_delimited_files_on_s3(s3: S3, dclient: Client, tmp_path: Path) -> None:
    _put(
        s3,
        {
            "lines/part-1.jsonl": '{"n": 1, "t": "héllo wörld ✓"}\n{"n": 2}\n{"n": 3}'.encode(),
            "lines/part-2.jsonl": b"",
            "lines/sub/part-3.jsonl": b'{"n": 4}\r\n\r\n{"n": 5} {"n": 6}\r\n',
            "lines/skip.txt": b"not json",
        },
    )
    api = deploy_fixture(dclient, "recorder", tmp_path)
    body = {
        "workers": 1,
        "delimited_files": {
            "paths": [f"s3://{BUCKET}/lines/"],  # `paths`: the alias of s3_paths
            "includes": ["**.jsonl"],
            "batch_size": 4,
        },
    }
    job_id = dclient.submit(api.name, body)["job_id"]
    status = wait_for_status(dclient, api.name, job_id)
    assert status["status"] == "status_succeeded", status
    assert status["total_batch_count"] == 2
    items = sorted((i for b in _recorded(api, job_id) for i in b), key=lambda i: i["n"])
    assert [i["n"] for i in items] == [1, 2, 3, 4, 5, 6]
    assert items[0]["t"] == "héllo wörld ✓"
    lines = _server_lines(dclient, api.name, job_id)
    assert any(f"enqueuing contents from file s3://{BUCKET}/lines/part-2.jsonl" in x for x in lines)
    assert any("completed enqueuing a total of 2 batches" in x for x in lines)


def test_a_big_local_file_streams_and_workers_start_before_enqueuing_ends(
    data: DataServer, dclient: Client, tmp_path: Path
) -> None:
    # Over one read chunk (so values straddle chunk boundaries), and over one write chunk of
    # batches (CHUNK_BATCHES references: so enqueuing writes at least twice).
    count = 2300
    pad = "é" + "x" * 8000  # about 8 kB a line
    path = data.root / "big.jsonl"
    with open(path, "w") as out:
        for n in range(count):
            out.write(json.dumps({"n": n, "pad": pad}, ensure_ascii=False) + "\n")
    assert path.stat().st_size > datasets.READ_CHUNK_BYTES
    assert count // 2 > enqueuer.CHUNK_BATCHES
    api = deploy_fixture(dclient, "recorder", tmp_path)
    body = {"workers": 2, "delimited_files": {"s3_paths": [str(path)], "batch_size": 2}}
    job_id = dclient.submit(api.name, body)["job_id"]
    status = wait_for_status(dclient, api.name, job_id, timeout_s=90)
    assert status["status"] == "status_succeeded", status
    assert status["total_batch_count"] == count // 2
    items = [i for b in _recorded(api, job_id) for i in b]
    assert sorted(i["n"] for i in items) == list(range(count))
    assert all(i["pad"] == pad for i in items)
    # The first workers were started once the first chunk of batches was durable, before the
    # rest was written: the server's lines about the job say so, in order.
    lines = _server_lines(dclient, api.name, job_id)
    order = [
        next(i for i, line in enumerate(lines) if re.search(pattern, line))
        for pattern in (r"enqueued ", r"started \d+ workers?\b", rf"enqueued {count // 2} batches")
    ]
    assert order == sorted(order) and len(set(order)) == 3, lines


def test_failures_are_precise(s3: S3, data: DataServer, dclient: Client, tmp_path: Path) -> None:
    api = deploy_fixture(dclient, "recorder", tmp_path)

    def refused(dataset: dict[str, Any], kind: str) -> str:
        response = httpx.post(
            f"{data.server.url}/{api.name}", json={"workers": 1, "delimited_files": dataset}
        )
        assert response.status_code == 400, response.text
        assert response.json()["kind"] == kind, response.text
        return str(response.json()["message"])

    def failed(dataset: dict[str, Any]) -> dict[str, Any]:
        job_id = dclient.submit(api.name, {"workers": 1, "delimited_files": dataset})["job_id"]
        status = wait_for_status(dclient, api.name, job_id)
        assert status["status"] == "status_enqueue_failed", status
        return dict(status["error"])

    message = refused(
        {"s3_paths": [f"s3://{BUCKET}/nothing/"], "batch_size": 1}, "batchapi.no_s3_files_found"
    )
    assert message == "no s3 files match search criteria"
    refused({"s3_paths": ["s3://no-such-bucket/x"], "batch_size": 1}, "batchapi.no_s3_files_found")
    refused(
        {"s3_paths": [str(data.root / "absent")], "batch_size": 1}, "batchapi.no_s3_files_found"
    )
    message = refused({"s3_paths": ["/etc/"], "batch_size": 1}, "batchapi.path_not_allowed")
    assert "CORTEX_DATA_ROOTS" in message
    refused({"s3_paths": [f"{data.root}/../x"], "batch_size": 1}, "batchapi.path_not_allowed")
    refused({"s3_paths": ["s3://b/"], "includes": ["{a"], "batch_size": 1}, "batchapi.invalid_glob")

    # A bad object line is read by the worker (the server scans only for line boundaries):
    # its batch fails, naming the file and line; the others run.
    bad = data.root / "bad.jsonl"
    bad.write_text('{"ok": 1}\n{"ok": 2}\n{"ok": \n')
    job_id = dclient.submit(
        api.name, {"workers": 1, "delimited_files": {"s3_paths": [str(bad)], "batch_size": 1}}
    )["job_id"]
    status = wait_for_status(dclient, api.name, job_id)
    assert status["status"] == "status_completed_with_failures", status
    assert (status["batch_metrics"]["succeeded"], status["batch_metrics"]["failed"]) == (2, 1)
    (failure,) = dclient.failed_batches(api.name, job_id)
    assert f"{bad}, line 3: not valid JSON" in failure["error"], failure
    # A line the scan reads itself (not an object or array) still fails the enqueue, as before.
    bad.write_text('{"ok": 1}\n"unterminated\n')
    error = failed({"s3_paths": [str(bad)], "batch_size": 1})
    assert error["kind"] == "batchapi.invalid_item"
    assert f"{bad}, line 2: not valid JSON" in error["message"]

    _put(s3, {"huge/x.jsonl": b'1\n"' + b"x" * 300_000 + b'"\n'})
    error = failed({"s3_paths": [f"s3://{BUCKET}/huge/"], "batch_size": 1})
    assert error["kind"] == "batchapi.item_size_exceeds_limit"
    assert f"s3://{BUCKET}/huge/x.jsonl, line 2:" in error["message"]

    # Storage that cannot be reached: the job fails with the storage's own reason.
    url = f"http://127.0.0.1:{free_port()}/data.jsonl"
    error = failed({"s3_paths": [url], "batch_size": 1})
    assert error["kind"] == "batchapi.storage_error"
    assert f"cannot read {url}" in error["message"] and "Cannot connect" in error["message"]


def test_big_integers_in_json_lines_reach_the_predictor_exactly(
    data: DataServer, dclient: Client, tmp_path: Path
) -> None:
    path = data.root / "big-ints.jsonl"
    # A value alone on its line is stored as its own text; several on one line are re-encoded.
    lines = [str(2**64 + 1), json.dumps({"n": -(2**63) - 1}), f"1 {2**128 + 1}"]
    path.write_text("\n".join(lines) + "\n")
    api = deploy_fixture(dclient, "recorder", tmp_path)
    body = {"workers": 1, "delimited_files": {"s3_paths": [str(path)], "batch_size": 10}}
    job_id = dclient.submit(api.name, body)["job_id"]
    status = wait_for_status(dclient, api.name, job_id)
    assert status["status"] == "status_succeeded", status
    (batch,) = _recorded(api, job_id)
    assert repr(batch) == repr([2**64 + 1, {"n": -(2**63) - 1}, 1, 2**128 + 1])


def test_hostile_globs_are_answered_at_once_and_the_server_stays_responsive(
    data: DataServer, dclient: Client, tmp_path: Path
) -> None:
    """Globs that a backtracking matcher takes seconds (or forever) on, against long paths:
    each answer is a 4xx at once, and the server answers others meanwhile."""
    folder = data.root / "long" / ("a" * 200) / ("a" * 200) / ("a" * 200)
    folder.mkdir(parents=True)
    for n in range(100):
        (folder / (f"{n:03d}" + "a" * 200)).write_text("1\n")
    api = deploy_fixture(dclient, "recorder", tmp_path)
    cases = [
        (["**a" * 9 + "**b"], "batchapi.no_s3_files_found"),  # froze the server for 8 s
        (["{a,{b,{c,{d,*a*a*a*a*a*a*b}}}}"], "batchapi.no_s3_files_found"),
        (["{" * 17 + "a" + "}" * 17], "batchapi.invalid_glob"),
        (["{" * 5000 + "}" * 5000], "batchapi.invalid_glob"),  # answered 500
        (["[" * 3000], "batchapi.invalid_glob"),
        (["*" * 2000], "batchapi.invalid_glob"),
        (["**"] * 101, "batchapi.invalid_glob"),
    ]
    stop = threading.Event()
    health_s: list[float] = []

    def probe() -> None:
        with httpx.Client(base_url=data.server.url, timeout=10) as http:
            while not stop.is_set():
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                health_s.append(time.perf_counter() - started)

    prober = threading.Thread(target=probe)
    prober.start()
    # The prober is answering before the first hostile request (a loaded machine may take a
    # while to start the thread), so "meanwhile" is measured.
    wait_for(lambda: health_s, 30, "the first /healthz answer")
    answers_s = []
    try:
        with httpx.Client(base_url=data.server.url, timeout=30) as http:
            for includes, kind in cases:
                body = {
                    "workers": 1,
                    "file_path_lister": {
                        "s3_paths": [str(data.root / "long") + "/"],
                        "includes": includes,
                        "batch_size": 1,
                    },
                }
                started = time.perf_counter()
                response = http.post(f"/{api.name}", json=body)
                answers_s.append(time.perf_counter() - started)
                assert response.status_code == 400, response.text
                assert response.json()["kind"] == kind, response.text
    finally:
        stop.set()
        prober.join()
    # Generous bounds for a loaded 2-core machine; the answers take a few milliseconds.
    assert max(answers_s) < 2.0, answers_s
    assert max(health_s) < 2.0, health_s


def test_a_restart_while_enqueuing_resumes(tmp_path: Path) -> None:
    """Killed while enqueuing, the server resumes the job where its last durable chunk ended:
    every item ends up in exactly one batch."""
    root = tmp_path / "root"
    root.mkdir()
    count = 2_000_000  # several chunks (one each FLUSH_S): the kill lands between two
    path = root / "many.jsonl"
    path.write_text("".join(f"{n}\n" for n in range(count)))
    port = free_port()
    server = start_server(tmp_path / "server", port, CORTEX_DATA_ROOTS=str(root))
    job_id = ""
    try:
        with server.client() as client:
            api = deploy_fixture(client, "recorder", tmp_path)
            body = {"workers": 1, "delimited_files": {"s3_paths": [str(path)], "batch_size": 5000}}
            job_id = client.submit(api.name, body)["job_id"]

            def partly_enqueued() -> dict[str, Any] | None:
                status = client.get_job(api.name, job_id)["job_status"]
                return status if status["total_batch_count"] > 0 else None

            cut = wait_for(partly_enqueued, 30, "the first batches")
        server.process.kill()  # SIGKILL: no clean shutdown
        server.process.wait()
        killed_at = time.time()
        server = start_server(tmp_path / "server", port, CORTEX_DATA_ROOTS=str(root))
        with server.client() as client:
            status = wait_for_status(client, api.name, job_id, timeout_s=90)
            assert status["status"] == "status_succeeded", status
            assert status["total_batch_count"] == count // 5000
            batches = _recorded(api, job_id)
            assert sorted(i for b in batches for i in b) == list(range(count))
            assert cut["total_batch_count"] > 0
            # Unless the first server finished in the moment between the status read and the
            # kill, the second one resumed where the last durable chunk ended.
            lines = client._request(
                "GET", f"/{api.name}/logs", params={"jobID": job_id, "format": "json"}
            ).text.splitlines()
            events = [json.loads(line) for line in lines]
            finished_first = any(
                "completed enqueuing" in e["message"] and e["ts"] < killed_at for e in events
            )
            if not finished_first:
                assert any("resuming enqueuing after" in e["message"] for e in events), events
    finally:
        stop_server(server)
        if job_id:
            kill_processes(job_worker_processes(job_id))


def test_the_server_can_be_limited_to_some_remote_locations(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "server", CORTEX_DATA_URLS="s3://allowed,https://files")
    try:
        with srv.client() as client:
            api = deploy_fixture(client, "recorder", tmp_path)
        for path in ("s3://allowed-not/x", "s3://other/data/x", "http://169.254.169.254/"):
            body = {"workers": 1, "delimited_files": {"s3_paths": [path], "batch_size": 1}}
            response = httpx.post(f"{srv.url}/{api.name}", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["kind"] == "batchapi.path_not_allowed"
            assert "s3://allowed/, https://files/ (CORTEX_DATA_URLS)" in response.json()["message"]
    finally:
        stop_server(srv)


# -- delimited_files by reference ------------------------------------------------------------


def test_references_on_s3_give_the_copys_payloads_and_see_a_rewrite(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan of objects on S3 (moto's), read back through fsspec as a worker reads them:
    the copy's payloads byte for byte; an object written again fails its batches."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    _put(s3, {f"refs/{name}": body for name, body in FILES.items()})
    urls = [f"s3://{BUCKET}/refs/{name}" for name in sorted(FILES)]
    for url in urls:
        assert_same([url], (), (1, 3, 1000))
    monkeypatch.setattr(datasets, "READ_CHUNK_BYTES", 7)
    assert_same([u for u in urls if "compacts" not in u], (), (2, 5))

    dataset = file_dataset([f"s3://{BUCKET}/refs/crlf.jsonl"], 10)
    ((ref, _, _),) = scan.reference_batches(dataset, ())
    segments = json.loads(ref)["ref"]
    assert segments[0][1]["etag"]  # the object's version: its ETag
    _put(s3, {"refs/crlf.jsonl": FILES["crlf.jsonl"].replace(b"1", b"2")})
    with pytest.raises(ranges.Unreadable, match="changed since it was scanned"):
        ranges.payload(segments, ranges.read_here)


def test_a_rewritten_object_fails_the_batches_not_yet_read(
    s3: S3, dclient: Client, tmp_path: Path
) -> None:
    """Workers read while the job runs: lines rewritten after the scan are not given as the
    scanned ones; the batches read before succeed, the others fail and say why. The workers
    here cannot reach the storage (their .env points S3 elsewhere): the server reads for
    them."""
    lines = [json.dumps({"sleep": 1.5})] + [json.dumps({"n": n}) for n in range(4)]
    _put(s3, {"rewritten/data.jsonl": "\n".join(lines).encode()})
    api = deploy_fixture(dclient, "recorder", tmp_path)
    (api.folder / ".env").write_text(
        f"AWS_ENDPOINT_URL_S3=http://127.0.0.1:{free_port()}\nAWS_MAX_ATTEMPTS=1\n"
    )
    dclient.deploy(api.folder / "cortex.yaml")
    body = {
        "workers": 1,
        "max_attempts": 1,
        "delimited_files": {"s3_paths": [f"s3://{BUCKET}/rewritten/"], "batch_size": 1},
    }
    job_id = dclient.submit(api.name, body)["job_id"]
    wait_for(lambda: (api.out / job_id / "attempts.log").exists(), 30, "the first batch")
    _put(s3, {"rewritten/data.jsonl": "\n".join(lines).replace("1", "7").encode()})
    status = wait_for_status(dclient, api.name, job_id)
    assert status["status"] == "status_completed_with_failures", status
    assert (status["batch_metrics"]["succeeded"], status["batch_metrics"]["failed"]) == (1, 4)
    failures = dclient.failed_batches(api.name, job_id)
    assert all("changed since it was scanned" in f["error"] for f in failures), failures
    assert _recorded(api, job_id) == [[{"sleep": 1.5}]]
    logs = "\n".join(dclient.logs(api.name, job_id))
    assert logs.count("reading batches through the server from now on") == 1, logs
