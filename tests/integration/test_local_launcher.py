"""The local launcher on its own, with real worker processes: started by a fork server or as
new interpreters, they must look the same to the server (exit codes, signals, stops, their
variables, adoption by a later server)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cortex import spec
from cortex.launchers.base import WorkerExit, WorkerLaunch
from cortex.launchers.local import LocalLauncher, worker_environ
from helpers import wait_for

JOB = "job-launcher-test"


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that takes connections and never answers: a worker polling it stays alive,
    waiting, until it is stopped."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as sock:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _launch(
    tmp_path: Path, worker_id: str, url: str | None, mem: str | None = None
) -> WorkerLaunch:
    env = {
        "CORTEX_JOB_ID": JOB,
        "CORTEX_WORKER_ID": worker_id,
        "CORTEX_WORKER_TOKEN": "token",
        "CORTEX_PROJECT_DIR": str(tmp_path),
        "PYTHONPATH": str(tmp_path),
        "ONLY_THIS_WORKER": worker_id,
    }
    if url is not None:
        env["CORTEX_URL"] = url
    return WorkerLaunch(
        job_id=JOB,
        worker_id=worker_id,
        project_dir=tmp_path,
        log_path=tmp_path / "logs" / f"{worker_id}.log",
        # (Not validated: the tests give limits below what a deploy accepts.)
        compute=spec.Compute.model_construct(mem=mem, cpu="200m", gpu=0),
        env=env,
    )


def _launcher(fork: bool) -> LocalLauncher:
    launcher = LocalLauncher(fork_servers=fork)
    if fork:
        assert launcher.fork_server_ready(30), "the fork server never got ready"
    return launcher


def _exit_of(launcher: LocalLauncher, worker_id: str) -> WorkerExit:
    def ended() -> WorkerExit | None:
        return next((e for e in launcher.poll() if e.worker_id == worker_id), None)

    exit_ = wait_for(ended, 30, f"worker {worker_id} to exit")
    launcher.ack(worker_id)
    return exit_


def _forked(pid: int) -> bool:
    parent = psutil.Process(pid).parent()
    return parent is not None and "cortex.worker.forkserver" in parent.cmdline()


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "popen"])
def test_exit_codes_signals_and_stops_are_reported_as_popen_gives_them(
    tmp_path: Path, silent_server: str, fork: bool
) -> None:
    launcher = _launcher(fork)
    try:
        # No CORTEX_URL: the runtime fails as it starts, its traceback in the worker's log.
        failing = launcher.start(_launch(tmp_path, "w-fails", None))
        killed = launcher.start(_launch(tmp_path, "w-killed", silent_server))
        stopped = launcher.start(_launch(tmp_path, "w-stopped", silent_server))
        assert failing is not None and killed is not None and stopped is not None
        assert _forked(killed) == fork
        assert _exit_of(launcher, "w-fails").exit_code == 1
        assert "KeyError: 'CORTEX_URL'" in (tmp_path / "logs" / "w-fails.log").read_text()
        # Each worker is the leader of its own session, as the stops need.
        assert os.getsid(killed) == killed
        os.killpg(killed, signal.SIGKILL)
        assert _exit_of(launcher, "w-killed").exit_code == -signal.SIGKILL
        assert launcher.stop_worker("w-stopped", grace_s=10)
        stop = _exit_of(launcher, "w-stopped")
        assert stop.exit_code == -signal.SIGTERM
        assert stop.reason == "was killed by SIGTERM"
        assert launcher.job_ids() == set()
    finally:
        launcher.close(1)


def test_a_forked_worker_has_its_own_variables_folder_and_output(
    tmp_path: Path, silent_server: str
) -> None:
    launcher = _launcher(True)
    project = tmp_path / "project"
    project.mkdir()
    try:
        launch = _launch(project, "w-own", silent_server)
        pid = launcher.start(launch)
        assert pid is not None and _forked(pid)
        proc = psutil.Process(pid)
        env = worker_environ(proc)
        assert env["CORTEX_WORKER_ID"] == "w-own"
        assert env["ONLY_THIS_WORKER"] == "w-own"
        assert env["PYTHONUNBUFFERED"] == "1"
        # Its process's environ is its fork server's, which belongs to no worker.
        assert "CORTEX_WORKER_ID" not in proc.environ()
        assert proc.cwd() == str(project)
        assert os.readlink(f"/proc/{pid}/fd/1") == str(launch.log_path)
        assert os.readlink(f"/proc/{pid}/fd/2") == str(launch.log_path)
        assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    finally:
        launcher.close(1)


def test_a_later_launcher_adopts_a_forked_worker_and_enforces_its_memory_limit(
    tmp_path: Path, silent_server: str
) -> None:
    first = _launcher(True)
    # Found by its id alone below: an id no other process on the machine has.
    worker_id = f"w-adopted-{uuid.uuid4().hex[:8]}"
    try:
        # A limit it is over from the start; only the launcher that polls enforces it.
        pid = first.start(_launch(tmp_path, worker_id, silent_server, mem="1Mi"))
        assert pid is not None and _forked(pid)
        later = LocalLauncher(fork_servers=False)
        assert not later.adopt(JOB, "w-someone-else", pid)
        assert later.adopt(JOB, worker_id, None)
        exit_ = _exit_of(later, worker_id)
        assert exit_.oom, exit_
        assert "over its limit of 1 MiB" in exit_.detail
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        first.close(1)


def test_a_killed_fork_server_leaves_its_workers_and_the_next_start_is_a_new_interpreter(
    tmp_path: Path, silent_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = _launcher(True)
    try:
        forked = launcher.start(_launch(tmp_path, "w-forked", silent_server))
        assert forked is not None and _forked(forked)
        fork_server = psutil.Process(forked).parent()
        assert fork_server is not None
        fork_server.kill()
        fork_server.wait(10)
        with caplog.at_level(logging.WARNING, logger="cortex"):
            started = [
                launcher.start(_launch(tmp_path, f"w-new-{n}", silent_server)) for n in range(2)
            ]
        assert all(pid is not None and psutil.Process(pid).ppid() == os.getpid() for pid in started)
        warnings = [r for r in caplog.records if "new interpreter" in r.getMessage()]
        assert len(warnings) == 1, warnings
        # The orphaned worker lives on, and its end is still seen (its code is lost with
        # its parent).
        assert psutil.Process(forked).is_running()
        os.killpg(forked, signal.SIGKILL)
        assert _exit_of(launcher, "w-forked").exit_code is None
        launcher.stop_job(JOB, grace_s=5)
        assert {_exit_of(launcher, f"w-new-{n}").exit_code for n in range(2)} == {-signal.SIGTERM}
    finally:
        launcher.close(1)
