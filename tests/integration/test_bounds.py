"""Disk and memory stay bounded whatever a client or a predictor does: deploy archives capped
on what they unpack to, unpacked projects removed once nothing uses them, request bodies refused
before they are read, a log flood kept within its budget."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import socket
import sqlite3
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import FIXTURES, Server, deploy_fixture, start_server, stop_server, wait_for


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Server]:
    """A server with a 64 MiB cap on unpacked projects that prunes every half second."""
    srv = start_server(
        tmp_path / "server", CORTEX_MAX_PROJECT_BYTES=str(64 << 20), CORTEX_PRUNE_S="0.5"
    )
    yield srv
    stop_server(srv)


def _bomb(unpacked_bytes: int) -> bytes:
    """A deploy archive: the recorder's predictor and one file of zeros, streamed through
    gzip so that the test never holds the zeros either."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|") as tar,
    ):
        tar.add(FIXTURES / "recorder" / "predictor.py", arcname="predictor.py")
        info = tarfile.TarInfo("weights.bin")
        info.size = unpacked_bytes
        zeros = io.BytesIO(bytes(64 << 20))
        left = unpacked_bytes

        class Zeros(io.RawIOBase):
            def readinto(self, view: Any) -> int:
                nonlocal left
                count = min(len(view), left, 64 << 20)
                zeros.seek(0)
                view[:count] = zeros.read(count)
                left -= count
                return count

        tar.addfile(info, Zeros())
    return buffer.getvalue()


def _deploy_raw(server: Server, name: str, archive: bytes) -> Any:
    spec = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {"type": "python", "path": "predictor.py"},
    }
    with server.http() as http:
        return http.post(
            "/deploy",
            data={"spec": json.dumps(spec)},
            files={"project": ("project.tar.gz", archive, "application/gzip")},
        )


def _unpacked(server: Server) -> set[str]:
    root = server.data_dir / "projects"
    return (
        {p.name for p in root.iterdir() if not p.name.startswith(".")} if root.is_dir() else set()
    )


def test_an_archive_of_2_mb_that_unpacks_to_2_gb_is_refused_and_leaves_nothing(
    small: Server,
) -> None:
    archive = _bomb(2 << 30)
    assert len(archive) < 3 << 20  # about 2 MB
    refused = _deploy_raw(small, "bomb", archive)
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["kind"] == "spec.invalid"
    assert "unpacks to more than 67108864 bytes" in body["message"]
    assert _unpacked(small) == set()
    # Under the cap, the same kind of archive deploys.
    assert _deploy_raw(small, "fits", _bomb(1 << 20)).status_code == 200
    assert len(_unpacked(small)) == 1


def test_unpacked_projects_go_when_nothing_uses_them(small: Server, tmp_path: Path) -> None:
    with small.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        first = _unpacked(small)
        assert len(first) == 1
        # A second version serves: the first one's folder goes at the next prune.
        (api.folder / "predictor.py").write_text(
            (api.folder / "predictor.py").read_text() + "\n# v2\n"
        )
        client.deploy(api.folder / "cortex.yaml")
        second = wait_for(
            lambda: _unpacked(small) if len(_unpacked(small)) == 1 else None,
            10,
            "the replaced version's folder to go",
        )
        assert second != first
        # Deleting the API frees its code at once.
        client.delete_api(api.name)
        assert _unpacked(small) == set()


# -- request bodies: authentication first, then the size, before a byte is read -------------


def _raw_request(server: Server, head: str, chunks: Iterable[bytes] = ()) -> Any:
    """Send a request's head and as much of its body as the server takes, over a plain socket;
    returns (status, JSON body, body bytes sent before the server answered and closed)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n")
        sent = 0
        try:
            for chunk in chunks:
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what is left is not read
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                answer += data
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body), sent


def _head(method: str, path: str, *headers: str) -> str:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: test", *headers, ""])


def _rss(server: Server) -> int:
    return int(psutil.Process(server.process.pid).memory_info().rss)


def test_a_200_mib_post_is_refused_before_it_is_read(server: Server, tmp_path: Path) -> None:
    """Unauthenticated, with a wrong token, or too big: the answer comes after the head, the
    body unread (the issue's 200 MiB POST to a worker route took the server to 500 MB)."""
    big = f"Content-Length: {200 << 20}"
    path = "/worker/v1/jobs/nojob/logs"
    status, body, _ = _raw_request(server, _head("POST", path, big))
    assert (status, body["kind"]) == (401, "auth.unauthorized")
    wrong = "Authorization: Bearer wrong"
    status, body, _ = _raw_request(server, _head("POST", path, big, wrong))
    assert (status, body["kind"]) == (403, "auth.forbidden")
    with server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
        job_id = client.submit(
            api.name, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}}
        )["job_id"]
    token = f"Authorization: Bearer {_worker_token(server, job_id)}"
    path = f"/worker/v1/jobs/{job_id}/logs"
    status, body, _ = _raw_request(server, _head("POST", path, big, token))
    assert (status, body["kind"]) == (413, "request.body_too_large")
    status, body, _ = _raw_request(server, _head("POST", f"/{api.name}", big))
    assert (status, body["kind"]) == (413, "request.body_too_large")


def test_a_body_without_a_length_is_cut_off_at_the_limit(server: Server, tmp_path: Path) -> None:
    with server.client() as client:
        api = deploy_fixture(client, "recorder", tmp_path)
    before = _rss(server)
    megabyte = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    chunked = "Transfer-Encoding: chunked"
    status, body, sent = _raw_request(
        server, _head("POST", f"/{api.name}", chunked), [megabyte] * 200
    )
    assert (status, body["kind"]) == (413, "request.body_too_large")
    assert sent < 100 << 20  # cut off near the 10 MiB limit, not read to the end
    print(f"chunked body: {sent >> 20} MiB sent before the 413 and the close")
    assert _rss(server) - before < 100 << 20


def test_without_the_servers_token_a_big_body_is_refused_unread(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "server", CORTEX_AUTH_TOKEN="s3cret")
    try:
        big = f"Content-Length: {200 << 20}"
        status, body, _ = _raw_request(srv, _head("POST", "/deploy", big))
        assert (status, body["kind"]) == (401, "auth.unauthorized")
        status, body, _ = _raw_request(
            srv,
            _head(
                "POST", "/deploy", f"Content-Length: {300 << 20}", "Authorization: Bearer s3cret"
            ),
        )
        assert (status, body["kind"]) == (413, "request.body_too_large")
    finally:
        stop_server(srv)


def _worker_token(server: Server, job_id: str) -> str:
    with sqlite3.connect(server.data_dir / "cortex.db") as db:
        row = db.execute("select worker_token from jobs where job_id = ?", (job_id,)).fetchone()
    return str(row[0])
