"""Workers as local processes, each in its own process session with unbuffered output.

`compute.mem` is enforced by a watchdog: on every poll (the reconciler's tick, 4 times a
second) the resident memory of each worker's process tree is measured, and a worker over its
limit is killed with its whole session and reported as out of memory. A kernel cgroup would be
exact; this needs no privileges and works on any machine. The limit travels in the worker's
environment, so a server restarted mid-job enforces it on the workers it adopts.

Each worker interpreter (the server's own, and each API environment's) has a fork server
(`cortex.worker.forkserver`, `cortex.launchers.forked`) that has imported the worker's modules
and forks a worker in milliseconds, where a new interpreter takes 100-200 ms to poll for
batches. The server's is started with the launcher; an environment's with its first worker,
which is started the old way (`subprocess.Popen`) while it gets ready, as is any worker when
a fork server is gone or fails. A forked worker is its own session as a Popen'd one is, and
outlives the server as one does.

`compute.gpu: N` gives each worker N devices of its own through `CUDA_VISIBLE_DEVICES`, taken
from the server's GPUs (`cortex.gpus`) and given back when the worker's exit is seen; a worker
of an API without GPUs sees none (`CUDA_VISIBLE_DEVICES=""`) where the server has some.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from cortex import capacity, gpus
from cortex.launchers.base import WorkerExit, WorkerLaunch
from cortex.launchers.forked import ForkServer
from cortex.worker import forkserver

log = logging.getLogger("cortex")

# The worker's memory limit in its environment, for a later server that adopts it.
_MEM_LIMIT_ENV = "CORTEX_MEM_LIMIT_BYTES"


@dataclass
class _Proc:
    job_id: str
    worker_id: str
    popen: subprocess.Popen[bytes] | None
    pid: int
    mem_limit_bytes: int | None = None
    # The fork server that started it, which reports its exit.
    forked: ForkServer | None = None
    oom_detail: str = ""
    # Set once the process is seen to have ended (it is reaped then, so its pid is no longer
    # ours to signal); handed over by `poll` until acknowledged.
    exit: WorkerExit | None = None


class LocalLauncher:
    def __init__(self, devices: tuple[str, ...] = (), fork_servers: bool = True) -> None:
        self._procs: dict[str, _Proc] = {}
        self._lock = threading.Lock()
        # By interpreter and worker modules folder (None: the server's own).
        self._fork_servers: dict[tuple[str, Path | None], ForkServer] = {}
        self._use_fork_servers = fork_servers
        self._fork_lock = threading.Lock()
        self._warned = False
        self.gpus = gpus.Pool(devices)
        # This machine's size, read once (a submission asks for it, and reading the memory
        # size from /proc costs milliseconds on a busy server).
        self._capacity = capacity.local({}, len(self.gpus.devices))
        if fork_servers:
            # It imports the worker's modules while the server starts.
            self._fork_server_for(None)

    # This machine does not grow: a worker that does not fit it never will.
    fixed_capacity = True

    def capacity(self) -> capacity.Resources:
        """This machine: its CPUs, its memory, the GPUs this launcher hands out."""
        return self._capacity

    def start(self, launch: WorkerLaunch) -> int | None:
        env = {**os.environ, **launch.env, "PYTHONUNBUFFERED": "1"}
        if launch.env_dir is not None:
            env.update(environment_variables(launch, env))
            env.pop("PYTHONHOME", None)
        if launch.compute.mem_bytes is not None:
            # Read back by `adopt`: a server restarted mid-job keeps enforcing the limit.
            env[_MEM_LIMIT_ENV] = str(launch.compute.mem_bytes)
        if launch.compute.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                self.gpus.take(launch.worker_id, launch.compute.gpu)
            )
        elif self.gpus.devices:
            env["CUDA_VISIBLE_DEVICES"] = ""
        try:
            launch.log_path.parent.mkdir(parents=True, exist_ok=True)
            proc = self._fork(launch, env)
            if proc is None:
                popen = self._popen(launch, env)
                proc = _Proc(launch.job_id, launch.worker_id, popen, popen.pid)
        except BaseException:
            self.gpus.release(launch.worker_id)
            raise
        proc.mem_limit_bytes = launch.compute.mem_bytes
        with self._lock:
            self._procs[launch.worker_id] = proc
        return proc.pid

    def fork_server_ready(self, timeout_s: float = 0.0) -> bool:
        """Whether the server interpreter's fork server is ready to start workers (waiting up
        to `timeout_s` for it)."""
        server = self._fork_servers.get((sys.executable, None))
        return server is not None and server.wait_ready(timeout_s)

    def _fork(self, launch: WorkerLaunch, env: dict[str, str]) -> _Proc | None:
        """The worker forked by its interpreter's fork server; None where it cannot be."""
        if not self._use_fork_servers:
            return None
        server, new = self._fork_server_for(launch)
        if server is None or new:
            return None  # this one starts the old way while the fork server gets ready
        if server.dead:
            self._warn(f"its fork server {server.python} has exited")
            return None
        if not server.usable(env):
            return None  # not ready yet, or variables an interpreter reads as it starts
        try:
            pid = server.fork(launch.worker_id, env, launch.project_dir, launch.log_path)
        except OSError as err:
            self._warn(f"its fork server {server.python} failed: {err}")
            return None
        return _Proc(launch.job_id, launch.worker_id, None, pid, forked=server)

    def _fork_server_for(self, launch: WorkerLaunch | None) -> tuple[ForkServer | None, bool]:
        """The fork server of a worker's interpreter (None: the server's own), and whether it
        was started just now. It runs with what every worker of that interpreter shares."""
        python = sys.executable if launch is None else python_for(launch)
        key = (python, None if launch is None else launch.runtime_dir)
        with self._fork_lock:
            server = self._fork_servers.get(key)
            if server is not None:
                return server, False
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("PYTHONPATH", None)  # each worker has its own
            if launch is not None and launch.env_dir is not None:
                # The environment's variables; its PYTHONPATH: the worker's modules only.
                env.update(environment_variables(launch, env))
                env.pop("PYTHONHOME", None)
            try:
                server = self._fork_servers[key] = ForkServer(python, env)
            except OSError as err:
                self._warn(f"its fork server {python} cannot start: {err}")
                return None, True
            return server, True

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("a worker is started as a new interpreter: %s", why)

    def _popen(self, launch: WorkerLaunch, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(launch.log_path, "ab") as log_file:
            return subprocess.Popen(
                [python_for(launch), "-m", "cortex.worker"],
                cwd=launch.project_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own session: a stop signals the worker and anything it started, and a
                # Ctrl-C at the server's terminal does not reach it.
                start_new_session=True,
            )

    def adopt(self, job_id: str, worker_id: str, pid: int | None) -> bool:
        if pid is None:
            # Its pid was never recorded: it never got as far as its process, or the server
            # died between starting it and recording it. Found by its id, it is adopted: a
            # worker left running unwatched would hold capacity nobody counts.
            pid = _find_worker(worker_id)
            if pid is None:
                return False
        try:
            proc = psutil.Process(pid)
            ours = any("cortex.worker" in part for part in proc.cmdline())
            if not ours or proc.status() == psutil.STATUS_ZOMBIE:
                return False
            environ = worker_environ(proc)
            if environ.get("CORTEX_WORKER_ID") != worker_id:
                return False
        except (psutil.Error, OSError):
            return False
        self.gpus.hold(worker_id, gpus.parse(environ.get("CUDA_VISIBLE_DEVICES", "")))
        limit = environ.get(_MEM_LIMIT_ENV, "")
        with self._lock:
            self._procs[worker_id] = _Proc(
                job_id, worker_id, None, pid, int(limit) if limit else None
            )
        return True

    def poll(self) -> list[WorkerExit]:
        exits: list[WorkerExit] = []
        with self._lock:
            for worker_id, proc in self._procs.items():
                if proc.exit is not None:  # seen before, not recorded yet
                    exits.append(proc.exit)
                    continue
                if proc.mem_limit_bytes is not None and not proc.oom_detail:
                    _enforce_memory(proc)
                if proc.popen is not None:
                    code = proc.popen.poll()
                    if code is None:
                        continue
                elif proc.forked is not None and _reaped(proc):
                    code = proc.forked.exit_code(worker_id)[1]
                elif (proc.forked is not None and not proc.forked.dead) or _alive(proc.pid):
                    continue
                else:
                    code = None  # its fork server is gone, as is its exit code
                proc.exit = WorkerExit(
                    proc.job_id, worker_id, code, oom=bool(proc.oom_detail), detail=proc.oom_detail
                )
                exits.append(proc.exit)
                # Its devices are free now: a replacement started before the exit is
                # acknowledged can take them.
                self.gpus.release(worker_id)
        return exits

    def ack(self, worker_id: str) -> None:
        with self._lock:
            proc = self._procs.get(worker_id)
            if proc is not None and proc.exit is not None:
                del self._procs[worker_id]
                if proc.forked is not None:
                    proc.forked.forget(worker_id)

    def job_ids(self) -> set[str]:
        with self._lock:
            return {proc.job_id for proc in self._procs.values() if proc.exit is None}

    def stop_job(self, job_id: str, grace_s: float) -> None:
        with self._lock:
            procs = [p for p in self._procs.values() if p.job_id == job_id and p.exit is None]
        _stop(procs, grace_s)

    def stop_worker(self, worker_id: str, grace_s: float) -> bool:
        with self._lock:
            proc = self._procs.get(worker_id)
        if proc is None or proc.exit is not None:
            return False
        _stop([proc], grace_s)
        return True

    def close(self, grace_s: float) -> None:
        with self._lock:
            procs = [p for p in self._procs.values() if p.exit is None]
        _stop(procs, grace_s)
        self.poll()
        for server in self._fork_servers.values():
            server.close()


def worker_environ(proc: psutil.Process) -> dict[str, str]:
    """A worker process's variables: a forked worker's own (its `/proc/<pid>/environ` is its
    fork server's), or those it was started with."""
    forked = forkserver.environ_of(proc.pid)
    return forked if forked is not None else proc.environ()


def python_for(launch: WorkerLaunch) -> str:
    """The interpreter a worker runs in: its API's environment's, or the server's."""
    if launch.env_dir is None:
        return sys.executable
    return str(launch.env_dir / "bin" / "python")


def environment_variables(launch: WorkerLaunch, env: dict[str, str]) -> dict[str, str]:
    """What running in an API's environment changes in a worker's variables: the environment
    activated (its `bin` first on PATH, so a predictor's `subprocess.run(["python", ...])`
    gets it too), the worker's modules first on the path, nothing from the server's
    environment or the user's site folder."""
    assert launch.env_dir is not None
    python_path = [p for p in env.get("PYTHONPATH", "").split(":") if p]
    if launch.runtime_dir is not None:
        python_path.insert(0, str(launch.runtime_dir))
    return {
        "VIRTUAL_ENV": str(launch.env_dir),
        "PATH": f"{launch.env_dir / 'bin'}:{env.get('PATH', os.defpath)}",
        "PYTHONPATH": ":".join(python_path),
        "PYTHONNOUSERSITE": "1",
    }


def tree_rss_bytes(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _enforce_memory(proc: _Proc) -> None:
    assert proc.mem_limit_bytes is not None
    rss = tree_rss_bytes(proc.pid)
    if rss > proc.mem_limit_bytes:
        proc.oom_detail = (
            f"{rss / (1 << 20):.0f} MiB resident, over its limit of "
            f"{proc.mem_limit_bytes / (1 << 20):.0f} MiB"
        )
        _signal_group(proc.pid, signal.SIGKILL)


def _find_worker(worker_id: str) -> int | None:
    """The pid of a live worker process with this id, if there is one."""
    for proc in psutil.process_iter():
        try:
            if (
                proc.status() != psutil.STATUS_ZOMBIE
                and any("cortex.worker" in part for part in proc.cmdline())
                and worker_environ(proc).get("CORTEX_WORKER_ID") == worker_id
            ):
                return int(proc.pid)
        except psutil.Error:
            continue
    return None


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _reaped(proc: _Proc) -> bool:
    """A forked worker whose exit its fork server reported: its pid may be another's now."""
    return proc.forked is not None and proc.forked.exit_code(proc.worker_id)[0]


def _wait(proc: _Proc, timeout_s: float) -> None:
    try:
        if proc.popen is not None:
            proc.popen.wait(timeout_s)
        elif proc.forked is not None and not proc.forked.dead:
            proc.forked.wait_exit(proc.worker_id, timeout_s)
        else:
            psutil.Process(proc.pid).wait(timeout_s)
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        pass
    except psutil.Error:
        pass


def _stop(procs: list[_Proc], grace_s: float) -> None:
    for proc in procs:
        if not _reaped(proc):
            _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        _wait(proc, max(0.0, deadline - time.monotonic()))
    # Whatever is left in the worker's session, the worker included, is killed: a predictor's
    # own child processes must not outlive the job.
    for proc in procs:
        if not _reaped(proc):
            _signal_group(proc.pid, signal.SIGKILL)
    for proc in procs:
        if proc.popen is not None:
            proc.popen.wait()
        elif proc.forked is not None:
            _wait(proc, 5.0)
