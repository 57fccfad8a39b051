"""The two documents users write: `cortex.yaml` (an API spec) and a job submission.

Both are validated here, once, by the CLI before upload and by the server on receipt. Errors
name the field that is wrong (`predictor.path: ...`), so a user can fix the file without
guessing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any, Literal

import pydantic
import yaml

from cortex import errors, hookspec

MAX_NAME_LENGTH = 42
MAX_ITEM_BYTES = 262144  # one item's raw JSON (spec §4: 256 KiB)
DEFAULT_MAX_ATTEMPTS = 3
# Deepest nesting of lists and objects a document may have. Past it a stored config or spec
# could never be answered again (the JSON encoders give up near 255 levels).
MAX_JSON_DEPTH = 64
# Largest `timeout` and `max_attempts`: the store keeps them in 32-bit integer columns.
MAX_INT32 = (1 << 31) - 1
# Most items in one batch: a batch is leased, held, sent and retried whole, so one of millions
# of items would be a single unit of work too big to hand out or retry.
MAX_BATCH_SIZE = 100_000

# Names that would shadow the server's own paths, now or in the near future.
RESERVED_NAMES = frozenset(
    {
        "healthz",
        "readyz",
        "capacity",
        "docs",
        "redoc",
        "openapi",
        "metrics",
        "ui",
        "deploy",
        "get",
        "delete",
        "logs",
        "batch",
        "apis",
        "jobs",
        "workers",
        "worker",
        "static",
        "version",
        "info",
        "admin",
    }
)

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SUFFIX = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
}


def parse_quantity(value: str | int | float) -> float:
    """A Kubernetes-style quantity (`200m`, `1`, `512Mi`, `2G`) as a number."""
    if isinstance(value, bool):
        raise ValueError("must be a quantity such as 500m, 1, 2Gi")
    if isinstance(value, int | float):
        if value < 0 or math.isnan(value) or math.isinf(value):
            raise ValueError("must be a positive quantity")
        return float(value)
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"'{value}' is not a quantity (examples: 500m, 1, 2Gi)")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def _relative_path(value: str, what: str) -> str:
    if not value or value.startswith("/") or "\\" in value:
        raise ValueError(f"{what} must be a relative path inside the project folder")
    normal = posixpath.normpath(value)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{what} must stay inside the project folder")
    return normal


# Where a model may come from: storage the datasets read too. A plain path is inside the
# project folder (relative) or on the server's disk under its data roots (absolute).
MODEL_URL_SCHEMES = ("s3", "gs", "gcs", "http", "https")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")


def _model_location(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if sep:
        if scheme.lower() not in MODEL_URL_SCHEMES or not rest:
            allowed = ", ".join(f"{s}://" for s in MODEL_URL_SCHEMES)
            raise ValueError(f"{value!r}: a model URL must start with one of {allowed}")
        return value
    if value.startswith("/"):
        return posixpath.normpath(value)
    return _relative_path(value, "a model path")


class ModelEntry(_Strict):
    """One named model (v0.25 `models.paths[]`; v0.20 `models[]`, whose `model_path` is read
    as `path`)."""

    name: str
    path: str
    signature_key: str | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _v020(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "model_path" in value and "path" not in value:
            value = {("path" if k == "model_path" else k): v for k, v in value.items()}
        return value

    @pydantic.field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _MODEL_NAME.fullmatch(value) or len(value) > 128:
            raise ValueError(
                f"{value!r} is not a model name (letters, digits, '-', '_' and '.', at most 128)"
            )
        return value

    _path = pydantic.field_validator("path")(lambda cls, v: _model_location(v))


class Models(_Strict):
    """`predictor.models` (v0.25): one model (`path`) or several (`paths`)."""

    path: str | None = None
    paths: list[ModelEntry] | None = None
    signature_key: str | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _v020(cls, value: Any) -> Any:
        # v0.20: a list of {name, model_path, signature_key}.
        return {"paths": value} if isinstance(value, list) else value

    @pydantic.field_validator("path")
    @classmethod
    def _check_path(cls, value: str | None) -> str | None:
        return None if value is None else _model_location(value)

    @pydantic.model_validator(mode="after")
    def _one_form(self) -> Models:
        if (self.path is None) == (self.paths is None):
            raise ValueError("give exactly one of path or paths")
        if self.paths is not None:
            if not self.paths:
                raise ValueError("paths: list at least one model")
            names = [entry.name for entry in self.paths]
            for name in names:
                if names.count(name) > 1:
                    raise ValueError(f"paths: the model name {name!r} is used twice")
        return self


class Predictor(_Strict):
    type: Literal["python", "onnx", "tensorflow"]
    path: str
    config: dict[str, Any] = pydantic.Field(default_factory=dict)
    python_path: str | None = None
    env: dict[str, str] = pydantic.Field(default_factory=dict)
    # tensorflow and onnx: the model(s), as v0.20 (`model_path`) or v0.25 (`models`) wrote them.
    model_path: str | None = None
    models: Models | None = None
    signature_key: str | None = None

    @pydantic.field_validator("model_path")
    @classmethod
    def _check_model_path(cls, value: str | None) -> str | None:
        return None if value is None else _model_location(value)

    @pydantic.model_validator(mode="after")
    def _check_models(self) -> Predictor:
        given = [key for key in ("model_path", "models") if getattr(self, key) is not None]
        if self.type == "python":
            for key in (*given, *(["signature_key"] if self.signature_key else [])):
                raise ValueError(f"{key}: only for type tensorflow or onnx, not python")
            return self
        if len(given) != 1:
            raise ValueError(
                f"type {self.type} needs exactly one of model_path or models"
                + (" (both are given)" if given else "")
            )
        if self.type == "onnx":
            keys = [e.signature_key for e in self.models.paths or []] if self.models else []
            if self.signature_key or (self.models and self.models.signature_key) or any(keys):
                raise ValueError("signature_key: only for type tensorflow, not onnx")
        return self

    def model_list(self) -> list[ModelEntry]:
        """The models to load, named; a single model's name is empty (`model_name=None`).
        A model's signature_key is its own, else that of `models`, else the top-level one."""
        key = self.signature_key
        if self.model_path is not None:
            return [ModelEntry.model_construct(name="", path=self.model_path, signature_key=key)]
        if self.models is None:
            return []
        key = self.models.signature_key or key
        if self.models.path is not None:
            return [ModelEntry.model_construct(name="", path=self.models.path, signature_key=key)]
        assert self.models.paths is not None
        return [
            entry.model_copy(update={"signature_key": entry.signature_key or key})
            for entry in self.models.paths
        ]

    @pydantic.field_validator("config", mode="before")
    @classmethod
    def _null_config(cls, value: Any) -> Any:
        return {} if value is None else value

    @pydantic.field_validator("env", mode="before")
    @classmethod
    def _null_env(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, Mapping):
            # YAML reads `THREADS: 4` as a number; an environment holds text.
            return {
                key: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                for key, v in value.items()
            }
        return value

    @pydantic.field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        path = _relative_path(value, "the predictor path")
        if not path.endswith(".py"):
            raise ValueError("must be a .py file")
        return path

    @pydantic.field_validator("python_path")
    @classmethod
    def _check_python_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = _relative_path(value, "python_path")
        if value.strip() in (".", "./", "./.") or path == ".":
            raise ValueError("may not be the project root (it is on the path already)")
        return path + "/"

    @pydantic.field_validator("env")
    @classmethod
    def _check_env(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.upper().startswith("CORTEX_"):
                raise ValueError(f"'{key}': keys may not start with CORTEX_")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"'{key}' is not a valid environment variable name")
            if "\0" in value[key]:
                raise ValueError(f"'{key}': a value may not hold a null character")
        return value


