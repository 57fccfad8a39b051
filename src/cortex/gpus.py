"""The GPUs of this machine, and which local workers hold which of them.

The local launcher gives each worker of an API with `compute.gpu: N` its own N devices through
`CUDA_VISIBLE_DEVICES`. A job one worker of which needs more GPUs than the server has is
refused at submission; others are accepted, and the scheduler (`cortex.pool`, which counts the
server's GPUs as capacity) starts a worker only when its devices are free.
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
            return self._free()

    def _free(self) -> int:
        return len(self.devices) - sum(len(ids) for ids in self._held.values())

    def take(self, worker_id: str, count: int) -> tuple[str, ...]:
        """Devices for a worker, from the free ones."""
        with self._lock:
            if count > self._free():
                raise errors.InsufficientGpus(
                    f"worker {worker_id} needs {count} GPUs; {self._free()} of this server's "
                    f"{len(self.devices)} are free"
                )
            held = {d for ids in self._held.values() for d in ids}
            self._held[worker_id] = tuple(d for d in self.devices if d not in held)[:count]
            return self._held[worker_id]

    def hold(self, worker_id: str, devices: tuple[str, ...]) -> None:
        """Record the devices of an adopted worker (read from its environment)."""
        with self._lock:
            self._held[worker_id] = tuple(d for d in devices if d in self.devices)

    def release(self, worker_id: str) -> None:
        with self._lock:
            self._held.pop(worker_id, None)
