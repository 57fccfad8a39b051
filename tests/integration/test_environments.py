"""Each API version in an environment of its own, built from real packages of the registry.

One server for the module: its download cache makes the builds after the first fast, and
APIs with the same requirements share one environment, as they would for a user.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cortex.client import Client
from helpers import FIXTURES, Server, start_server, stop_server, wait_for, wait_for_status

# Builds download from the registry the first time: generous, but bounded.
BUILD_S = 120.0


@pytest.fixture(scope="module")
def env_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("envs-server"))
    yield srv
    stop_server(srv)


@pytest.fixture
def client(env_server: Server) -> Iterator[Client]:
    with env_server.client() as c:
        yield c


def make_project(
    root: Path,
    name: str,
    *,
    requirements: str | None = None,
    dependencies: str | None = None,
    dotenv: str | None = None,
    env: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """A project folder with the reporting predictor and the given environment files."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictor.py").write_text((FIXTURES / "envreport" / "predictor.py").read_text())
    for filename, text in {
        "requirements.txt": requirements,
        "dependencies.sh": dependencies,
        ".env": dotenv,
        **(extra or {}),
    }.items():
        if text is not None:
            (folder / filename).write_text(text)
    api = {
        "name": name,
        "kind": "BatchAPI",
        "predictor": {
            "type": "python",
            "path": "predictor.py",
            "config": {"out": str(root / f"{name}-out"), **(config or {})},
            "env": env or {},
        },
    }
    (folder / "cortex.yaml").write_text(yaml.safe_dump([api]))
    return folder


def deploy(client: Client, folder: Path) -> dict[str, Any]:
    """Deploy and wait for the environment; returns the deploy's answer with the final
    environment."""
    [result] = client.deploy(folder / "cortex.yaml")
    if result["environment"]["state"] == "building":
        result["environment"] = wait_for(
            lambda: _ended(client, result["api_name"]), BUILD_S, "the build to end"
        )
    return result


def _ended(client: Client, api: str) -> dict[str, Any] | None:
    env = client.environment(api)
    return None if env["state"] == "building" else env


def run_job(client: Client, api: str, items: list[Any], timeout_s: float = 60) -> dict[str, Any]:
    job = client.submit(api, {"item_list": {"items": items, "batch_size": 1}, "workers": 1})
    status = wait_for_status(client, api, job["job_id"], timeout_s)
    assert status["status"] == "status_succeeded", status
    return status


def reports(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / f"{name}-out").glob("*.json"))]


def cortex_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=BUILD_S,
    )


def test_two_apis_pin_different_versions_and_run_side_by_side(
    client: Client, env_server: Server, tmp_path: Path
) -> None:
    # The server's own interpreter (this test's) has neither version.
    assert importlib.util.find_spec("humanize") is None
    meet_a, meet_b = tmp_path / "a-arrived", tmp_path / "b-arrived"
    old = make_project(
        tmp_path,
        "hum-old",
        requirements="humanize==4.9.0\n",
        config={"modules": ["humanize"], "arrive": str(meet_a), "meet": str(meet_b)},
    )
    new = make_project(
        tmp_path,
        "hum-new",
        requirements="humanize==4.10.0\n",
        config={"modules": ["humanize"], "arrive": str(meet_b), "meet": str(meet_a)},
    )
    assert deploy(client, old)["environment"]["state"] == "ready"
    assert deploy(client, new)["environment"]["state"] == "ready"
    # Each job's batch waits until the other's has started: they run at the same time.
    jobs = [
        client.submit(api, {"item_list": {"items": [1], "batch_size": 1}, "workers": 1})
        for api in ("hum-old", "hum-new")
    ]
    for api, job in zip(("hum-old", "hum-new"), jobs, strict=True):
        assert wait_for_status(client, api, job["job_id"], 90)["status"] == "status_succeeded"
    envs = (env_server.data_dir / "envs").resolve()
    [old_report] = reports(tmp_path, "hum-old")
    [new_report] = reports(tmp_path, "hum-new")
    assert old_report["versions"]["humanize"][0] == "4.9.0"
    assert new_report["versions"]["humanize"][0] == "4.10.0"
    for report in (old_report, new_report):
        assert Path(report["prefix"]).resolve().parent == envs
        assert Path(report["versions"]["humanize"][1]).resolve().is_relative_to(envs)
        # The worker runtime pulled none of the server's dependencies in.
        assert report["server_modules"] == []
    assert old_report["prefix"] != new_report["prefix"]


