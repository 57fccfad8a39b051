"""Load a user's predictor and call its methods with the arguments they declare (spec §3).

Standard library only: this module runs in the API's own environment (`cortex.environments`).
The class's name follows the predictor's type: `PythonPredictor`, `ONNXPredictor` (which takes
an `onnx_client`) or `TensorFlowPredictor` (a `tensorflow_client`).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CLASS_NAME = "PythonPredictor"
# Per predictor type: the class's name and the model client `__init__` must take.
CLASS_NAMES = {"python": CLASS_NAME, "onnx": "ONNXPredictor", "tensorflow": "TensorFlowPredictor"}
CLIENT_ARGS = {"python": None, "onnx": "onnx_client", "tensorflow": "tensorflow_client"}

_ALLOWED_ARGS = {
    "__init__": ({"config"}, {"job_spec", "python_client"}),
    "predict": (set(), {"payload", "batch_id", "headers", "query_params"}),
    "on_job_complete": (set(), {"job_summary"}),
}


def _allowed(name: str, predictor_type: str) -> tuple[set[str], set[str]]:
    required, optional = _ALLOWED_ARGS[name]
    client = CLIENT_ARGS[predictor_type]
    if name == "__init__" and client is not None:
        return required | {client}, {"job_spec"}
    return required, optional


class PredictorError(Exception):
    """The predictor module or class does not follow the interface."""


def _check_signature(
    method: Callable[..., Any], name: str, predictor_type: str = "python"
) -> list[str]:
    required, optional = _allowed(name, predictor_type)
    class_name = CLASS_NAMES[predictor_type]
    params = list(inspect.signature(method).parameters.values())
    if not params or params[0].name != "self":
        raise PredictorError(f"{class_name}.{name}: the first argument must be self")
    names = [p.name for p in params[1:]]
    for param in params[1:]:
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise PredictorError(
                f"{class_name}.{name}: argument '{param.name}' must be a plain named argument "
                "(it is passed by name)"
            )
    for arg in names:
        if arg not in required | optional:
            allowed = ", ".join(sorted(required | optional)) or "none"
            raise PredictorError(
                f"{class_name}.{name}: unexpected argument '{arg}' (allowed: {allowed})"
            )
    for arg in required:
        if arg not in names:
            raise PredictorError(f"{class_name}.{name}: missing required argument '{arg}'")
    return names


def load_class(path: Path, predictor_type: str = "python") -> type:
    """Import the module at `path` and return its predictor class (its name set by the
    predictor's type), checked."""
    class_name = CLASS_NAMES[predictor_type]
    if not path.is_file():
        raise PredictorError(f"predictor file {path} does not exist")
    module_name = "cortex_predictor"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PredictorError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise PredictorError(
            f"{path.name} must define a class named {class_name} (predictor.type: {predictor_type})"
        )
    for method in ("__init__", "predict"):
        if not callable(getattr(cls, method, None)):
            raise PredictorError(f"{class_name} must define a method named {method}")
        _check_signature(getattr(cls, method), method, predictor_type)
    if hasattr(cls, "on_job_complete"):
        _check_signature(cls.on_job_complete, "on_job_complete", predictor_type)
    return cls


class Predictor:
    """An instance of the user's class, with calls that pass only the declared arguments."""

    def __init__(
        self,
        cls: type,
        config: dict[str, Any],
        job_spec: Mapping[str, Any],
        *,
        predictor_type: str = "python",
        client: Any = None,
    ) -> None:
        init_args = _check_signature(cls.__init__, "__init__", predictor_type)  # type: ignore[misc]
        available = {"config": config, "job_spec": dict(job_spec), "python_client": None}
        client_arg = CLIENT_ARGS[predictor_type]
        if client_arg is not None:
            available[client_arg] = client
        self.instance = cls(**{name: available[name] for name in init_args})
        self._predict_args = _check_signature(cls.predict, "predict")  # type: ignore[attr-defined]
        self.has_hook = callable(getattr(self.instance, "on_job_complete", None))
        hook = getattr(cls, "on_job_complete", None)
        self._hook_args = _check_signature(hook, "on_job_complete") if callable(hook) else []

    def predict(self, payload: Any, batch_id: str) -> Any:
        available = {
            "payload": payload,
            "batch_id": batch_id,
            "headers": None,
            "query_params": None,
        }
        return self.instance.predict(**{name: available[name] for name in self._predict_args})

    def on_job_complete(self, job_summary: Mapping[str, Any] | None = None) -> None:
        """Run the hook, with the job's summary if it declares `job_summary` (a dict: the
        counts, the job's id and start time, where its results are, whether any failed)."""
        available = {"job_summary": dict(job_summary or {})}
        self.instance.on_job_complete(**{name: available[name] for name in self._hook_args})