class Compute(_Strict):
    cpu: str | int | float = "200m"
    mem: str | int | None = None
    gpu: int = pydantic.Field(default=0, ge=0)

    @pydantic.field_validator("cpu", "mem", "gpu", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number or a quantity, not true/false")
        return value

    @pydantic.field_validator("cpu")
    @classmethod
    def _check_cpu(cls, value: str | int | float) -> str | int | float:
        if parse_quantity(value) < 0.02:
            raise ValueError("must be at least 20m")
        return value

    @pydantic.field_validator("mem")
    @classmethod
    def _check_mem(cls, value: str | int | None) -> str | int | None:
        if value is not None and parse_quantity(value) < 20 * (1 << 20):
            raise ValueError("must be at least 20Mi")
        return value

    @property
    def cpu_cores(self) -> float:
        return parse_quantity(self.cpu)

    @property
    def mem_bytes(self) -> int | None:
        return None if self.mem is None else int(parse_quantity(self.mem))


class APISpec(_Strict):
    """One entry of cortex.yaml with `kind: BatchAPI` (spec §2)."""

    name: str
    kind: Literal["BatchAPI"]
    predictor: Predictor
    compute: Compute = pydantic.Field(default_factory=Compute)
    # The webhook of the API's jobs that do not name one (a submission's `webhook: null`
    # turns it off).
    webhook: hookspec.Webhook | None = None
    # The default `batch_timeout` of this API's jobs, in seconds (a submission may set its
    # own): a `predict` running longer is abandoned and its worker replaced.
    batch_timeout: int | None = pydantic.Field(default=None, ge=1, le=MAX_INT32)

    @pydantic.field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(f"must be at most {MAX_NAME_LENGTH} characters")
        if not _DNS_1035.fullmatch(value):
            raise ValueError(
                "must be a DNS-1035 label: lowercase letters, digits and '-', starting with a "
                "letter and ending with a letter or digit"
            )
        if value in RESERVED_NAMES:
            raise ValueError(f"'{value}' is reserved for the server's own paths")
        return value

    def to_json(self) -> dict[str, Any]:
        # Keys left unset stay out: a python predictor's spec reads as it always did.
        data = self.model_dump(mode="json")
        if data.get("batch_timeout") is None:
            data.pop("batch_timeout", None)
        predictor = data["predictor"]
        for key in ("model_path", "models", "signature_key"):
            if predictor.get(key) is None:
                predictor.pop(key, None)
        if data.get("webhook") is None:
            data.pop("webhook", None)
        return data


def missing_model_files(api: APISpec, names: set[str]) -> list[str]:
    """The project-relative model paths of `api` that are neither a file nor a folder among the
    project's files `names`."""
    missing = []
    for model in api.predictor.model_list():
        path = model.path
        if "://" in path or path.startswith("/"):
            continue
        if path not in names and not any(name.startswith(path.rstrip("/") + "/") for name in names):
            missing.append(path)
    return missing


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), without
    recursion, so a hostile document cannot exhaust the stack."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break  # deep enough to refuse: no need to walk the rest
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest


