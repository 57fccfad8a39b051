"""The `cortex` command as a user runs it: a real process against a real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cortex.client import Client
from cortex.launchers.local import worker_environ
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
            not [
                p
                for p in server.worker_processes()
                if worker_environ(p).get("CORTEX_JOB_ID") == second
            ]
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
    assert "refusing to listen on 0.0.0.0 without a token" in result.stderr


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


def _job_file(tmp_path: Path, items: list[object], **extra: object) -> Path:
    path = tmp_path / "job.json"
    body = {"item_list": {"items": items, "batch_size": 1}, "workers": 1, **extra}
    path.write_text(json.dumps(body))
    return path


def test_submit_wait_shows_progress_and_exits_by_the_outcome(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    done = cortex(server.url, "submit", api.name, str(_job_file(tmp_path, [1, 2, 3])), "--wait")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("submitted job ")
    # Piped: plain progress lines, the last one at 3/3, then how it ended.
    assert any(", 3/3 batches (3 succeeded" in line for line in lines), done.stdout
    assert "succeeded after" in lines[-1] and "3 of 3 batches succeeded" in lines[-1]

    failing = _job_file(tmp_path, [1, "fail"], max_attempts=1)
    done = cortex(server.url, "submit", api.name, str(failing), "--wait")
    assert done.returncode == 1
    assert "completed with failures" in done.stderr
    assert "1 of 2 batches succeeded, 1 failed" in done.stderr
    job_id = done.stdout.splitlines()[0].removeprefix("submitted job ")

    shown = cortex(server.url, "failed", api.name, job_id)
    assert shown.returncode == 0
    assert shown.stdout.startswith("batch ") and "(attempts 1)" in shown.stdout
    retried = cortex(server.url, "retry", api.name, job_id, "--wait")
    assert retried.returncode == 1  # "fail" fails again
    assert "retrying 1 failed batches of job" in retried.stdout


def test_submit_follow_streams_the_logs_with_the_progress(
    server: Server, client: Client, tmp_path: Path
) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    done = cortex(
        server.url, "submit", api.name, str(_job_file(tmp_path, [{"lines": 3}])), "--follow"
    )
    assert done.returncode == 0, done.stderr
    assert "stdout [batch " in done.stdout and " line 2" in done.stdout
    assert "started 1 worker" in done.stdout  # a server line of the job's log


def test_ctrl_c_leaves_a_waited_job_running(server: Server, client: Client, tmp_path: Path) -> None:
    api = deploy_fixture(client, "recorder", tmp_path)
    job = _job_file(tmp_path, [{"sleep": 30}])
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "submit", api.name, str(job), "--wait"],
        env={**os.environ, "CORTEX_URL": server.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith("submitted job ")
    job_id = first.strip().removeprefix("submitted job ")
    proc.stdout.readline()  # the first progress line: it is waiting
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert f"job {job_id} goes on" in err and f"cortex delete {api.name} {job_id}" in err
    assert client.get_job(api.name, job_id)["job_status"]["status"] == "status_running"
    client.stop_job(api.name, job_id)


def _cortex_env(config: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with its environments file in `config`, and no CORTEX_URL or token unless
    given."""
    base = {k: v for k, v in os.environ.items() if k not in ("CORTEX_URL", "CORTEX_AUTH_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        env={**base, "CORTEX_CLI_CONFIG": str(config), "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_named_environments_choose_the_server_and_carry_its_token(
    server: Server, tmp_path: Path
) -> None:
    config = tmp_path / "cli.yaml"
    token = "s3cret-token-for-the-test"
    guarded = start_server(tmp_path / "guarded", CORTEX_AUTH_TOKEN=token)
    try:
        assert _cortex_env(config, "env", "configure", "open", "--url", server.url).returncode == 0
        done = _cortex_env(
            config, "env", "configure", "guarded", "--url", guarded.url, "--token", token
        )
        assert done.returncode == 0, done.stderr
        assert config.stat().st_mode & 0o777 == 0o600  # it holds a token
        listed = _cortex_env(config, "env", "list").stdout.splitlines()
        assert listed[0].startswith("  guarded") and "(token set)" in listed[0]
        assert listed[1].startswith("* open")  # the first one configured is the default
        # The default environment, then --env / -e, each with its own token.
        assert _cortex_env(config, "get").returncode == 0
        assert _cortex_env(config, "get", "-e", "guarded").returncode == 0
        assert _cortex_env(config, "env", "default", "guarded").returncode == 0
        assert _cortex_env(config, "get").returncode == 0
        # CORTEX_URL wins over the environment (and has no token for the guarded server).
        assert _cortex_env(config, "get", CORTEX_URL=guarded.url).returncode == 1
        unknown = _cortex_env(config, "get", "--env", "nope")
        assert unknown.returncode == 2 and "no environment named 'nope'" in unknown.stderr
    finally:
        stop_server(guarded)


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
