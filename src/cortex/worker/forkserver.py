"""A warm parent for local worker processes: `python -m cortex.worker.forkserver`.

Starting a worker as a new interpreter costs an interpreter start plus about 50 ms of imports
(`cortex.worker.runtime`: http.client, logging, typing, json, ...) before it polls for
batches, and two workers booting together compete with the server for the CPUs. The local
launcher instead keeps one of these per worker interpreter (the server's own, and each API
environment's): it imports the runtime once, then forks a child per worker, which is polling
within milliseconds. It is `multiprocessing`'s "forkserver" start method, cut down to what a
worker needs. Standard library only: it runs in API environments too.

It stays single-threaded (a fork copies only the calling thread; a lock held by another thread
would stay held forever in the child). The launcher speaks to it over its stdin and stdout, one
JSON object a line:

    launcher -> {"id": worker_id, "env": {...}, "cwd": path, "log": path}
    <- {"ready": pid}                  once, when the runtime is imported
    <- {"id": worker_id, "pid": pid}   the worker's process, forked
    <- {"id": worker_id, "error": why} nothing forked (the launcher starts it another way)
    <- {"id": worker_id, "exit": code} the worker ended: its code as `Popen.returncode` gives
                                        it (negative: the number of the signal that killed it)

It is the workers' parent, so it reaps them and reports their exits. At end of file on its
stdin (the server closed it, or died) it exits without touching its children: each worker has
its own session and goes on, as one the server started itself would.

A forked worker's `/proc/<pid>/environ` is the fork server's, not its own: the child keeps its
variables in a memory file named `ENVIRON_MARKER` too, read by `environ_of`, so that a
restarted server can still tell which worker a process is and its memory limit.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import select
import signal
import sys
import time
import types
from typing import Any

ENVIRON_MARKER = "cortex-worker-environ"


def environ_of(pid: int) -> dict[str, str] | None:
    """The variables a fork server gave its child `pid`; None for any other process."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            if not os.readlink(f"{fd_dir}/{fd}").startswith(f"/memfd:{ENVIRON_MARKER}"):
                continue
            with open(f"{fd_dir}/{fd}", "rb") as marker:
                data = marker.read()
        except OSError:
            continue
        text = data.decode(errors="replace")
        return dict(entry.split("=", 1) for entry in text.split("\0") if "=" in entry)
    return None


def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data) :]


class _Child(Exception):
    """Raised in a freshly forked child: leave the server's loop and become the worker."""

    def __init__(self, request: dict[str, Any], log_fd: int, started: tuple[int, int]) -> None:
        super().__init__()
        self.request = request
        self.log_fd = log_fd
        self.started = started


def main() -> int:
    # The point of this process: the worker's modules imported once, before any fork.
    from cortex.worker import runtime  # noqa: F401

    # What is imported now is shared by every child: kept out of their collections, which
    # would otherwise walk it and copy the pages they touch (as the `gc.freeze` docs advise
    # for a server that forks workers).
    gc.freeze()

    # The protocol gets file descriptors of its own; a stray print (a warning at import) goes
    # to stderr rather than into the replies, and stdin is /dev/null for the children.
    requests, replies = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    # SIGCHLD wakes the loop (through the wakeup pipe) to reap a worker as soon as it ends.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    own = (requests, replies, wake_r, wake_w)
    try:
        _serve(requests, replies, wake_r)
    except _Child as child:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in own:
            os.close(fd)
        return _become_worker(child)
    except BrokenPipeError:  # the launcher is gone
        pass
    return 0


def _serve(requests: int, replies: int, wake_r: int) -> None:
    children: dict[int, str] = {}
    _send(replies, {"ready": os.getpid()})
    pending = b""
    while True:
        readable = select.select([requests, wake_r], [], [])[0]
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap(children, replies)
        if requests not in readable:
            continue
        chunk = os.read(requests, 1 << 20)
        if not chunk:
            return  # the launcher closed its end: the workers carry on without us
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            worker_id = request["id"]
            try:
                pid = _fork(request)
            except OSError as err:
                _send(replies, {"id": worker_id, "error": f"{err.__class__.__name__}: {err}"})
                continue
            children[pid] = worker_id
            _send(replies, {"id": worker_id, "pid": pid})


