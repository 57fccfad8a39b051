"""The GPUs of this machine, and which local workers hold which of them.

The local launcher gives each worker of an API with `compute.gpu: N` its own N devices through
`CUDA_VISIBLE_DEVICES`; a job that asks for more GPUs than are free is refused at submission.
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
        self._lock = threading.Lock()

    def free(self) -> int:
        with self._lock:
            return len(self.devices) - sum(len(ids) for ids in self._held.values())

    def check(self, per_worker: int, workers: int) -> None:
        """Refuse a job whose workers cannot all get their GPUs now."""
        if per_worker == 0:
            return
        needed = per_worker * workers
        total = len(self.devices)
        if needed > total:
            raise errors.InsufficientGpus(
                f"this job needs {needed} GPUs ({workers} workers x {per_worker}); this server "
                f"has {total} (set CORTEX_GPUS to declare them)"
            )
        free = self.free()
        if needed > free:
            raise errors.InsufficientGpus(
                f"this job needs {needed} GPUs ({workers} workers x {per_worker}); {free} of "
                f"this server's {total} are free, the others are held by running jobs' workers"
            )

    def take(self, worker_id: str, count: int) -> tuple[str, ...]:
        with self._lock:
            held = {d for ids in self._held.values() for d in ids}
            free = [d for d in self.devices if d not in held]
            if count > len(free):
                raise errors.InsufficientGpus(
                    f"worker {worker_id} needs {count} GPUs; {len(free)} of this server's "
                    f"{len(self.devices)} are free"
                )
            self._held[worker_id] = tuple(free[:count])
            return self._held[worker_id]

    def hold(self, worker_id: str, devices: tuple[str, ...]) -> None:
        """Record the devices of an adopted worker (read from its environment)."""
        with self._lock:
            self._held[worker_id] = tuple(d for d in devices if d in self.devices)

    def release(self, worker_id: str) -> None:
        with self._lock:
            self._held.pop(worker_id, None)
