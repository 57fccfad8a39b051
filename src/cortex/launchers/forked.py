"""The local launcher's side of a fork server (`cortex.worker.forkserver`): start one, ask it
for workers, learn their exits.

A fork server is started once per worker interpreter with the variables every worker of that
interpreter shares; a worker's own variables travel with its request and replace the child's
`os.environ`. What an interpreter reads only as it starts (PYTHONHASHSEED, PYTHONOPTIMIZE, the
locale, LD_PRELOAD, ...) cannot be replaced after a fork: a worker whose variables change one
of those is started the old way (`subprocess.Popen`), as is any worker when the fork server is
not ready, is gone, or fails a request. The launcher never fails a start on its account.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("cortex")

# How long a request may wait for its reply before the fork server is taken for hung.
_REPLY_TIMEOUT_S = 10.0

# Variables an interpreter (or the C library) reads only as it starts. PYTHONPATH is not among
# them: the child rebuilds its module path from the worker's.
_STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_")
_STARTUP_NAMES = frozenset({"LANG", "LC_ALL", "LC_CTYPE", "GLIBC_TUNABLES"})
_REPLACEABLE = frozenset({"PYTHONPATH"})


def startup_variables(env: Mapping[str, str]) -> dict[str, str]:
    return {
        key: value
        for key, value in env.items()
        if key not in _REPLACEABLE and (key.startswith(_STARTUP_PREFIXES) or key in _STARTUP_NAMES)
    }


class ForkServer:
    """One fork server process and the replies it sends, read by a thread of its own."""

    def __init__(self, python: str, env: dict[str, str]) -> None:
        self.python = python
        self._startup = startup_variables(env)
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._ready = False
        self._dead = False
        self._pids: dict[str, int | str] = {}  # worker id -> its pid, or why none
        self._exits: dict[str, int] = {}  # worker id -> its exit code
        self._process = subprocess.Popen(
            [python, "-m", "cortex.worker.forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            # Not a folder of any project: `-m` puts it first on the module path.
            cwd="/",
            # A Ctrl-C at the server's terminal is the server's to handle; this process ends
            # when the server closes its stdin (or dies).
            start_new_session=True,
        )
        threading.Thread(target=self._read, name="cortex-forkserver", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def usable(self, env: Mapping[str, str]) -> bool:
        """Whether it can start a worker with these variables now (it is not ready yet while
        it imports the runtime: a worker started meanwhile is started the old way)."""
        with self._cond:
            if not self._ready or self._dead:
                return False
        return startup_variables(env) == self._startup

    @property
    def dead(self) -> bool:
        with self._cond:
            return self._dead

    def wait_ready(self, timeout_s: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._dead, timeout_s)
            return self._ready and not self._dead

    def fork(self, worker_id: str, env: dict[str, str], cwd: Path, log_path: Path) -> int:
        """The pid of a new worker process; raises OSError where none was started."""
        request = {"id": worker_id, "env": env, "cwd": str(cwd), "log": str(log_path)}
        data = json.dumps(request).encode() + b"\n"
        stdin = self._process.stdin
        assert stdin is not None
        with self._cond:
            self._pids.pop(worker_id, None)
            self._exits.pop(worker_id, None)
        try:
            with self._write_lock:
                stdin.write(data)
                stdin.flush()
        except (OSError, ValueError) as err:
            raise OSError(f"the fork server is gone: {err}") from None
        with self._cond:
            self._cond.wait_for(lambda: worker_id in self._pids or self._dead, _REPLY_TIMEOUT_S)
            reply = self._pids.pop(worker_id, None)
            hung = reply is None and not self._dead
        if hung:
            # Killed, so that it cannot start the worker after the launcher started another.
            self.kill()
            with self._cond:
                reply = self._pids.pop(worker_id, None)
        if isinstance(reply, int):
            return reply
        raise OSError(reply or "the fork server did not start the worker")

    def exit_code(self, worker_id: str) -> tuple[bool, int | None]:
        """(True, its code) once the worker's exit is reported; (False, None) while it is not,
        with the fork server alive to report it."""
        with self._cond:
            if worker_id in self._exits:
                return True, self._exits[worker_id]
            return False, None

    def forget(self, worker_id: str) -> None:
        with self._cond:
            self._exits.pop(worker_id, None)

    def wait_exit(self, worker_id: str, timeout_s: float) -> bool:
        """Whether the worker's exit was reported within `timeout_s` (False at once where the
        fork server is gone and will report nothing)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: worker_id in self._exits or self._dead, timeout_s
            ) and (worker_id in self._exits)

    def close(self, timeout_s: float = 5.0) -> None:
        """End it: at end of file on its stdin it exits, leaving any worker it started running."""
        with self._write_lock, contextlib.suppress(OSError, ValueError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self._process.kill()
        self._process.wait()
        deadline = time.monotonic() + 5.0
        with self._cond:  # the replies it wrote before it died are still read
            self._cond.wait_for(lambda: self._dead, max(0.0, deadline - time.monotonic()))

    def _read(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        try:
            for line in stdout:
                self._reply(json.loads(line))
        except (OSError, ValueError) as err:
            log.warning("fork server %s: unreadable reply: %s", self.python, err)
        finally:
            with self._cond:
                self._dead = True
                self._cond.notify_all()
            with contextlib.suppress(OSError):
                stdout.close()
            self._process.wait()

    def _reply(self, message: dict[str, Any]) -> None:
        with self._cond:
            if "ready" in message:
                self._ready = True
            elif "pid" in message:
                self._pids[message["id"]] = int(message["pid"])
            elif "error" in message:
                self._pids[message["id"]] = str(message["error"])
            elif "exit" in message:
                self._exits[message["id"]] = int(message["exit"])
            self._cond.notify_all()
