"""Workers as Ray actors: the same worker entrypoint, placed by Ray with the API's compute.

Each worker is one actor, detached and named `cortex-<worker id>` (namespace `cortex`) so that a
restarted server finds it again, as the local launcher adopts its processes. The actor asks Ray
for the API's compute (`cpu` -> `num_cpus`, `gpu` -> `num_gpus`, `mem` -> `memory`) and gets
the API's project folder as its working folder through Ray's runtime environment. A node needs
only Ray and cortex-batch installed: the actor runs in the node's own Python.

Inside the actor, the worker is `python -m cortex.worker` in a subprocess, in its own process
session, as on the local launcher: exit codes, signals, a segfault's output and the memory
watchdog behave the same, and a predictor's crash never takes the actor down with it. The
actor's `wait()` returns the exit code and the tail of the raw output; a Ray error instead
(the actor killed, its node lost) is an exit whose code is unknown, which the reconciler treats
as a crashed worker: its leases are released and a replacement is started within the budget.

**Environments.** A project with `requirements.txt`, `dependencies.sh` or
`conda-packages.txt` runs its workers in an environment of its own on each node, made exactly
as the server makes it for the local launcher (`cortex.environments`, the same code): the
actor builds it from the project files that the runtime environment brought, under Ray's
session folder of the node (`runtime_resources/cortex/envs/<key>`, the key computed by the
server), once per node and key (a file lock: the other actors of the node wait for the first),
and starts the worker with that environment's Python, the worker's standard-library-only
modules first on its path. The build's output is the start of the worker's raw output; a
failed build is a worker that exits with code 1 before its predictor is loaded.

Ray's own `pip`/`uv` runtime-environment fields are not used, on purpose: Ray's virtualenv
inherits the node's packages (it clones the node's virtualenv, or sees its site-packages), and
the actor itself runs in it, so a user's pin of a package cortex or Ray needs (`pydantic<2`)
breaks the actor before any worker starts. Here the actor stays in the node's Python, and the
worker's environment holds only the user's packages, as on the local launcher. Environments
that no running worker of the node uses are removed, least recently used first, while the
node's folder is over its budget (20 GB).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cortex import envfiles, environments, errors, spec
from cortex.launchers.base import WorkerExit, WorkerLaunch

try:
    import ray.exceptions

    import ray
except ImportError as err:  # an optional dependency: only `--launcher ray` needs it
    raise errors.CortexError(
        "the ray launcher needs Ray: pip install 'cortex-batch[ray]' (or 'ray[default]')"
    ) from err

log = logging.getLogger("cortex.server")

NAMESPACE = "cortex"
# The raw output kept from a worker (what bypassed its log capture), as on the local launcher.
_OUTPUT_MAX_BYTES = 256 << 10
# A finished actor waits this long for the server to collect its result and kill it, then
# exits by itself: a server that is gone for good must not leave actors holding resources.
_LINGER_S = 300.0
_WATCH_PERIOD_S = 0.25
_PR_SET_PDEATHSIG = 1


def actor_name(worker_id: str) -> str:
    return f"cortex-{worker_id}"


def _die_with_parent() -> None:
    """In the worker subprocess, before exec: die when the actor does. Ray kills an actor with
    SIGKILL (`ray.kill`, a lost node), which would otherwise leave the worker running on."""
    with contextlib.suppress(Exception):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# Loaded before any fork: nothing is imported or looked up between fork and exec.
_LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


class WorkerActor:
    """One worker on a Ray node. Threaded (see `max_concurrency`): `wait` blocks while
    `terminate` runs."""

    def __init__(
        self,
        env: dict[str, str],
        mem_limit_bytes: int | None,
        log_path: str,
        env_key: str | None = None,
        env_extra: tuple[str, ...] = (),
    ) -> None:
        self.log_path = log_path
        self.mem_limit_bytes = mem_limit_bytes
        self._env = env
        self._env_key = env_key
        self._env_extra = tuple(env_extra)
        self._done = threading.Event()
        self._result: dict[str, Any] = {}
        self._oom_detail = ""
        self._popen: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._start_lock = threading.Lock()
        self._in_use: Any = None  # the environment's in-use lock, held for the actor's life
        # Actors of one job share the unpacked working folder: the raw output goes elsewhere.
        self._tmp = Path(tempfile.mkdtemp(prefix="cortex-worker-"))
        self._output = self._tmp / "output.log"
        self._cwd = os.getcwd()  # the API's project, unpacked by Ray's runtime environment
        # The environment may take minutes to build: the worker starts from a thread, so that
        # `wait` and `terminate` are answered meanwhile.
        threading.Thread(target=self._run, name="cortex-worker", daemon=True).start()

    def _run(self) -> None:
        try:
            command, env = self._command()
        except Exception as err:
            if self._stopping:  # its build was stopped with it
                self._finish(-signal.SIGTERM)
                return
            if not isinstance(err, _NotStarted):
                with open(self._output, "a") as out:
                    out.write("the Ray actor could not start the worker:\n")
                    out.write(traceback.format_exc())
            self._finish(1)
            return
        with self._start_lock:
            if self._stopping:  # stopped while its environment was built
                self._finish(-signal.SIGTERM)
                return
            with open(self._output, "ab") as out:
                self._popen = subprocess.Popen(
                    command,
                    cwd=self._cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if _LIBC is not None else None,
                )
        self._watch(self._popen)

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The worker's command line and environment variables, on this node."""
        env = dict(self._env)
        # Project-relative entries (the project and its python_path) resolve here, on this node.
        python_path = [
            os.path.join(self._cwd, p) for p in env.pop("PYTHONPATH", "").split(":") if p
        ]
        child_env = {
            **os.environ,  # Ray's, CUDA_VISIBLE_DEVICES for the GPUs it assigned included
            **env,
            "PYTHONUNBUFFERED": "1",
            "CORTEX_PROJECT_DIR": self._cwd,
            "CORTEX_RAY_NODE_ID": ray.get_runtime_context().get_node_id(),
        }
        if self._env_key is None:
            # No environment of its own: the node's Python, as the actor's.
            if os.environ.get("PYTHONPATH"):
                python_path.append(os.environ["PYTHONPATH"])
            child_env["PYTHONPATH"] = ":".join(python_path)
            return [sys.executable, "-m", "cortex.worker"], child_env
        env_dir, runtime = self._prepare(self._env_key)
        # As the local launcher's `environment_variables`: the environment activated, the
        # worker's modules first on the path, nothing of the node's Python or user site folder.
        child_env.update(
            VIRTUAL_ENV=str(env_dir),
            PATH=f"{env_dir / 'bin'}:{child_env.get('PATH', os.defpath)}",
            PYTHONPATH=":".join([str(runtime), *python_path]),
            PYTHONNOUSERSITE="1",
        )
        child_env.pop("PYTHONHOME", None)
        return [str(env_dir / "bin" / "python"), "-m", "cortex.worker"], child_env

    def _prepare(self, key: str) -> tuple[Path, Path]:
        """The API's environment on this node, built if it is not yet (by this actor, or by
        another of this node that holds the build's lock); its output goes to the raw output.
        Raises `_NotStarted` if the build fails."""
        folder = node_folder()
        envs = environments.Environments(folder / "envs", folder / "cache")
        envs.root.mkdir(parents=True, exist_ok=True)
        # Held (shared) while this actor lives: no other actor's clean-up removes it.
        self._in_use = open(envs.root / f"{key}{_IN_USE}", "a")  # noqa: SIM115
        fcntl.flock(self._in_use, fcntl.LOCK_SH)
        status = envs.status(key)
        if status.state != environments.READY:
            started = time.monotonic()
            envs.build(key, Path(self._cwd), extra=self._env_extra)
            status = envs.wait(key)
            took = time.monotonic() - started
            with open(self._output, "a") as out:
                out.write(f"environment {key} on this Ray node ({envs.path(key)}):\n")
                offset, more = 0, True
                while more:  # the whole log, a chunk at a time
                    lines, after = envs.log_lines(key, offset)
                    out.writelines(f"{line}\n" for line in lines)
                    more, offset = after != offset, after
                if status.state == environments.READY:
                    out.write(f"environment {key}: ready on this Ray node after {took:.1f} s\n")
                else:
                    out.write(
                        f"environment {key}: failed to build on this Ray node after "
                        f"{took:.1f} s: {status.message}\n"
                    )
            if status.state != environments.READY:
                raise _NotStarted(1)
        if envs.python(key) is None:  # marks it used now
            with open(self._output, "a") as out:
                out.write(f"environment {key}: removed from this Ray node while starting\n")
            raise _NotStarted(1)
        with contextlib.suppress(OSError):
            envs.prune(_in_use(envs.root))
        return envs.path(key), envfiles.runtime_dir(envs.root)

    def _watch(self, popen: subprocess.Popen[bytes]) -> None:
        from cortex.launchers.local import tree_rss_bytes

        while True:
            try:
                code = popen.wait(_WATCH_PERIOD_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if self.mem_limit_bytes is not None and not self._oom_detail:
                rss = tree_rss_bytes(popen.pid)
                if rss > self.mem_limit_bytes:
                    self._oom_detail = (
                        f"{rss / (1 << 20):.0f} MiB resident, over its limit of "
                        f"{self.mem_limit_bytes / (1 << 20):.0f} MiB"
                    )
                    self._signal(signal.SIGKILL)
        self._signal(signal.SIGKILL)  # whatever the predictor started goes with it
        self._finish(code)

    def _finish(self, code: int) -> None:
        self._result = {
            "exit_code": code,
            "oom": bool(self._oom_detail),
            "detail": self._oom_detail,
            "output": _tail(self._output),
            "log_path": self.log_path,
        }
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done.set()
        time.sleep(_LINGER_S)
        os._exit(0)

    def _signal(self, sig: signal.Signals) -> None:
        """To the worker's session; before it started, to the build's steps (each a session
        of its own, child of this actor): another actor that waits for the same environment
        then builds it itself."""
        if self._popen is not None:
            groups = [self._popen.pid]
        else:
            groups = []
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process().children():
                    with contextlib.suppress(OSError):
                        if os.getpgid(child.pid) == child.pid:
                            groups.append(child.pid)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)

    def wait(self) -> dict[str, Any]:
        """The worker's exit: code, whether it was over its memory, its raw output's tail."""
        self._done.wait()
        return self._result

    def terminate(self, grace_s: float) -> None:
        """SIGTERM to the worker's session, SIGKILL after `grace_s`, as the local launcher. A
        worker whose environment is being built is not started, and the build is stopped."""
        with self._start_lock:
            self._stopping = True
        self._signal(signal.SIGTERM)
        if not self._done.wait(grace_s):
            self._signal(signal.SIGKILL)
            self._done.wait(5)