def unicode_error(value: Any) -> str | None:
    """Why `value` cannot be written as UTF-8 JSON (a lone surrogate from a `\\ud800` escape),
    or None if it can."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as err:
        return err.reason
    return None


def format_error(err: pydantic.ValidationError, prefix: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "literal_error" and first["loc"][-1:] == ("kind",):
        msg = "must be BatchAPI (the only kind this server runs)"
    msg = msg.removeprefix("Value error, ")
    where = f"{prefix}{loc}" if loc else prefix.rstrip(": ")
    return f"{where}: {msg}"


def parse_api_spec(data: Any, where: str = "") -> APISpec:
    """Validate one API document; errors name the field (`predictor.path: ...`)."""
    if not isinstance(data, Mapping):
        raise errors.InvalidSpec(f"{where}an API must be a mapping of keys to values")
    name = data.get("name")
    prefix = f"{where}api {name!r}: " if isinstance(name, str) else where
    if json_depth(data) > MAX_JSON_DEPTH:
        raise errors.InvalidSpec(f"{prefix}nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        api = APISpec.model_validate(data)
    except pydantic.ValidationError as err:
        raise errors.InvalidSpec(format_error(err, prefix)) from None
    reason = unicode_error(api.to_json())
    if reason is not None:
        raise errors.InvalidSpec(f"{prefix}holds text that is not valid unicode ({reason})")
    return api


def load_config_file(text: str, filename: str = "cortex.yaml") -> list[APISpec]:
    """Parse cortex.yaml: a list of APIs (or one API as a mapping)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise errors.InvalidSpec(f"{filename}: not valid YAML: {err}") from None
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list) or not data:
        raise errors.InvalidSpec(f"{filename}: expected a list of APIs")
    specs = [parse_api_spec(item, f"{filename}: ") for item in data]
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise errors.InvalidSpec(f"{filename}: api {name!r} is defined more than once")
    return specs


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None) -> dict[str, Any]:
    """A deep copy of `base` with `override` merged in: nested dicts merge, anything else is
    replaced (spec §3: the job's config wins over the API's)."""
    merged = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
