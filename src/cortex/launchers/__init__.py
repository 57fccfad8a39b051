"""Launchers place worker processes; they never schedule batches."""

from __future__ import annotations

from cortex import errors
from cortex.launchers.base import Launcher, WorkerExit, WorkerLaunch


def create(name: str) -> Launcher:
    if name == "local":
        from cortex.launchers.local import LocalLauncher

        return LocalLauncher()
    raise errors.InvalidRequest(f"unknown launcher {name!r} (available: local)")


__all__ = ["Launcher", "WorkerExit", "WorkerLaunch", "create"]
