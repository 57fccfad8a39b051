"""The launcher interface: start the worker entrypoint somewhere, report exits, stop."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

from cortex import spec
from cortex.capacity import Resources


@dataclasses.dataclass(frozen=True)
class WorkerLaunch:
    job_id: str
    worker_id: str
    project_dir: Path
    log_path: Path
    compute: spec.Compute
    # The complete environment variables the worker adds to its own (CORTEX_*, the API's env).
    env: dict[str, str]
    # The API version's own environment (`cortex.environments`), built on this machine; None:
    # the worker runs in the server's interpreter.
    env_dir: Path | None = None
    # With `env_dir`: the worker's modules, to put first on its path (the environment holds
    # only the user's packages).
    runtime_dir: Path | None = None
    # What defines that environment, for a launcher that builds it where the worker runs (Ray):
    # its key, and the requirements the server adds to the project's (a model runtime).
    env_key: str | None = None
    env_extra: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class WorkerExit:
    job_id: str
    worker_id: str
    exit_code: int | None  # None: the exit code could not be known (an adopted process)
    # The launcher killed it for using more memory than the API's compute.mem.
    oom: bool = False
    detail: str = ""

    @property
    def reason(self) -> str:
        if self.oom:
            return f"was killed for using too much memory ({self.detail})"
        if self.exit_code is None:
            # The detail says why where the launcher knows (a lost Ray actor or node).
            return self.detail or "exited (exit code unknown)"
        if self.exit_code < 0:
            import signal

            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = f"signal {-self.exit_code}"
            return f"was killed by {name}"
        return f"exited with code {self.exit_code}"


class Launcher(Protocol):
    # Whether `capacity` is all there will ever be (a machine), or may grow (a cluster with
    # an autoscaler): only the first refuses a job whose one worker does not fit.
    fixed_capacity: bool

    def capacity(self) -> Resources:
        """What the workers of this launcher may take in all: CPUs, memory, GPUs."""

    def start(self, launch: WorkerLaunch) -> int | None:
        """Start one worker; returns its pid where there is one."""

    def adopt(self, job_id: str, worker_id: str, pid: int | None) -> bool:
        """Take over a worker started by an earlier server process; False if it is gone. `pid`
        is the one its row holds, None where the worker never reported one (a Ray actor not
        placed yet is still adopted, by its name)."""

    def poll(self) -> list[WorkerExit]:
        """Workers that have ended and whose exits are not acknowledged yet: an exit is handed
        over on every call until `ack`, so one that could not be recorded (a store error) is
        recorded on a later tick rather than lost."""

    def ack(self, worker_id: str) -> None:
        """The worker's exit is recorded: forget it."""

    def job_ids(self) -> set[str]:
        """Jobs that have live workers."""

    def stop_job(self, job_id: str, grace_s: float) -> None:
        """Stop every worker of the job: ask, wait up to `grace_s`, then kill. Blocks."""

    def stop_worker(self, worker_id: str, grace_s: float) -> bool:
        """Stop one worker as `stop_job` does; False if this launcher does not run it."""

    def close(self, grace_s: float) -> None:
        """Stop everything (server shutdown)."""
