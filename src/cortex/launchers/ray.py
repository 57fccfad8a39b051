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
import io
import logging
import os
import signal
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cortex import errors
from cortex.capacity import Resources
from cortex.launchers.base import WorkerExit, WorkerLaunch
from cortex.launchers.rayactor import WorkerActor

try:
    import ray.exceptions

    import ray
except ImportError as err:  # an optional dependency: only `--launcher ray` needs it
    raise errors.CortexError(
        "the ray launcher needs Ray: pip install 'cortex-batch[ray]' (or 'ray[default]')"
    ) from err

log = logging.getLogger("cortex.server")


NAMESPACE = "cortex"


def actor_name(worker_id: str) -> str:
    return f"cortex-{worker_id}"


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


# How long the cluster's resources, once read, are taken as they were.
_CAPACITY_TTL_S = 2.0


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
        self._capacity = Resources()
        self._capacity_at = -_CAPACITY_TTL_S

    # The cluster grows and shrinks (an autoscaler adds and removes nodes): never refuse a
    # worker for not fitting what it has now.
    fixed_capacity = False

    def capacity(self) -> Resources:
        """The cluster's resources as Ray reports them (its live nodes), read again every
        few seconds: a node an autoscaler adds is capacity from then on."""
        now = time.monotonic()
        if now - self._capacity_at >= _CAPACITY_TTL_S:
            total = ray.cluster_resources()
            self._capacity = Resources(
                cpu=float(total.get("CPU", 0.0)),
                mem=int(total.get("memory", 0)),
                gpu=int(total.get("GPU", 0)),
            )
            self._capacity_at = now
        return self._capacity

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

    def stop_worker(self, worker_id: str, grace_s: float) -> bool:
        with self._lock:
            worker = self._workers.get(worker_id)
        if worker is None:
            return False
        self._stop([worker], grace_s)
        return True

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
