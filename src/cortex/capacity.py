"""The worker pool's capacity: CPUs, memory and GPUs, what a worker takes of them, and how a
capacity is written (`cpu=8,mem=16Gi,gpu=2`).

A worker reserves its API's `compute` (`cpu`, `mem`, `gpu`) from the pool from the moment the
scheduler places it until its exit is recorded (`cortex.scheduling`). Memory is reserved only
by APIs that declare `compute.mem`; `cpu` always has a value (the spec's default is `200m`).
"""

from __future__ import annotations

import dataclasses
import math
import os

import psutil

from cortex import spec

RESOURCES = ("cpu", "mem", "gpu")


@dataclasses.dataclass(frozen=True)
class Resources:
    """An amount of each resource: CPUs (cores, fractional), memory (bytes), GPUs."""

    cpu: float = 0.0
    mem: int = 0
    gpu: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.mem + other.mem, self.gpu + other.gpu)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu - other.cpu, self.mem - other.mem, self.gpu - other.gpu)

    def times(self, count: int) -> Resources:
        return Resources(self.cpu * count, self.mem * count, self.gpu * count)

    def fits_in(self, room: Resources) -> bool:
        """Whether this amount fits in `room` (a small tolerance absorbs float sums)."""
        return self.cpu <= room.cpu + 1e-9 and self.mem <= room.mem and self.gpu <= room.gpu

    def short_of(self, room: Resources) -> list[str]:
        """The resources of which `room` has less than this amount, as `cpu=1 (free 0.5)`."""
        missing = []
        for name in RESOURCES:
            need, have = getattr(self, name), getattr(room, name)
            if need > have + (1e-9 if name == "cpu" else 0):
                missing.append(f"{name}={_show(name, need)} (free {_show(name, max(have, 0))})")
        return missing

    def to_json(self) -> dict[str, float | int]:
        return {"cpu": round(self.cpu, 3), "mem": self.mem, "gpu": self.gpu}

    def __str__(self) -> str:
        return ",".join(f"{name}={_show(name, getattr(self, name))}" for name in RESOURCES)


def _show(name: str, value: float) -> str:
    if name == "mem":
        for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20)):
            if value >= size:
                return f"{value / size:.3g}{unit}"
        return str(int(value))
    return f"{value:g}"


def per_worker(compute: spec.Compute) -> Resources:
    """What one worker of an API with this `compute` takes from the pool."""
    return Resources(compute.cpu_cores, compute.mem_bytes or 0, compute.gpu)


def parse(text: str) -> dict[str, float]:
    """`cpu=8,mem=16Gi,gpu=2` -> the resources it names (those not named are detected).
    Raises ValueError with a one-line reason."""
    found: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in RESOURCES:
            raise ValueError(
                f"--capacity (CORTEX_CAPACITY): {part.strip()!r} is not NAME=QUANTITY with "
                "NAME one of cpu, mem, gpu (example: cpu=8,mem=16Gi,gpu=2)"
            )
        try:
            amount = spec.parse_quantity(value.strip())
        except ValueError as err:
            raise ValueError(f"--capacity (CORTEX_CAPACITY): {name}: {err}") from None
        if name == "gpu" and amount != math.floor(amount):
            raise ValueError(
                f"--capacity (CORTEX_CAPACITY): gpu: must be a whole number, not {value.strip()}"
            )
        found[name] = amount
    return found


def local(overrides: dict[str, float], gpu_count: int) -> Resources:
    """This machine's capacity: its CPUs, memory and the GPUs the launcher hands out, each
    replaced by `overrides` where given."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Resources(
        cpu=float(overrides.get("cpu", cpus or 1)),
        mem=int(overrides.get("mem", psutil.virtual_memory().total)),
        gpu=int(overrides.get("gpu", gpu_count)),
    )