def test_an_unchanged_redeploy_and_a_second_api_with_the_same_requirements_hit_the_cache(
    client: Client, tmp_path: Path
) -> None:
    first = make_project(tmp_path, "cache-one", requirements="humanize==4.9.0\n")
    deploy(client, first)
    again = client.deploy(first / "cortex.yaml")[0]
    assert again["result"] == "up_to_date"
    assert again["environment"]["state"] == "ready" and again["environment"]["cached"]
    second = make_project(
        tmp_path, "cache-two", requirements="humanize==4.9.0\n", config={"other": 1}
    )
    answer = client.deploy(second / "cortex.yaml")[0]
    assert answer["result"] == "created"
    # No build ran: the environment was ready when the deploy was answered.
    assert answer["environment"]["cached"] and answer["environment"]["state"] == "ready"
    assert answer["environment"]["key"] == again["environment"]["key"]


def test_a_failed_build_fails_the_deploy_and_the_previous_version_keeps_serving(
    client: Client, env_server: Server, tmp_path: Path
) -> None:
    folder = make_project(tmp_path, "keeps", requirements="humanize==4.9.0\n")
    deploy(client, folder)
    serving = client.get_api("keeps")["batch_api"]["spec_id"]
    (folder / "requirements.txt").write_text(
        "humanize==4.9.0\ncortex-batch-no-such-package-zz9==1.0\n"
    )
    started = time.monotonic()
    done = cortex_cli(env_server.url, "deploy", str(folder / "cortex.yaml"))
    took = time.monotonic() - started
    assert done.returncode == 1, done
    assert took < 60
    assert "failed to build" in done.stderr
    # The installer's own words.
    assert "cortex-batch-no-such-package-zz9" in done.stderr
    assert "requirements.txt failed" in done.stderr
    api = client.get_api("keeps")["batch_api"]
    assert api["spec_id"] == serving
    assert api["environment"]["state"] == "failed"
    assert "cortex-batch-no-such-package-zz9" in api["environment"]["message"]
    shown = cortex_cli(env_server.url, "get", "keeps")
    assert "environment: failed" in shown.stdout and "zz9" in shown.stdout
    # New jobs run the version that served.
    status = run_job(client, "keeps", [1])
    assert status["spec_id"] == serving


def test_a_first_deploy_that_fails_to_build_refuses_jobs_with_the_reason(
    client: Client, env_server: Server, tmp_path: Path
) -> None:
    folder = make_project(
        tmp_path, "never-built", requirements="cortex-batch-no-such-package-zz9==1.0\n"
    )
    assert deploy(client, folder)["environment"]["state"] == "failed"
    response = httpx.post(
        f"{env_server.url}/never-built",
        json={"item_list": {"items": [1], "batch_size": 1}, "workers": 1},
    )
    assert response.status_code == 400
    body = response.json()
    assert body["kind"] == "batchapi.environment_failed"
    assert "failed to build" in body["message"]


def test_a_user_pinning_an_old_pydantic_deploys_and_runs(client: Client, tmp_path: Path) -> None:
    folder = make_project(
        tmp_path, "old-pydantic", requirements="pydantic<2\n", config={"modules": ["pydantic"]}
    )
    assert deploy(client, folder)["environment"]["state"] == "ready"
    run_job(client, "old-pydantic", [1])
    [report] = reports(tmp_path, "old-pydantic")
    assert report["versions"]["pydantic"][0].startswith("1."), report


DEPS_WRITING_A_MARKER = """echo "running as $VIRTUAL_ENV"
echo built-by-deps > "$VIRTUAL_ENV/deps-marker.txt"
"""


def test_dotenv_predictor_env_and_dependencies_sh_reach_the_workers(
    client: Client, tmp_path: Path
) -> None:
    dotenv = (
        "# the project's variables\n"
        "PLAIN=one\n"
        'QUOTED="two # not a comment"\n'
        "export EXPORTED='three'\n"
        "OVERRIDDEN=from-dotenv  # a comment\n"
    )
    folder = make_project(
        tmp_path,
        "variables",
        dependencies=DEPS_WRITING_A_MARKER,
        dotenv=dotenv,
        env={"OVERRIDDEN": "from-yaml"},
        config={"vars": ["PLAIN", "QUOTED", "EXPORTED", "OVERRIDDEN"]},
    )
    result = deploy(client, folder)
    assert result["environment"]["state"] == "ready"
    log = client.environment("variables")
    assert any("running dependencies.sh" in line for line in log["lines"])
    run_job(client, "variables", [1])
    [report] = reports(tmp_path, "variables")
    assert report["vars"] == {
        "PLAIN": "one",
        "QUOTED": "two # not a comment",
        "EXPORTED": "three",
        "OVERRIDDEN": "from-yaml",  # predictor.env wins
    }
    assert report["marker"] == "built-by-deps"


