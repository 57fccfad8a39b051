"""The `cortex` command as a user runs it: a real process against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cortex.client import Client
from helpers import (
    FIXTURES,
    Server,
    deploy_fixture,
    free_port,
    start_server,
    stop_server,
    wait_for,
    wait_for_status,
)


def cortex(
    server_url: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        env={**os.environ, "CORTEX_URL": server_url, "COLUMNS": "200"},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _project(tmp_path: Path, name: str, **predictor: object) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "predictor.py").write_text((FIXTURES / "recorder" / "predictor.py").read_text())
    api = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {
            "type": "python",
            "path": "predictor.py",
            "config": {"out": "x"},
            **predictor,
        },
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    return folder / "cortex.yaml"


def test_deploy_reports_created_up_to_date_and_updated(server: Server, tmp_path: Path) -> None:
    config = _project(tmp_path, "cli-deploy")
    assert cortex(server.url, "deploy", str(config)).stdout == "created cli-deploy (BatchAPI)\n"
    assert (
        cortex(server.url, "deploy", str(config)).stdout == "cli-deploy (BatchAPI) is up to date\n"
    )
    (config.parent / "helper.py").write_text("X = 1\n")
    assert cortex(server.url, "deploy", str(config)).stdout == "updated cli-deploy (BatchAPI)\n"
    # Files the project does not ship do not change it.
    (config.parent / ".hidden").write_text("secret")
    (config.parent / ".cortexignore").write_text("data/\n")
    (config.parent / "data").mkdir()
    (config.parent / "data" / "big.bin").write_bytes(b"0" * 1000)
    assert "is up to date" in cortex(server.url, "deploy", str(config)).stdout


def test_deploy_refuses_bad_files_with_one_line(server: Server, tmp_path: Path) -> None:
    cases = {
        "unknown-key": ({"bogus": 1}, "predictor.bogus: unknown key"),
        "missing-file": ({"path": "nope.py"}, "predictor.path: nope.py is not a file"),
        "bad-env": ({"env": {"CORTEX_X": "1"}}, "keys may not start with CORTEX_"),
        "bad-pypath": ({"python_path": "."}, "predictor.python_path"),
    }
    for name, (predictor, expected) in cases.items():
        result = cortex(server.url, "deploy", str(_project(tmp_path, name, **predictor)))
        assert result.returncode == 1, result
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    reserved = _project(tmp_path, "healthz")
    result = cortex(server.url, "deploy", str(reserved))
    assert result.returncode == 1 and "reserved" in result.stderr
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- name: [unclosed\n")
    result = cortex(server.url, "deploy", str(bad_yaml))
    assert result.returncode == 1 and "not valid YAML" in result.stderr
    result = cortex(server.url, "deploy", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_submit_get_and_watch(server: Server, client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    submission = tmp_path / "job.json"
    submission.write_text(
        json.dumps({"workers": 1, "item_list": {"items": [1, 2, 3], "batch_size": 2}})
    )

    dry = cortex(server.url, "submit", api.name, str(submission), "--dry-run")
    assert dry.stdout == "validations passed\n"
    result = cortex(server.url, "submit", api.name, str(submission))
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.split()[2]
    assert f"cortex get {api.name} {job_id} --watch" in result.stdout

    watch = cortex(server.url, "get", api.name, job_id, "--watch")
    assert watch.returncode == 0, watch.stderr
    assert "status: succeeded" in watch.stdout
    # --workers overrides the file's count (the file itself is sent as it is otherwise).
    more = cortex(server.url, "submit", api.name, str(submission), "--workers", "2", "-o", "json")
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["workers"] == 2

    one = cortex(server.url, "get", api.name, job_id).stdout
    for expected in (
        "job id: " + job_id,
        "batch stats",
        "avg time per batch",
        "worker stats are not available",
        "job configuration",
    ):
        assert expected in one
    table = cortex(server.url, "get", api.name).stdout
    assert "job id" in table and job_id in table and "succeeded" in table and "2/2" in table
    assert f"endpoint: {server.url}/{api.name}" in table
    # Watching an API ends once none of its jobs is in progress.
    watched = cortex(server.url, "get", api.name, "--watch")
    assert watched.returncode == 0 and job_id in watched.stdout
    everything = cortex(server.url, "get").stdout
    assert api.name in everything and "latest job id" in everything

    followed = cortex(server.url, "logs", api.name, job_id, "--follow")
    assert followed.returncode == 0  # and it ended by itself: the job is over
    assert "job status: status_succeeded" in followed.stdout
    assert cortex(server.url, "logs", api.name, job_id, "--tail", "1").stdout.count("\n") == 1
    raw = json.loads(cortex(server.url, "get", api.name, job_id, "-o", "json").stdout)
    assert raw["job_status"]["status"] == "status_succeeded"
    assert json.loads(cortex(server.url, "get", "-o", "json").stdout)["batch_apis"]


def test_get_of_a_failed_job_with_watch_exits_1(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "failing_init", tmp_path)
    job_id = client.submit(api.name, {"workers": 1, "item_list": {"items": [1], "batch_size": 1}})[
        "job_id"
    ]
    result = cortex(server.url, "get", api.name, job_id, "--watch")
    assert result.returncode == 1
    assert "worker error" in result.stdout
    assert "model weights missing" in result.stdout


def test_delete_stops_jobs_and_removes_the_api(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    body = {"workers": 1, "item_list": {"items": [{"sleep": 0.2}] * 50, "batch_size": 1}}
    first = client.submit(api.name, body)["job_id"]
    second = client.submit(api.name, body)["job_id"]

    stop = cortex(server.url, "delete", api.name, first)
    assert stop.stdout == f"stopped job {first}\n"
    assert client.get_job(api.name, first)["job_status"]["status"] == "status_stopped"

    result = cortex(server.url, "delete", api.name, "--force")
    assert result.stdout == f"deleting {api.name}\n"
    gone = cortex(server.url, "get", api.name)
    assert gone.returncode == 1
    assert gone.stderr.strip() == f"error: {api.name} is not deployed"
    # Deleting the API stopped its other job's workers too.
    wait_for(
        lambda: (
            not [p for p in server.worker_processes() if p.environ().get("CORTEX_JOB_ID") == second]
        ),
        5,
        "the deleted API's workers to stop",
    )


def test_errors_are_one_line_with_meaningful_exit_codes(server: Server, tmp_path: Path) -> None:
    missing = cortex(server.url, "get", "no-such-api", "abc")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no-such-api is not deployed"

    unreachable = cortex(f"http://127.0.0.1:{free_port()}", "get")
    assert unreachable.returncode == 3
    assert len(unreachable.stderr.strip().splitlines()) == 1
    assert "cannot reach the cortex server" in unreachable.stderr

    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    usage = cortex(server.url, "submit", "x", str(bad))
    assert usage.returncode == 2
    assert "not valid JSON" in usage.stderr
    assert cortex(server.url, "frobnicate").returncode == 2


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    result = cortex("http://unused", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("error: refusing to listen on 0.0.0.0 without a token")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        # A one-space token let the server listen on every interface, guarding nothing.
        (["--host", "0.0.0.0", "--auth-token", " "], "--auth-token (CORTEX_AUTH_TOKEN) is blank"),
        (["--auth-token", " s3cret"], "starts or ends with whitespace"),
        # A lease shorter than the heartbeat ran batches twice (6 predict runs for 4 batches).
        (
            ["--lease-s", "2", "--heartbeat-s", "5"],
            "--heartbeat-s (CORTEX_HEARTBEAT_S) 5 must be at most half of --lease-s "
            "(CORTEX_LEASE_S) 2",
        ),
        (["--lease-s", "10", "--heartbeat-s", "6"], "must be at most half of --lease-s"),
        (["--heartbeat-s", "0"], "--heartbeat-s (CORTEX_HEARTBEAT_S) must be more than 0"),
        (["--lease-s", "nan"], "--lease-s (CORTEX_LEASE_S) must be more than 0, not nan"),
        (["--max-workers", "0"], "--max-workers (CORTEX_MAX_WORKERS) must be more than 0"),
        (["--worker-grace-s", "-1"], "--worker-grace-s (CORTEX_WORKER_GRACE_S) must be 0 or"),
        (["--log-max-lines", "0"], "--log-max-lines (CORTEX_LOG_MAX_LINES) must be more"),
    ],
)
def test_serve_refuses_settings_that_contradict_each_other(
    tmp_path: Path, flags: list[str], says: str
) -> None:
    result = cortex("http://unused", "serve", "--data-dir", str(tmp_path), *flags)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "cortex.db").exists()  # refused before anything started


def test_serve_with_the_ray_launcher_says_what_it_lacks_in_one_line(tmp_path: Path) -> None:
    # Without Ray installed it asks for Ray; with it, for the cluster's address.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CORTEX_RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "serve", "--launcher", "ray"],
        env={**env, "CORTEX_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: the ray launcher needs ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_second_server_on_a_data_folder_in_use_is_refused_naming_the_holder(
    tmp_path: Path,
) -> None:
    """Two servers on one folder failed each other's jobs. The second is refused before it
    touches anything; the first keeps running its jobs; once it is gone, the folder is free
    (a SIGKILLed holder leaves no stale lock)."""
    first = start_server(tmp_path / "data")
    try:
        with first.client() as client:
            api = deploy_fixture(client, "recorder", tmp_path)

            def serve(data_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
                port = str(free_port())
                return cortex(
                    "http://unused", "serve", "--port", port, "--data-dir", str(data_dir), *flags
                )

            second = serve(tmp_path / "data")
            assert second.returncode == 1, second.stderr
            assert len(second.stderr.strip().splitlines()) == 1, second.stderr
            assert f"the data folder {tmp_path / 'data'} is in use by another cortex server" in (
                second.stderr
            )
            assert f"pid {first.process.pid} on " in second.stderr
            assert f"listening at {first.url}" in second.stderr
            # Another data folder, but the first server's SQLite file as its store.
            store = f"sqlite:///{tmp_path / 'data' / 'cortex.db'}"
            third = serve(tmp_path / "other", "--store", store)
            assert third.returncode == 1, third.stderr
            assert f"the SQLite store {tmp_path / 'data' / 'cortex.db'} is in use" in third.stderr
            # The first server was not disturbed.
            body = {"workers": 1, "item_list": {"items": [1, 2], "batch_size": 1}}
            job_id = client.submit(api.name, body)["job_id"]
            status = wait_for_status(client, api.name, job_id)
            assert status["status"] == "status_succeeded", status
    finally:
        first.process.kill()  # SIGKILL: the kernel releases the lock all the same
        first.process.wait()
    again = start_server(tmp_path / "data")
    stop_server(again)


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_postgresql_store_without_psycopg_says_what_to_install(
    tmp_path: Path, command: str
) -> None:
    """psycopg is the `postgres` extra; without it the store's error names the extra."""
    code = (
        "import sys; sys.modules['psycopg'] = None;"  # as if it were not installed
        "from cortex.cli import main; sys.argv = ['cortex', *sys.argv[1:]]; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, command, "--data-dir", str(tmp_path)],
        env={**os.environ, "CORTEX_STORE": "postgresql://cortex:pw@127.0.0.1:1/cortex"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the store postgresql+psycopg://cortex:***@127.0.0.1:1/cortex needs the Python "
        "package psycopg, which is not installed (pip install 'cortex-batch[postgres]')"
    ]
