"""Each API version's own Python environment: built from the project's files, keyed by their
content, shared by the versions that match, and removed when nothing uses it.

A project folder that holds `requirements.txt`, `dependencies.sh` or `conda-packages.txt` runs
its workers in an environment of its own, isolated from the server's packages and from every
other API; a project with none of them runs in the server's own interpreter, as before.

- **Key.** A digest of those three files, the Python version and this package's version. Two
  API versions with the same files share one environment, so a redeploy of unchanged
  requirements is a cache hit (no installer runs).
- **Build.** In `<data>/envs/<key>/`: `uv venv` (or `python -m venv` where uv is missing),
  then `dependencies.sh` with the environment activated, then `conda-packages.txt` (conda or
  micromamba), then `uv pip install -r requirements.txt` (or pip), with download caches under
  `<data>/cache/`. The installer's output goes to `<data>/envs/<key>.log`. A marker file,
  written last, makes the environment ready: nothing half-built is ever used. A build holds a
  file lock, so two servers on one data folder never build one key twice at once.
- **Worker runtime.** `cortex.worker` needs only the standard library: its modules are copied
  to `<data>/envs/runtime-<digest>/` and put first on a worker's `PYTHONPATH`, so a worker runs
  in an environment that holds only the user's packages, pins of pydantic or anything else of
  the server's included.
- **Removal.** Environments used by no API version and no in-progress job are removed, least
  recently used first, while the folder is over its budget (`CORTEX_ENV_CACHE_BYTES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dotenv.parser

import cortex
from cortex import errors, project

log = logging.getLogger("cortex.server")

REQUIREMENTS = "requirements.txt"
DEPENDENCIES = "dependencies.sh"
CONDA_PACKAGES = "conda-packages.txt"
# The files that define an environment, in the order a build uses them.
ENV_FILES = (DEPENDENCIES, CONDA_PACKAGES, REQUIREMENTS)
DOTENV = ".env"
# A process's environment and arguments share about 2 MiB on Linux (ARG_MAX): a `.env` must
# leave room for the rest.
MAX_DOTENV_BYTES = 256 << 10
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Written last into a built environment: its presence is what "ready" means.
_MARKER = "cortex-env.json"
# The worker's modules, relative to the `cortex` package: standard library only.
_RUNTIME_MODULES = (
    "__init__.py",
    "predictor.py",
    "worker/__init__.py",
    "worker/__main__.py",
    "worker/logship.py",
    "worker/models.py",
    "worker/queue.py",
    "worker/runtime.py",
)
# A build's log: what one read of it returns, and the most kept (a script printing without
# end must not fill the disk; the last lines still make the error message).
_LOG_READ_BYTES = 256 << 10
_LOG_MAX_BYTES = 16 << 20
# Builds at once: each runs an installer that uses the network, the disk and a core.
_PARALLEL_BUILDS = 2
# The last lines of a failed step's output make the build's error message.
_ERROR_LINES = 25
_ERROR_CHARS = 4000

READY = "ready"
BUILDING = "building"
FAILED = "failed"
MISSING = "missing"  # not built on this machine (yet, or any more)
NONE = "none"  # the project needs no environment: the server's interpreter runs it


class BuildError(Exception):
    """A step of a build failed; the message is what the installer (or script) said."""


@dataclasses.dataclass(frozen=True)
class Status:
    key: str | None
    state: str
    message: str | None = None
    duration_s: float | None = None
    ended_at: float | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def python_tag() -> str:
    """The interpreter environments are built for: part of every key."""
    version = ".".join(str(part) for part in sys.version_info[:3])
    return f"{sys.implementation.name}-{version}-{platform.machine()}"


# The model runtime each predictor type needs, installed unless requirements.txt names one:
# (the package without GPUs, with GPUs, the names that count as naming it).
_RUNTIMES = {
    "onnx": ("onnxruntime", "onnxruntime-gpu", ("onnxruntime",)),
    "tensorflow": (
        "tensorflow-cpu",
        "tensorflow",
        ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly", "tensorflow-intel"),
    ),
}


def requirement_names(text: str) -> set[str]:
    """The distribution names a requirements file asks for, normalised (PEP 503)."""
    names = set()
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if match:
            names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def runtime_requirements(predictor_type: str, gpu: int, project_dir: Path) -> tuple[str, ...]:
    """What the server adds to an API's environment for its predictor type: ONNX Runtime or
    TensorFlow (their GPU builds with `compute.gpu`), unless requirements.txt names them."""
    if predictor_type not in _RUNTIMES:
        return ()
    cpu_package, gpu_package, names = _RUNTIMES[predictor_type]
    path = project_dir / REQUIREMENTS
    asked = requirement_names(path.read_text(errors="replace")) if path.is_file() else set()
    if asked & set(names):
        return ()
    return (gpu_package if gpu else cpu_package,)


def key_for(project_dir: Path, extra: tuple[str, ...] = ()) -> str | None:
    """The environment a project needs, named by the content of what defines it and the
    `extra` requirements the server adds (a model runtime); None if there is nothing to
    install (the server's interpreter runs it)."""
    digest = hashlib.sha256(f"cortex-env-1\0{cortex.__version__}\0{python_tag()}\0".encode())
    digest.update(("extra\0" + "\0".join(extra) + "\0").encode())
    found = bool(extra)
    for name in ENV_FILES:
        path = project_dir / name
        if path.is_file():
            found = True
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
        else:
            digest.update(f"{name}\0-\0".encode())
    return digest.hexdigest()[:24] if found else None


def conda_tool() -> str | None:
    """The conda-compatible installer on PATH, if any."""
    for name in ("micromamba", "mamba", "conda"):
        found = shutil.which(name)
        if found:
            return found
    return None


def read_dotenv(text: str, source: str = DOTENV) -> dict[str, str]:
    """A `.env` file's variables, as python-dotenv reads them (`NAME=value`, `export NAME=...`,
    `#` comments, single- or double-quoted values; no `${VAR}` expansion). A line that does not
    parse, or a name starting with CORTEX_ (the server's own), is refused with its line."""
    values: dict[str, str] = {}
    for binding in dotenv.parser.parse_stream(io.StringIO(text)):
        # A binding's text starts with the blank lines before it: its line is after them.
        original = binding.original.string
        skipped = original[: len(original) - len(original.lstrip())]
        line = binding.original.line + skipped.count("\n")
        if binding.error:
            shown = binding.original.string.strip()[:80]
            raise errors.InvalidSpec(f"{source}: line {line}: cannot be read: {shown!r}")
        if binding.key is None:
            continue  # a blank line or a comment
        if not _ENV_NAME.fullmatch(binding.key):
            raise errors.InvalidSpec(
                f"{source}: line {line}: {binding.key[:80]!r} is not a valid environment "
                "variable name (letters, digits and _, not starting with a digit)"
            )
        if binding.key.upper().startswith("CORTEX_"):
            raise errors.InvalidSpec(
                f"{source}: line {line}: {binding.key}: names starting with CORTEX_ are "
                "reserved for the server"
            )
        if "\0" in (binding.value or ""):
            raise errors.InvalidSpec(f"{source}: line {line}: a value may not hold a null")
        values[binding.key] = binding.value or ""
    return values


def check_project(project_dir: Path) -> None:
    """What a deploy refuses before it builds anything: a `.env` that does not read or is too
    big to be a process's environment, and `conda-packages.txt` on a server without conda."""
    dotenv_path = project_dir / DOTENV
    if dotenv_path.is_file():
        size = dotenv_path.stat().st_size
        if size > MAX_DOTENV_BYTES:
            raise errors.InvalidSpec(
                f"{DOTENV}: {size} bytes is more than a worker's environment can hold "
                f"(at most {MAX_DOTENV_BYTES}); put large values in files of the project"
            )
        read_dotenv(dotenv_path.read_text(errors="replace"))
    if (project_dir / CONDA_PACKAGES).is_file() and conda_tool() is None:
        raise errors.InvalidSpec(
            f"{CONDA_PACKAGES}: this server cannot install conda packages: neither micromamba, "
            "mamba nor conda is on its PATH (install one, or list the packages in "
            f"{REQUIREMENTS})"
        )


def runtime_dir(root: Path) -> Path:
    """A folder holding only the worker's modules (as the package `cortex`), to put first on a
    worker's path in any environment. Named by their content; written once."""
    package = Path(cortex.__file__).parent
    digest = hashlib.sha256()
    for name in _RUNTIME_MODULES:
        digest.update(name.encode() + b"\0" + (package / name).read_bytes())

    def copy(tmp: Path) -> None:
        for name in _RUNTIME_MODULES:
            target = tmp / "cortex" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / name, target)

    return project.publish(root / f"runtime-{digest.hexdigest()[:16]}", copy)


