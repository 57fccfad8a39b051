"""Cortex Batch: a self-hosted Batch API for ML inference.

`from cortex import Client` is the Python client (`cortex.client`); its records are in
`cortex.schemas` and its errors in `cortex.errors`. Names load on first use, so `import cortex`
costs nothing and the client never pulls in the server (FastAPI, SQLAlchemy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client", "CortexError", "JobSpec", "JobStatus", "__version__"]

if TYPE_CHECKING:
    from cortex.client import Client
    from cortex.errors import CortexError
    from cortex.schemas import JobSpec, JobStatus

_LAZY = {
    "Client": "cortex.client",
    "CortexError": "cortex.errors",
    "JobSpec": "cortex.schemas",
    "JobStatus": "cortex.schemas",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cortex' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
