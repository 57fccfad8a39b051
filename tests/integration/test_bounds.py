"""Disk and memory stay bounded whatever a client sends: deploy archives capped on what they
unpack to, unpacked projects removed once nothing uses them."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
