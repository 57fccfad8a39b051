"""The Ray actor that is one worker on its node: it builds the API's environment there if it
must (`cortex.environments`, once per node and key), starts `python -m cortex.worker` in a
session of its own, watches its memory, and reports its exit. `cortex.launchers.ray` places
these actors and collects their exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
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
from pathlib import Path
from typing import Any

import psutil

from cortex import envfiles, environments, errors

try:
    import ray.exceptions

    import ray
except ImportError as err:  # an optional dependency: only `--launcher ray` needs it
    raise errors.CortexError(
        "the ray launcher needs Ray: pip install 'cortex-batch[ray]' (or 'ray[default]')"
    ) from err

log = logging.getLogger("cortex.server")


# The raw output kept from a worker (what bypassed its log capture), as on the local launcher.
_OUTPUT_MAX_BYTES = 256 << 10
# A finished actor waits this long for the server to collect its result and kill it, then
# exits by itself: a server that is gone for good must not leave actors holding resources.
_LINGER_S = 300.0
_WATCH_PERIOD_S = 0.25
_PR_SET_PDEATHSIG = 1


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