def _reap(children: dict[int, str], replies: int) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        worker_id = children.pop(pid, None)
        if worker_id is not None:
            _send(replies, {"id": worker_id, "exit": os.waitstatus_to_exitcode(status)})


def _fork(request: dict[str, Any]) -> int:
    """Fork the worker; what can fail before the fork (its folder, its log file) is an error
    for the launcher, as it would be for `subprocess.Popen`."""
    if not os.path.isdir(request["cwd"]):
        raise FileNotFoundError(f"no such folder: {request['cwd']!r}")
    fds: list[int] = []
    try:
        fds.append(os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666))
        fds.extend(os.pipe())
        pid = os.fork()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    log_fd, started_r, started_w = fds
    if pid == 0:
        raise _Child(request, log_fd, (started_r, started_w))
    # Its pid is handed out once the child is set up, as `Popen` returns once its child has
    # run `exec`: a stop at once must reach it by its process group, its variables be read.
    os.close(started_w)
    os.read(started_r, 1)  # end of file: the child closed its end, or died
    for fd in (log_fd, started_r):
        os.close(fd)
    return pid


def _become_worker(child: _Child) -> int:
    """In the child: set up the process as `subprocess.Popen` and a fresh interpreter would
    have it for `python -m cortex.worker`, then run the worker."""
    # Its own session: a stop signals the worker and anything it starts.
    os.setsid()
    # Unbuffered output to the log, as the fork server's own sys.stdout and sys.stderr are
    # (it runs with PYTHONUNBUFFERED); stdin is /dev/null already.
    os.dup2(child.log_fd, 1)
    os.dup2(child.log_fd, 2)
    os.close(child.log_fd)
    os.chdir(child.request["cwd"])
    env: dict[str, str] = child.request["env"]
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    # The copy of its variables that `environ_of` reads, there before its pid is handed out
    # (only the child ever holds one: the fork server is never taken for a worker). Open for
    # the life of the process; closed on exec.
    marker = os.memfd_create(ENVIRON_MARKER)
    os.write(marker, b"\0".join(f"{k}={v}".encode(errors="replace") for k, v in env.items()))
    for fd in child.started:
        os.close(fd)  # the fork server hands out its pid now
    # The module search path `python -m` would build: the working folder, then PYTHONPATH,
    # then the interpreter's own folders (what is left of the fork server's path).
    served = _pythonpath(os.environ.get("PYTHONPATH", ""))
    sys.path[:] = _unique([os.getcwd(), *served, *_INTERPRETER_PATH])
    sys.argv[:] = [os.path.join(os.path.dirname(__file__), "__main__.py")]
    # `__main__` as `python -m cortex.worker` has it (multiprocessing's spawn looks there).
    main_module = types.ModuleType("__main__")
    main_module.__file__ = sys.argv[0]
    main_module.__spec__ = importlib.util.find_spec("cortex.worker.__main__")
    sys.modules["__main__"] = main_module
    from cortex.worker import runtime

    return runtime.main()


def _pythonpath(value: str) -> list[str]:
    return [os.path.abspath(entry) for entry in value.split(os.pathsep) if entry]


def _unique(paths: list[str]) -> list[str]:
    return list(dict.fromkeys(paths))


# The interpreter's own module folders: this process's path without its first entry (`-m`
# puts the working folder there) and without its PYTHONPATH, which a worker replaces.
_INTERPRETER_PATH = [
    path for path in sys.path[1:] if path not in set(_pythonpath(os.environ.get("PYTHONPATH", "")))
]

if __name__ == "__main__":
    sys.exit(main())