def test_a_project_without_environment_files_runs_in_the_server_interpreter_with_its_dotenv(
    client: Client, tmp_path: Path
) -> None:
    folder = make_project(
        tmp_path, "plain", dotenv="GREETING=hello\n", config={"vars": ["GREETING"]}
    )
    assert deploy(client, folder)["environment"]["state"] == "none"
    run_job(client, "plain", [1])
    [report] = reports(tmp_path, "plain")
    assert report["vars"] == {"GREETING": "hello"}
    assert Path(report["prefix"]) == Path(sys.prefix)


@pytest.mark.parametrize(
    ("dotenv", "expected"),
    [
        ("OK=1\nCORTEX_URL=http://evil\n", ".env: line 2: CORTEX_URL"),
        ("OK=1\n\n  cortex_token=x\n", ".env: line 3: cortex_token"),
        ("OK=1\nnot a binding at all\n", ".env: line 2: cannot be read"),
    ],
)
def test_a_dotenv_that_sets_cortex_variables_or_does_not_read_is_refused_with_its_line(
    env_server: Server, tmp_path: Path, dotenv: str, expected: str
) -> None:
    folder = make_project(tmp_path, "bad-dotenv", dotenv=dotenv)
    done = cortex_cli(env_server.url, "deploy", str(folder / "cortex.yaml"))
    assert done.returncode == 1
    assert expected in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    with Client(env_server.url) as c, pytest.raises(Exception, match="not deployed"):
        c.get_api("bad-dotenv")


def test_a_failing_dependencies_sh_fails_the_deploy_with_its_output(
    env_server: Server, tmp_path: Path
) -> None:
    folder = make_project(
        tmp_path,
        "bad-deps",
        dependencies="echo 'fetching the model tools'\necho oops >&2\nexit 3\n",
    )
    done = cortex_cli(env_server.url, "deploy", str(folder / "cortex.yaml"))
    assert done.returncode == 1
    assert "dependencies.sh failed (exit code 3)" in done.stderr
    assert "oops" in done.stderr
    # Piped, the deploy shows the script's output as it runs.
    assert "fetching the model tools" in done.stdout


def test_conda_packages_without_conda_are_refused(env_server: Server, tmp_path: Path) -> None:
    folder = make_project(tmp_path, "conda", extra={"conda-packages.txt": "numpy\n"})
    env = {"PATH": "/usr/bin:/bin"}  # the client's PATH does not matter: the server's does
    done = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "deploy", str(folder / "cortex.yaml"), "--url",
         env_server.url],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "conda-packages.txt" in done.stderr and "micromamba" in done.stderr


