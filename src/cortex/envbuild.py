"""Running an environment build's steps: create the environment (uv, venv or conda), run
`dependencies.sh` in it, install `requirements.txt` and the model runtime in one resolution.
Each step runs in a session of its own with a time limit, its output line by line into the
build's log (capped), and a failure raises the step's last lines as the build's error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cortex.envfiles import CONDA_PACKAGES, DEPENDENCIES, REQUIREMENTS, conda_tool

# A build's log: the most kept (a script printing without end must not fill the disk; the
# last lines still make the error message).
LOG_MAX_BYTES = 16 << 20
# The last lines of a failed step's output make the build's error message.
_ERROR_LINES = 25
_ERROR_CHARS = 4000


class BuildError(Exception):
    """A step of a build failed; the message is what the installer (or script) said."""


@dataclasses.dataclass(frozen=True)
class Settings:
    installer: str  # "uv" or "pip"
    cache_dir: Path
    build_timeout_s: float


def uv_path() -> str | None:
    """The uv binary: the `uv` package's, else one on PATH."""
    try:
        import uv

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def run_steps(
    settings: Settings,
    env_dir: Path,
    project_dir: Path,
    extra: tuple[str, ...],
    out: io.TextIOBase,
) -> None:
    """Build the environment in `env_dir`: create it, run dependencies.sh in it, install
    requirements.txt with the extra requirements, each step's output into `out`."""
    uv = uv_path() if settings.installer == "uv" else None
    if settings.installer == "uv" and uv is None:
        raise BuildError("the installer uv is not installed on this server")
    tool = conda_tool() if (project_dir / CONDA_PACKAGES).is_file() else None
    if (project_dir / CONDA_PACKAGES).is_file() and tool is None:
        raise BuildError(f"{CONDA_PACKAGES}: neither micromamba, mamba nor conda is on PATH")
    env = _step_env(settings, env_dir)
    python = str(env_dir / "bin" / "python")
    base = getattr(sys, "_base_executable", sys.executable)
    version = ".".join(str(part) for part in sys.version_info[:2])
    if tool is not None:
        out.write(f"==> creating the environment with {Path(tool).name} ({CONDA_PACKAGES})\n")
        _step(
            settings,
            [
                tool,
                "create",
                "-y",
                "-p",
                str(env_dir),
                f"python={version}",
                "--file",
                CONDA_PACKAGES,
            ],
            project_dir,
            env,
            out,
            "creating the environment",
        )
    elif uv is not None:
        out.write(f"==> creating the environment (uv venv, Python {version})\n")
        _step(
            settings,
            [uv, "venv", "--seed", "--no-config", "--python", base, str(env_dir)],
            project_dir,
            env,
            out,
            "creating the environment",
        )
    else:
        out.write(f"==> creating the environment (python -m venv, Python {version})\n")
        _step(
            settings,
            [base, "-m", "venv", str(env_dir)],
            project_dir,
            env,
            out,
            "creating the environment",
        )
    if (project_dir / DEPENDENCIES).is_file():
        out.write(f"==> running {DEPENDENCIES}\n")
        _step(settings, ["bash", DEPENDENCIES], project_dir, env, out, DEPENDENCIES)
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
        _step(settings, [*command, *args], project_dir, env, out, what)


def _step_env(settings: Settings, env_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CONDA_PREFIX")
        and not k.startswith("CORTEX_")
    }
    env.update(
        VIRTUAL_ENV=str(env_dir),
        PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}",
        UV_CACHE_DIR=str(settings.cache_dir / "uv"),
        PIP_CACHE_DIR=str(settings.cache_dir / "pip"),
        # Never download an interpreter: environments use the server's Python.
        UV_PYTHON_DOWNLOADS="never",
        PYTHONNOUSERSITE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _step(
    settings: Settings,
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    out: io.TextIOBase,
    what: str,
) -> None:
    """Run one step, its output into the build log; a failure raises its last lines."""
    tail: deque[str] = deque(maxlen=_ERROR_LINES)
    deadline = time.monotonic() + settings.build_timeout_s
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
                if out.tell() < LOG_MAX_BYTES:
                    out.write(line + "\n")
                    if out.tell() >= LOG_MAX_BYTES:
                        out.write(f"[the log stops here: over {LOG_MAX_BYTES} bytes]\n")
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
            raise BuildError(f"{what}: stopped after {settings.build_timeout_s:g} s\n{said}")
        raise BuildError(f"{what} failed (exit code {code}):\n{said}".rstrip())


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
