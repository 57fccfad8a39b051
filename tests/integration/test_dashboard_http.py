"""The dashboard over plain HTTP: its files, their headers, what is open without the token, and
the workers route it reads (the browser tests are in tests/browser/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from cortex.client import Client
from helpers import Server, deploy_fixture, start_server, stop_server, wait_for, wait_for_status

FILES = {
    "/ui/": "text/html",
    "/ui/app.js": "text/javascript",
    "/ui/dom.js": "text/javascript",
    "/ui/server.js": "text/javascript",
    "/ui/views.js": "text/javascript",
    "/ui/style.css": "text/css",
}


def test_the_page_and_its_files_are_served_with_a_strict_policy(server: Server) -> None:
    moved = httpx.get(f"{server.url}/ui")
    # Relative, so that a proxy may serve the dashboard under a prefix of its own.
    assert (moved.status_code, moved.headers["location"]) == (308, "ui/")
    for path, media_type in FILES.items():
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media_type)
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        again = httpx.get(
            f"{server.url}{path}", headers={"If-None-Match": response.headers["etag"]}
        )
        assert (again.status_code, again.content) == (304, b"")
    page = httpx.get(f"{server.url}/ui/").text
    assert 'src="app.js"' in page and 'href="style.css"' in page  # relative, as the redirect
    missing = httpx.get(f"{server.url}/ui/secrets.txt")
    assert missing.status_code == 404
    assert missing.json()["kind"] == "request.not_found"


def test_the_page_is_open_but_every_data_call_needs_the_token(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "server", CORTEX_AUTH_TOKEN="s3cret")
    try:
        assert httpx.get(f"{srv.url}/ui").status_code == 308
        for path in FILES:
            assert httpx.get(f"{srv.url}{path}").status_code == 200, path
        # Only those exact files: anything else under /ui/ is as closed as the API.
        assert httpx.get(f"{srv.url}/ui/other.js").status_code == 401
        for path in ("/metrics", "/get"):
            assert httpx.get(f"{srv.url}{path}").status_code == 401, path
            authorized = httpx.get(f"{srv.url}{path}", headers={"Authorization": "Bearer s3cret"})
            assert authorized.status_code == 200, path
    finally:
        stop_server(srv)


def test_a_jobs_workers_are_listed(server: Server, client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    body = {"workers": 2, "item_list": {"items": ["a", "b", "c", "d"], "batch_size": 1}}
    job_id = client.submit(api.name, body)["job_id"]
    status = wait_for_status(client, api.name, job_id)
    assert status["status"] == "status_succeeded"
    # Additive: what was submitted (an item list: its number of batches, not its items).
    assert status["dataset"] == {"kind": "item_list", "batches": 4}

    def exited() -> dict[str, Any] | None:
        # The job ends with its last batch; its workers exit a moment later.
        answer: dict[str, Any] = httpx.get(f"{server.url}/{api.name}/{job_id}/workers").json()
        return answer if all(w["state"] != "running" for w in answer["workers"]) else None

    answer = wait_for(exited, 15, "the workers to exit")
    assert answer["job_id"] == job_id
    workers = answer["workers"]
    assert [w["name"] for w in workers] == ["worker-0", "worker-1"]
    assert [w["worker_id"] for w in workers] == [f"{job_id}-0", f"{job_id}-1"]
    for worker in workers:
        assert worker["state"] == "succeeded"
        assert worker["exit_code"] == 0
        assert isinstance(worker["pid"], int)
        assert worker["error"] is None
        assert worker["started_at"].endswith("Z") and worker["last_seen"].endswith("Z")

    unknown_job = httpx.get(f"{server.url}/{api.name}/ffff/workers")
    assert unknown_job.status_code == 400
    assert unknown_job.json()["kind"] == "batchapi.job_not_found"
    unknown_api = httpx.get(f"{server.url}/not-deployed/{job_id}/workers")
    assert unknown_api.json()["kind"] == "resources.api_not_deployed"


@pytest.mark.parametrize("name", ["ui", "metrics"])
def test_an_api_cannot_take_the_dashboards_or_the_metrics_path(
    client: Client, tmp_path: Path, name: str
) -> None:
    with pytest.raises(Exception, match="reserved for the server's own paths"):
        deploy_fixture(client, "recorder", tmp_path, name=name)