def test_a_job_submitted_during_the_build_waits_for_it(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    folder = make_project(
        tmp_path,
        "slow-build",
        # The build waits for the test's signal (a bounded loop: it gives up after 60 s).
        dependencies=(
            f'for i in $(seq 600); do [ -f "{gate}" ] && exit 0; sleep 0.1; done\nexit 1\n'
        ),
    )
    [answer] = client.deploy(folder / "cortex.yaml")
    assert answer["environment"]["state"] == "building"
    assert client.get_api("slow-build")["batch_api"]["environment"]["state"] == "building"
    job = client.submit(
        "slow-build", {"item_list": {"items": [1, 2], "batch_size": 1}, "workers": 1}
    )

    def waiting() -> bool:
        status = client.get_job("slow-build", job["job_id"])["job_status"]
        assert status["status"] == "status_running", status
        return bool(status["worker_counts"] and status["worker_counts"].get("pending") == 1)

    wait_for(waiting, 30, "the job's worker to wait, pending, for the build")
    gate.touch()
    status = wait_for_status(client, "slow-build", job["job_id"], BUILD_S)
    assert status["status"] == "status_succeeded", status
    assert len(reports(tmp_path, "slow-build")) == 2
    assert client.get_api("slow-build")["batch_api"]["environment"]["state"] == "ready"


def test_the_pip_fallback_builds_an_environment(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "pip-server", CORTEX_ENV_INSTALLER="pip")
    try:
        with srv.client() as c:
            folder = make_project(
                tmp_path,
                "via-pip",
                requirements="humanize==4.9.0\n",
                config={"modules": ["humanize"]},
            )
            assert deploy(c, folder)["environment"]["state"] == "ready"
            log = c.environment("via-pip")["lines"]
            assert any("pip install" in line for line in log)
            run_job(c, "via-pip", [1])
        [report] = reports(tmp_path, "via-pip")
        assert report["versions"]["humanize"][0] == "4.9.0"
    finally:
        stop_server(srv)


def test_a_running_job_keeps_its_environment_while_a_new_version_replaces_it(
    tmp_path: Path,
) -> None:
    """With a budget of one byte, every environment nothing uses goes at the next check: the
    running job's stays until the job ends, the serving version's stays."""
    srv = start_server(tmp_path / "tiny-budget", CORTEX_ENV_CACHE_BYTES="1")
    gate = tmp_path / "gate"
    try:
        with srv.client() as c:
            folder = make_project(
                tmp_path,
                "replaced",
                requirements="humanize==4.9.0\n",
                config={"modules": ["humanize"], "meet": str(gate)},
            )
            deploy(c, folder)
            old_key = c.environment("replaced")["key"]
            job = c.submit("replaced", {"item_list": {"items": [1], "batch_size": 1}, "workers": 1})
            wait_for(
                lambda: c.get_job("replaced", job["job_id"])["job_status"]["worker_counts"].get(
                    "running"
                ),
                30,
                "the old version's worker to run",
            )
            (folder / "requirements.txt").write_text("humanize==4.10.0\n")
            assert deploy(c, folder)["environment"]["state"] == "ready"
            new_key = c.environment("replaced")["key"]
            assert new_key != old_key
            envs = srv.data_dir / "envs"
            # An API whose first environment nothing uses once its second is built: seeing
            # it go proves a check ran, after the new version of "replaced" was built too.
            scrap = make_project(tmp_path, "scrap", dependencies="echo one\n")
            deploy(c, scrap)
            scrap_key = c.environment("scrap")["key"]
            (scrap / "dependencies.sh").write_text("echo two\n")
            deploy(c, scrap)
            wait_for(lambda: not (envs / scrap_key).exists(), 30, "the unused one to go")
            # That check spared the running job's environment.
            assert (envs / old_key / "cortex-env.json").exists()
            gate.touch()
            status = wait_for_status(c, "replaced", job["job_id"], 60)
            assert status["status"] == "status_succeeded"
            [report] = reports(tmp_path, "replaced")
            assert report["versions"]["humanize"][0] == "4.9.0"
            # The next check (after the next build) removes it: nothing uses it any more.
            other = make_project(tmp_path, "trigger", dependencies="true\n")
            deploy(c, other)
            wait_for(lambda: not (envs / old_key).exists(), 30, "the unused one to go")
            assert (envs / new_key / "cortex-env.json").exists()
            gate.unlink()
            (tmp_path / "replaced-out").rename(tmp_path / "replaced-out-old")
            gate.touch()
            run_job(c, "replaced", [2])
            [report] = reports(tmp_path, "replaced")
            assert report["versions"]["humanize"][0] == "4.10.0"
    finally:
        stop_server(srv)


def _forked_report(client: Client, tmp_path: Path, api: str) -> dict[str, Any] | None:
    """Run a one-batch job; its worker's report if a fork server started the worker (an
    environment's fork server starts with its first worker, a new interpreter)."""
    job_id = run_job(client, api, [1])["job_id"]
    [report] = [r for r in reports(tmp_path, api) if r["job_id"] == job_id]
    return report if "cortex.worker.forkserver" in report["parent"] else None


@pytest.mark.parametrize(
    "requirements", [None, "humanize==4.9.0\n"], ids=["server-interpreter", "environment"]
)
def test_forked_workers_run_in_their_interpreter_with_their_own_variables(
    client: Client, tmp_path: Path, requirements: str | None
) -> None:
    name = "forked-env" if requirements else "forked-plain"
    folder = make_project(
        tmp_path,
        name,
        requirements=requirements,
        dotenv="GREETING=hello\n",
        env={"FROM_YAML": "yes"},
        config={
            "vars": ["GREETING", "FROM_YAML", "CORTEX_JOB_ID", "CORTEX_WORKER_ID"],
            "modules": ["humanize"],
        },
    )
    deploy(client, folder)
    forked = [
        wait_for(lambda: _forked_report(client, tmp_path, name), 90, "a forked worker")
        for _ in range(2)
    ]
    for report in forked:
        # The fork server runs the interpreter the worker would have been started with.
        assert report["parent"][0] == report["executable"]
        assert report["vars"]["GREETING"] == "hello"
        assert report["vars"]["FROM_YAML"] == "yes"
        assert report["vars"]["CORTEX_JOB_ID"] == report["job_id"]
        if requirements:
            assert report["versions"]["humanize"][0] == "4.9.0"
            assert report["server_modules"] == []
            assert Path(report["prefix"]) != Path(sys.prefix)
        else:
            assert report["versions"]["humanize"][0] is None  # not in the server's interpreter
            assert Path(report["prefix"]) == Path(sys.prefix)
    # Each worker has its own variables, not the first one's nor its fork server's.
    assert forked[0]["vars"]["CORTEX_WORKER_ID"] != forked[1]["vars"]["CORTEX_WORKER_ID"]
    assert all(report["vars"]["CORTEX_WORKER_ID"] for report in forked)