class _NotStarted(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# Beside each environment on a node: held (shared) by every actor whose worker uses it.
_IN_USE = ".inuse"


def node_folder() -> Path:
    """Where this Ray node keeps the API environments: in its Ray session's folder, beside
    Ray's own runtime environments (a new session of the cluster starts with none)."""
    with contextlib.suppress(Exception):
        node = ray._private.worker.global_worker.node
        return Path(node.get_runtime_env_dir_path()) / "cortex"
    return Path(tempfile.gettempdir()) / f"cortex-ray-{os.getuid()}"


def _in_use(root: Path) -> set[str]:
    """The environments of this node that a live actor holds."""
    held = set()
    for path in root.glob(f"*{_IN_USE}"):
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                held.add(path.name[: -len(_IN_USE)])
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
    return held


def _tail(path: Path) -> bytes:
    try:
        with open(path, "rb") as raw:
            raw.seek(0, os.SEEK_END)
            raw.seek(max(0, raw.tell() - _OUTPUT_MAX_BYTES))
            return raw.read()
    except OSError:
        return b""


def _upload_project(project: Path) -> str:
    """The project folder as a package in the cluster's store (GCS), where every node's
    runtime environment agent fetches and caches it; returns its `gcs://` URI.

    A local folder is only accepted as a job-wide working_dir (`ray.init`), and the jobs of one
    server need different ones; so the folder is zipped and uploaded here with Ray's own
    packaging functions, under a name made of the spec id (a digest of the spec and the
    project), as `ray.init` would name it by a hash of the contents. Ray keeps a package while
    runtime environments use it, and may drop it some minutes after: hence the check each time.
    """
    from ray._private.runtime_env import packaging

    uri = f"gcs://_ray_pkg_{project.name}.zip"
    if not packaging.package_exists(uri):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(project.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    # A fixed date: unpacked projects carry none (zip cannot say 1970).
                    entry = zipfile.ZipInfo(path.relative_to(project).as_posix())
                    entry.external_attr = (path.stat().st_mode & 0o777) << 16
                    entry.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(entry, path.read_bytes())
        packaging.upload_package_to_gcs(uri, buffer.getvalue())
    return uri


@dataclass
class _Worker:
    job_id: str
    actor: Any  # ray.actor.ActorHandle
    exited: Any  # ray.ObjectRef of actor.wait()


def check_address(address: str) -> None:
    if not address:
        raise errors.CortexError(
            "the ray launcher needs the Ray cluster's address: set --ray-address "
            "(CORTEX_RAY_ADDRESS) or RAY_ADDRESS, e.g. head:6379 or ray://head:10001"
        )


class RayLauncher:
    def __init__(self, address: str) -> None:
        check_address(address)
        if not ray.is_initialized():
            # ray.init sets its own SIGTERM handler (sys.exit): the server's must stay in
            # place, or a stop would not shut uvicorn down in order.
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            ray.init(
                address=address,
                namespace=NAMESPACE,
                log_to_driver=False,  # workers' lines reach the job's log over HTTP
                logging_level=logging.WARNING,
            )
            if threading.current_thread() is threading.main_thread():
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
        # Threads: `wait` blocks for the worker's life while `terminate` must still get in.
        self._actor_cls = ray.remote(max_concurrency=4, max_restarts=0)(WorkerActor)
        self._workers: dict[str, _Worker] = {}
        # Exits seen and not acknowledged yet (see `poll`), by worker id.
        self._exited: dict[str, WorkerExit] = {}
        self._lock = threading.Lock()

    def reserve(self, job_id: str, compute: spec.Compute, workers: int) -> None:
        """Nothing is refused or held: Ray queues an actor until a node has its resources (the
        worker stays `pending`), and an autoscaler may add that node."""

    def unreserve(self, job_id: str) -> None:
        pass

    def start(self, launch: WorkerLaunch) -> int | None:
        project = launch.project_dir
        # Only the project travels: the actor builds the API's environment on its node from
        # the project's files (`launch.env_dir` and `runtime_dir` are this machine's).
        runtime_env: dict[str, Any] = {"working_dir": _upload_project(project)}
        env = dict(launch.env)
        env.pop("CORTEX_PROJECT_DIR", None)  # the actor's working folder, on its node
        env["PYTHONPATH"] = ":".join(
            os.path.relpath(p, project) if Path(p).is_relative_to(project) else p
            for p in env.get("PYTHONPATH", "").split(":")
            if p
        )
        compute = launch.compute
        options: dict[str, Any] = {
            "name": actor_name(launch.worker_id),
            "namespace": NAMESPACE,
            # Outlives this server process, as local workers do; a restarted server adopts it.
            "lifetime": "detached",
            "num_cpus": round(compute.cpu_cores, 4),
            "num_gpus": compute.gpu,
            # The token travels as an argument, not in runtime_env env_vars, which the Ray
            # dashboard shows to anyone who can see the cluster.
            "runtime_env": runtime_env,
        }
        if compute.mem_bytes is not None:
            options["memory"] = compute.mem_bytes
        actor = self._actor_cls.options(**options).remote(
            # The environment as the server defines it (key and the model runtime it adds).
            env,
            compute.mem_bytes,
            str(launch.log_path),
            launch.env_key,
            launch.env_extra,
        )
        with self._lock:
            self._workers[launch.worker_id] = _Worker(launch.job_id, actor, actor.wait.remote())
        return None  # the worker reports its pid itself, once its actor is placed

    def adopt(self, job_id: str, worker_id: str, pid: int | None) -> bool:
        """By the actor's name, whatever `pid` says: an actor still waiting for a node (its
        worker never reported a pid) is adopted too, and placed by Ray in its time."""
        try:
            actor = ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)
        except ValueError:
            return False
        with self._lock:
            self._workers[worker_id] = _Worker(job_id, actor, actor.wait.remote())
        return True

    def poll(self) -> list[WorkerExit]:
        """New exits are read once (the worker's output is written to its log file then) and
        kept, with the ones not acknowledged yet, until `ack`."""
        with self._lock:
            workers = dict(self._workers)
        if workers:
            refs = {w.exited: worker_id for worker_id, w in workers.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ready:
                worker_id = refs[ref]
                worker = workers[worker_id]
                ended = self._exit(worker_id, worker, ref)
                with contextlib.suppress(Exception):
                    ray.kill(worker.actor, no_restart=True)
                with self._lock:
                    self._workers.pop(worker_id, None)
                    self._exited[worker_id] = ended
        with self._lock:
            return list(self._exited.values())

    def ack(self, worker_id: str) -> None:
        with self._lock:
            self._exited.pop(worker_id, None)

    def _exit(self, worker_id: str, worker: _Worker, ref: Any) -> WorkerExit:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as err:
            # The actor died (killed, its node lost, its runtime environment failed to set
            # up): the worker's exit code cannot be known.
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            detail = f"was lost with its Ray actor ({type(err).__name__}: {first})"
            return WorkerExit(worker.job_id, worker_id, None, detail=detail)
        output: bytes = result["output"]
        if output:
            log_path = Path(result["log_path"])
            with contextlib.suppress(OSError):
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_path.write_bytes(output)
        return WorkerExit(
            worker.job_id,
            worker_id,
            result["exit_code"],
            oom=result["oom"],
            detail=result["detail"],
        )

    def job_ids(self) -> set[str]:
        with self._lock:
            return {w.job_id for w in self._workers.values()}

    def stop_job(self, job_id: str, grace_s: float) -> None:
        with self._lock:
            workers = [w for w in self._workers.values() if w.job_id == job_id]
        self._stop(workers, grace_s)

    def close(self, grace_s: float) -> None:
        with self._lock:
            workers = list(self._workers.values())
        self._stop(workers, grace_s)
        self.poll()

    def _stop(self, workers: list[_Worker], grace_s: float) -> None:
        if not workers:
            return
        asked = [w.actor.terminate.remote(grace_s) for w in workers]
        # A worker still waiting for resources never answers: Ray kills it below all the same.
        ray.wait(asked, num_returns=len(asked), timeout=grace_s + 5)
        # Let the exits be collected with their codes before the actors go.
        exited = [w.exited for w in workers]
        ray.wait(exited, num_returns=len(exited), timeout=2)
        for worker in workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)
