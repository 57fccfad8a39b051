"""Each API version's own Python environment: built from the project's files, keyed by their
content, shared by the versions that match, and removed when nothing uses it.

A project folder that holds `requirements.txt`, `dependencies.sh` or `conda-packages.txt` runs
its workers in an environment of its own, isolated from the server's packages and from every
other API; a project with none of them runs in the server's own interpreter, as before.

- **Key** (`cortex.envfiles`). A digest of those three files, the model runtime the server
  adds, the Python version and this package's version. Two API versions with the same files
  share one environment, so a redeploy of unchanged requirements is a cache hit.
- **Build** (steps in `cortex.envbuild`). In `<data>/envs/<key>/`: `uv venv` (or `python -m
  venv` where uv is missing; or conda for `conda-packages.txt`), then `dependencies.sh` with
  the environment activated, then `uv pip install -r requirements.txt` (or pip), with download
  caches under `<data>/cache/`. The installer's output goes to `<data>/envs/<key>.log`. A
  marker file, written last, makes the environment ready: nothing half-built is ever used. A
  build holds a file lock, so two servers on one data folder never build one key twice at once.
- **Worker runtime** (`cortex.envfiles.runtime_dir`). `cortex.worker` needs only the standard
  library: its modules are copied to `<data>/envs/runtime-<digest>/` and put first on a
  worker's `PYTHONPATH`, so a worker runs in an environment that holds only the user's
  packages, pins of pydantic or anything else of the server's included.
- **Removal.** Environments used by no API version and no in-progress job are removed, least
  recently used first, while the folder is over its budget (`CORTEX_ENV_CACHE_BYTES`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cortex
from cortex import envbuild, envfiles

# What defines an environment lives in `cortex.envfiles`; these names were always read here.

log = logging.getLogger("cortex.server")

# Written last into a built environment: its presence is what "ready" means.
_MARKER = "cortex-env.json"
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


@dataclasses.dataclass(frozen=True)
class Status:
    key: str | None
    state: str
    message: str | None = None
    duration_s: float | None = None
    ended_at: float | None = None

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


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
        self.installer = installer or ("uv" if envbuild.uv_path() else "pip")
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
                    settings = envbuild.Settings(
                        self.installer, self.cache_dir, self.build_timeout_s
                    )
                    envbuild.run_steps(settings, env_dir, project_dir, extra, out)
                except envbuild.BuildError as err:
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
                    "python": envfiles.python_tag(),
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
