"""The model clients handed to ONNX and TensorFlow predictors (`onnx_client`,
`tensorflow_client`), as in Cortex: the user writes pre- and post-processing, the client runs
the model.

Standard library at import (this module is part of the worker runtime, put into any
environment): ONNX Runtime, NumPy and TensorFlow are imported when a client is made, from the
API's environment, where the server installs them (`cortex.environments`).

Models load once, when the worker starts and before it leases anything; a model that fails to
load fails the worker, and the job, with the reason, as a predictor's `__init__` that raises.
Errors name the model and the input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("cortex")

# ONNX tensor element types, as ONNX Runtime names them, to NumPy dtypes: lists are converted
# with the input's own type.
_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


class ModelError(Exception):
    """A model could not be loaded or run; the message names the model (and the input)."""


def _label(name: str) -> str:
    return f"model {name!r}" if name else "the model"


class _Models:
    """Models by name; one model answers to `model_name=None`."""

    kind = "model"

    def __init__(self, models: Sequence[Mapping[str, Any]]) -> None:
        self._paths = {m["name"]: m["path"] for m in models}

    def _name(self, model_name: str | None) -> str:
        if model_name is None:
            if len(self._paths) == 1:
                only: str = next(iter(self._paths))
                return only
            raise ModelError(
                f"model_name is required: this API has {len(self._paths)} models "
                f"({', '.join(sorted(self._paths))})"
            )
        if model_name not in self._paths:
            known = ", ".join(sorted(n for n in self._paths if n)) or "one model, unnamed"
            raise ModelError(f"no model named {model_name!r} (this API has: {known})")
        return model_name


class ONNXClient(_Models):
    """`onnx_client`: one ONNX Runtime session per model."""

    def __init__(self, models: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(models)
        try:
            import numpy
            import onnxruntime
        except ImportError as err:
            raise ModelError(
                f"type onnx needs onnxruntime in the API's environment: {err}"
            ) from None
        self._np = numpy
        available = onnxruntime.get_available_providers()
        # The GPUs this worker was given (CUDA_VISIBLE_DEVICES) are the only ones it sees.
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if "CUDAExecutionProvider" in available and gpus not in ("", "-1"):
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._sessions: dict[str, Any] = {}
        for name, path in self._paths.items():
            try:
                session = onnxruntime.InferenceSession(path, providers=providers)
            except Exception as err:
                raise ModelError(f"{_label(name)} ({path}) failed to load: {err}") from None
            self._sessions[name] = session
            log.info(
                "loaded %s from %s on %s",
                _label(name),
                path,
                ", ".join(session.get_providers()),
            )

    def input_signature(self, model_name: str | None = None) -> dict[str, dict[str, Any]]:
        """The model's inputs: name -> {"shape" (None or a name where a size is free),
        "type" (ONNX's, e.g. "tensor(float)")}."""
        session = self._sessions[self._name(model_name)]
        return {i.name: {"shape": list(i.shape), "type": i.type} for i in session.get_inputs()}

    def output_signature(self, model_name: str | None = None) -> dict[str, dict[str, Any]]:
        session = self._sessions[self._name(model_name)]
        return {o.name: {"shape": list(o.shape), "type": o.type} for o in session.get_outputs()}

    def predict(self, model_input: Any, model_name: str | None = None) -> list[Any]:
        """Run the model: `model_input` is one array (a single-input model) or a dict of input
        name to array; lists are converted with each input's type. Returns the outputs as ONNX
        Runtime does (a list of arrays, in the model's output order)."""
        name = self._name(model_name)
        session = self._sessions[name]
        inputs = {i.name: i for i in session.get_inputs()}
        if isinstance(model_input, Mapping):
            unknown = sorted(set(model_input) - set(inputs))
            if unknown:
                raise ModelError(
                    f"{_label(name)} has no input {unknown[0]!r} (its inputs: {', '.join(inputs)})"
                )
            missing = sorted(set(inputs) - set(model_input))
            if missing:
                raise ModelError(f"{_label(name)}: input {missing[0]!r} is missing")
            given = dict(model_input)
        elif len(inputs) == 1:
            given = {next(iter(inputs)): model_input}
        else:
            raise ModelError(
                f"{_label(name)} has {len(inputs)} inputs ({', '.join(inputs)}): pass a dict "
                "of input name to value"
            )
        feed = {key: self._array(name, inputs[key], value) for key, value in given.items()}
        try:
            return list(session.run(None, feed))
        except Exception as err:
            raise ModelError(f"{_label(name)} failed to run: {err}") from None

    def _array(self, model: str, spec: Any, value: Any) -> Any:
        dtype = _ONNX_DTYPES.get(spec.type)
        try:
            if isinstance(value, self._np.ndarray):
                return value if dtype is None else value.astype(dtype, copy=False)
            return self._np.asarray(value, dtype=dtype)
        except (ValueError, TypeError) as err:
            raise ModelError(
                f"{_label(model)}, input {spec.name!r} ({spec.type}, shape {list(spec.shape)}): "
                f"cannot convert the value: {err}"
            ) from None


class TensorFlowClient(_Models):
    """`tensorflow_client`: the SavedModel's signature run in the worker, in place of Cortex's
    TensorFlow Serving sidecar. Inputs and outputs are dicts keyed by the signature's names,
    as TF Serving's JSON API shapes them (outputs as nested lists)."""

    def __init__(self, models: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(models)
        try:
            import tensorflow
        except ImportError as err:
            raise ModelError(
                f"type tensorflow needs TensorFlow in the API's environment: {err}"
            ) from None
        self._tf = tensorflow
        self._signatures: dict[str, Any] = {}
        for model in models:
            name, path = model["name"], model["path"]
            try:
                loaded = tensorflow.saved_model.load(path)
            except Exception as err:
                raise ModelError(f"{_label(name)} ({path}) failed to load: {err}") from None
            keys = sorted(loaded.signatures.keys())
            key = model.get("signature_key")
            if key is None:
                if len(keys) != 1:
                    raise ModelError(
                        f"{_label(name)} has {len(keys)} signatures ({', '.join(keys) or 'none'})"
                        ": set predictor.signature_key"
                    )
                key = keys[0]
            elif key not in keys:
                raise ModelError(
                    f"{_label(name)} has no signature {key!r} (its signatures: {', '.join(keys)})"
                )
            # The loaded object owns the signature's variables: keep it alive with it.
            self._signatures[name] = (loaded, loaded.signatures[key])
            log.info("loaded %s from %s (signature %s)", _label(name), path, key)

    def input_signature(self, model_name: str | None = None) -> dict[str, dict[str, Any]]:
        """The signature's inputs: name -> {"shape", "type"} (TensorFlow's dtype name)."""
        _, function = self._signatures[self._name(model_name)]
        specs = function.structured_input_signature[1]
        return {
            key: {"shape": spec.shape.as_list(), "type": spec.dtype.name}
            for key, spec in specs.items()
        }

    def predict(self, model_input: Any, model_name: str | None = None) -> dict[str, Any]:
        name = self._name(model_name)
        _, function = self._signatures[name]
        specs = function.structured_input_signature[1]
        if not isinstance(model_input, Mapping):
            if len(specs) != 1:
                raise ModelError(
                    f"{_label(name)} has {len(specs)} inputs ({', '.join(specs)}): pass a dict "
                    "of input name to value"
                )
            model_input = {next(iter(specs)): model_input}
        unknown = sorted(set(model_input) - set(specs))
        if unknown:
            raise ModelError(
                f"{_label(name)} has no input {unknown[0]!r} (its inputs: {', '.join(specs)})"
            )
        missing = sorted(set(specs) - set(model_input))
        if missing:
            raise ModelError(f"{_label(name)}: input {missing[0]!r} is missing")
        feed = {}
        for key, value in model_input.items():
            try:
                feed[key] = self._tf.constant(value, dtype=specs[key].dtype)
            except (ValueError, TypeError) as err:
                raise ModelError(
                    f"{_label(name)}, input {key!r} ({specs[key].dtype.name}, shape "
                    f"{specs[key].shape.as_list()}): cannot convert the value: {err}"
                ) from None
        try:
            outputs = function(**feed)
        except Exception as err:
            raise ModelError(f"{_label(name)} failed to run: {err}") from None
        return {key: value.numpy().tolist() for key, value in outputs.items()}


def client_for(predictor_type: str, models: Sequence[Mapping[str, Any]]) -> Any:
    """The client a predictor of this type takes, its models loaded; None for python."""
    if predictor_type == "onnx":
        return ONNXClient(models)
    if predictor_type == "tensorflow":
        return TensorFlowClient(models)
    return None
