"""Launchers place worker processes; they never schedule batches."""

from __future__ import annotations

import os

from cortex import errors, gpus
from cortex.launchers.base import Launcher, WorkerExit, WorkerLaunch
from cortex.settings import Settings

NAMES = ("local", "ray")


def create(settings: Settings) -> Launcher:
    name = settings.launcher
    if name == "local":
        from cortex.launchers.local import LocalLauncher

        devices = gpus.detect() if settings.gpus is None else settings.gpus
        return LocalLauncher(devices)
    if name == "ray":
        # Imported here only: Ray is an optional dependency (the `ray` extra).
        from cortex.launchers.ray import RayLauncher

        return RayLauncher(ray_address(settings))
    raise errors.InvalidRequest(f"unknown launcher {name!r} (available: {', '.join(NAMES)})")


def ray_address(settings: Settings) -> str:
    return settings.ray_address or os.environ.get("RAY_ADDRESS", "")


def check(settings: Settings) -> None:
    """What `cortex serve` checks before it starts: a missing Ray, a missing address, as one
    line rather than a traceback from the application's start-up."""
    if settings.launcher == "ray":
        from cortex.launchers import ray  # raises a CortexError without Ray

        ray.check_address(ray_address(settings))


__all__ = ["Launcher", "WorkerExit", "WorkerLaunch", "create"]
