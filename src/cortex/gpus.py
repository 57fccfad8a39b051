"""The GPUs of this machine, and which local workers hold which of them.

The local launcher gives each worker of an API with `compute.gpu: N` its own N devices through
`CUDA_VISIBLE_DEVICES`; a job that asks for more GPUs than are free is refused at submission.
An accepted job reserves its devices until its workers take them (or it ends), so that two
submissions racing for the last GPUs cannot both be accepted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading

from cortex import errors


def parse(text: str) -> tuple[str, ...]:
    """`"0,1,2,3"` -> the device ids; `""` or `"none"` -> none."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def detect() -> tuple[str, ...]:
    """The devices this server may hand out: its own CUDA_VISIBLE_DEVICES if set, else what
    `nvidia-smi -L` lists, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return parse(visible)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(m.group(1) for m in re.finditer(r"^GPU (\d+):", listing, re.MULTILINE))


class Pool:
    """Which worker holds which device. A device is held from the worker's start until its
    process is seen to exit."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        self.devices = devices
        self._held: dict[str, tuple[str, ...]] = {}
        # Devices promised to accepted jobs whose workers have not taken them yet, by job.
        self._reserved: dict[str, int] = {}
        self._lock = threading.Lock()

    def free(self) -> int:
        with self._lock:
            return self._free()

    def _free(self) -> int:
        held = sum(len(ids) for ids in self._held.values())
        return len(self.devices) - held - sum(self._reserved.values())

    def reserve(self, job_id: str, per_worker: int, workers: int) -> None:
        """Promise a job's workers their GPUs, or refuse the job if they cannot all get them
        now. Checking and promising is one step: two jobs cannot both get the last devices."""
        if per_worker == 0:
            return
        needed = per_worker * workers
        total = len(self.devices)
        if needed > total:
            raise errors.InsufficientGpus(
                f"this job needs {needed} GPUs ({workers} workers x {per_worker}); this server "
                f"has {total} (set CORTEX_GPUS to declare them)"
            )
        with self._lock:
            free = self._free()
            if needed > free:
                raise errors.InsufficientGpus(
                    f"this job needs {needed} GPUs ({workers} workers x {per_worker}); {free} "
                    f"of this server's {total} are free, the others are held by other jobs"
                )
            self._reserved[job_id] = self._reserved.get(job_id, 0) + needed

    def unreserve(self, job_id: str) -> None:
        """Give back what a job was promised and its workers did not take (it ended, or was
        never created)."""
        with self._lock:
            self._reserved.pop(job_id, None)

    def take(self, worker_id: str, count: int, job_id: str | None = None) -> tuple[str, ...]:
        """Devices for a worker: from its job's reservation first, else from the free ones (a
        replacement worker)."""
        with self._lock:
            mine = min(count, self._reserved.get(job_id, 0)) if job_id is not None else 0
            if count - mine > self._free():
                raise errors.InsufficientGpus(
                    f"worker {worker_id} needs {count} GPUs; {self._free()} of this server's "
                    f"{len(self.devices)} are free"
                )
            held = {d for ids in self._held.values() for d in ids}
            self._held[worker_id] = tuple(d for d in self.devices if d not in held)[:count]
            if mine and job_id is not None:
                self._reserved[job_id] -= mine
                if not self._reserved[job_id]:
                    del self._reserved[job_id]
            return self._held[worker_id]

    def hold(self, worker_id: str, devices: tuple[str, ...]) -> None:
        """Record the devices of an adopted worker (read from its environment)."""
        with self._lock:
            self._held[worker_id] = tuple(d for d in devices if d in self.devices)

    def release(self, worker_id: str) -> None:
        with self._lock:
            self._held.pop(worker_id, None)