def _uv() -> str | None:
    try:
        import uv

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


class Environments:
    """The environments of this machine, under `root` (`<data>/envs`)."""

    def __init__(
        self,
        root: Path,
        cache_dir: Path,
        *,
        budget_bytes: int = 20 * 10**9,
        build_timeout_s: float = 1800.0,
        installer: str = "",
    ) -> None:
        self.root = root.resolve()
        self.cache_dir = cache_dir.resolve()
        self.budget_bytes = budget_bytes
        self.build_timeout_s = build_timeout_s
        # "uv" or "pip"; empty: uv where it is installed, else pip.
        self.installer = installer or ("uv" if _uv() else "pip")
        self._lock = threading.Lock()
        self._builds: dict[str, threading.Event] = {}
        self._slots = threading.BoundedSemaphore(_PARALLEL_BUILDS)

    # -- reading ------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.root / key

    def python(self, key: str) -> Path | None:
        """The interpreter of a ready environment (and mark it used now), else None."""
        marker = self.path(key) / _MARKER
        if not marker.is_file():
            return None
        with contextlib.suppress(OSError):
            os.utime(marker)  # last use: the least recently used go first
        return self.path(key) / "bin" / "python"

    def status(self, key: str | None) -> Status:
        if key is None:
            return Status(None, NONE)
        marker = self.path(key) / _MARKER
        if marker.is_file():
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                info = {}
            return Status(key, READY, None, info.get("duration_s"), info.get("ended_at"))
        if self._building(key):
            return Status(key, BUILDING)
        failed = self.root / f"{key}.failed.json"
        if failed.is_file():
            try:
                info = json.loads(failed.read_text())
            except (OSError, ValueError):
                info = {"message": "the build failed"}
            return Status(
                key, FAILED, info.get("message"), info.get("duration_s"), info.get("ended_at")
            )
        return Status(key, MISSING)

    def _building(self, key: str) -> bool:
        with self._lock:
            if key in self._builds:
                return True
        # Another server process on this data folder holds the build's lock.
        lock_path = self.root / f"{key}.lock"
        if not lock_path.exists():
            return False
        with open(lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def log_lines(self, key: str, since: int = 0) -> tuple[list[str], int]:
        """The build's output from byte offset `since` on: whole lines, at most about
        `_LOG_READ_BYTES` of them; and the offset to ask from next time."""
        try:
            with open(self.root / f"{key}.log", "rb") as handle:
                handle.seek(since)
                data = handle.read(_LOG_READ_BYTES)
        except OSError:
            return [], since
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) == _LOG_READ_BYTES:
            end = len(data)  # one line longer than a read: hand it over in pieces
        chunk = data[:end]
        lines = chunk.decode(errors="replace").splitlines()
        return lines, since + len(chunk)

    # -- building -----------------------------------------------------------------------------

    def build(
        self,
        key: str,
        project_dir: Path,
        on_done: Callable[[Status], None] | None = None,
        *,
        extra: tuple[str, ...] = (),
        retry_failed: bool = True,
    ) -> Status:
        """Start building `key` from `project_dir` unless it is ready or building; `on_done`
        gets the final status (also when it was ready already). Returns the status now."""
        status = self.status(key)
        if status.state == READY or (status.state == FAILED and not retry_failed):
            if on_done is not None:
                on_done(status)
            return status
        with self._lock:
            event = self._builds.get(key)
            if event is None:
                event = self._builds[key] = threading.Event()
                thread = threading.Thread(
                    target=self._build_thread,
                    args=(key, project_dir, extra, event),
                    name=f"cortex-env-{key[:8]}",
                    daemon=True,
                )
                thread.start()
        if on_done is not None:
            threading.Thread(
                target=lambda: on_done(self.wait(key)),
                name=f"cortex-env-wait-{key[:8]}",
                daemon=True,
            ).start()
        return Status(key, BUILDING)

    def wait(self, key: str, timeout_s: float | None = None) -> Status:
        """Wait for a build of this process (or another's) to end; the final status."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                event = self._builds.get(key)
            if event is not None:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                event.wait(remaining)
            status = self.status(key)
            if status.state != BUILDING:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                return status
            if event is None:
                time.sleep(0.2)  # another process builds it: its lock tells when it ends

    def _build_thread(
        self, key: str, project_dir: Path, extra: tuple[str, ...], event: threading.Event
    ) -> None:
        try:
            with self._slots:  # the others wait, "building", for a free slot
                self._build_locked(key, project_dir, extra)
        except Exception:
            log.exception("environment %s: the build crashed", key)
        finally:
            with self._lock:
                self._builds.pop(key, None)
            event.set()

    def _build_locked(self, key: str, project_dir: Path, extra: tuple[str, ...]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building it
            if (self.path(key) / _MARKER).is_file():
                return
            started = time.monotonic()
            failed_path = self.root / f"{key}.failed.json"
            failed_path.unlink(missing_ok=True)
            env_dir = self.path(key)
            shutil.rmtree(env_dir, ignore_errors=True)  # what a crashed build left
            with open(self.root / f"{key}.log", "w") as out:
                try:
                    self._run_steps(env_dir, project_dir, extra, out)
                except BuildError as err:
                    shutil.rmtree(env_dir, ignore_errors=True)
                    duration = time.monotonic() - started
                    out.write(f"==> the build failed after {duration:.1f} s\n")
                    _write_json(
                        failed_path,
                        {"message": str(err), "duration_s": duration, "ended_at": time.time()},
                    )
                    log.warning("environment %s failed to build: %s", key, str(err)[:500])
                    return
                duration = time.monotonic() - started
                out.write(f"==> environment ready in {duration:.1f} s\n")
            _write_json(
                env_dir / _MARKER,
                {
                    "key": key,
                    "python": python_tag(),
                    "installer": self.installer,
                    "cortex": cortex.__version__,
                    "duration_s": duration,
                    "ended_at": time.time(),
                    # Measured once: an environment does not change after its build, and
                    # walking every file of every environment each minute would not be cheap.
                    "bytes": _tree_bytes(env_dir),
                },
            )
            log.info("environment %s built in %.1f s", key, duration)

    def _run_steps(
        self, env_dir: Path, project_dir: Path, extra: tuple[str, ...], out: io.TextIOBase
    ) -> None:
        uv = _uv() if self.installer == "uv" else None
        if self.installer == "uv" and uv is None:
            raise BuildError("the installer uv is not installed on this server")
        tool = conda_tool() if (project_dir / CONDA_PACKAGES).is_file() else None
        if (project_dir / CONDA_PACKAGES).is_file() and tool is None:
            raise BuildError(f"{CONDA_PACKAGES}: neither micromamba, mamba nor conda is on PATH")
        env = self._step_env(env_dir)
        python = str(env_dir / "bin" / "python")
        base = getattr(sys, "_base_executable", sys.executable)
        version = ".".join(str(part) for part in sys.version_info[:2])
        if tool is not None:
            out.write(f"==> creating the environment with {Path(tool).name} ({CONDA_PACKAGES})\n")
            self._step(
                [
                    tool, "create", "-y", "-p", str(env_dir), f"python={version}",
                    "--file", CONDA_PACKAGES,
                ],
                project_dir, env, out, "creating the environment",
            )  # fmt: skip
        elif uv is not None:
            out.write(f"==> creating the environment (uv venv, Python {version})\n")
            self._step(
                [uv, "venv", "--seed", "--no-config", "--python", base, str(env_dir)],
                project_dir, env, out, "creating the environment",
            )  # fmt: skip
        else:
            out.write(f"==> creating the environment (python -m venv, Python {version})\n")
            self._step(
                [base, "-m", "venv", str(env_dir)], project_dir, env, out,
                "creating the environment",
            )  # fmt: skip
        if (project_dir / DEPENDENCIES).is_file():
            out.write(f"==> running {DEPENDENCIES}\n")
            self._step(["bash", DEPENDENCIES], project_dir, env, out, DEPENDENCIES)
        has_requirements = (project_dir / REQUIREMENTS).is_file()
        if has_requirements or extra:
            # One resolution for both: the runtime must agree with the user's pins.
            what = " and ".join([*([REQUIREMENTS] if has_requirements else []), *extra])
            if uv is not None:
                out.write(f"==> installing {what} (uv pip install)\n")
                command = [uv, "pip", "install", "--no-config", "--python", python]
            else:
                out.write(f"==> installing {what} (pip install)\n")
                command = [python, "-m", "pip", "install", "--disable-pip-version-check"]
            args = [*(["-r", REQUIREMENTS] if has_requirements else []), *extra]
            self._step([*command, *args], project_dir, env, out, what)

    def _step_env(self, env_dir: Path) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")
            and not k.startswith("CORTEX_")
        }
        env.update(
            VIRTUAL_ENV=str(env_dir),
            PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}",
            UV_CACHE_DIR=str(self.cache_dir / "uv"),
            PIP_CACHE_DIR=str(self.cache_dir / "pip"),
            # Never download an interpreter: environments use the server's Python.
            UV_PYTHON_DOWNLOADS="never",
            PYTHONNOUSERSITE="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _step(
        self, command: list[str], cwd: Path, env: dict[str, str], out: io.TextIOBase, what: str
    ) -> None:
        """Run one step, its output into the build log; a failure raises its last lines."""
        tail: deque[str] = deque(maxlen=_ERROR_LINES)
        deadline = time.monotonic() + self.build_timeout_s
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as err:
            raise BuildError(f"{what}: cannot run {command[0]}: {err}") from None
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), _kill_group, (proc.pid,))
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            with proc.stdout:
                for raw in _lines(proc.stdout):
                    line = raw.decode(errors="replace").rstrip()
                    if out.tell() < _LOG_MAX_BYTES:
                        out.write(line + "\n")
                        if out.tell() >= _LOG_MAX_BYTES:
                            out.write(f"[the log stops here: over {_LOG_MAX_BYTES} bytes]\n")
                        out.flush()
                    if line.strip():
                        tail.append(line)
            code = proc.wait()
        finally:
            timer.cancel()
            _kill_group(proc.pid)  # nothing a step started outlives it
        if code != 0:
            said = "\n".join(tail)[-_ERROR_CHARS:]
            if time.monotonic() >= deadline:
                raise BuildError(f"{what}: stopped after {self.build_timeout_s:g} s\n{said}")
            raise BuildError(f"{what} failed (exit code {code}):\n{said}".rstrip())

    # -- removing -----------------------------------------------------------------------------

    def prune(self, in_use: set[str]) -> list[str]:
        """Remove environments outside `in_use`, least recently used first, while the folder is
        over its budget; and what failed or crashed builds left. Returns the keys removed."""
        if not self.root.is_dir():
            return []
        ready: list[tuple[float, str, int]] = []
        total = 0
        for entry in self.root.iterdir():
            if not entry.is_dir() or entry.name.startswith(("runtime-", ".")):
                continue
            key = entry.name
            marker = entry / _MARKER
            if not marker.is_file():
                if not self._building(key):
                    shutil.rmtree(entry, ignore_errors=True)  # a build that crashed
                continue
            try:
                size = int(json.loads(marker.read_text())["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                size = _tree_bytes(entry)
            total += size
            with contextlib.suppress(OSError):
                ready.append((marker.stat().st_mtime, key, size))
        removed = []
        for _, key, size in sorted(ready):
            if total <= self.budget_bytes:
                break
            if key in in_use:
                continue
            self._remove(key)
            total -= size
            removed.append(key)
        return removed

    def _remove(self, key: str) -> None:
        with open(self.root / f"{key}.lock", "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # being built again right now
            # The marker first: from here on nobody takes it for ready.
            (self.path(key) / _MARKER).unlink(missing_ok=True)
            shutil.rmtree(self.path(key), ignore_errors=True)
            for suffix in (".log", ".failed.json"):
                (self.root / f"{key}{suffix}").unlink(missing_ok=True)
        log.info("removed the unused environment %s (over the cache budget)", key)


def _lines(stream: Any) -> Iterator[bytes]:
    # uv and pip redraw progress with carriage returns: each redraw is a line of its own.
    pending = b""
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        pending += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
