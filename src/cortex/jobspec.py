"""A job submission (spec §4.1): its schema and the spec's checks, in the spec's order, and
the JSON payloads of an item list's batches. The API's own document, `cortex.yaml`, is
`cortex.spec`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic

from cortex import errors, exactjson, globs, hookspec, locations, spec

DATASET_KEYS = ("item_list", "file_path_lister", "delimited_files")


class ItemList(pydantic.BaseModel):
    items: list[Any]
    batch_size: int


class FileDataset(pydantic.BaseModel):
    """`file_path_lister` or `delimited_files`: prefixes to list, globs to filter by. `paths`
    is accepted for `s3_paths` (the prefixes need not be on S3)."""

    paths: list[str] = pydantic.Field(validation_alias=pydantic.AliasChoices("s3_paths", "paths"))
    includes: list[str] = pydantic.Field(default_factory=list)
    excludes: list[str] = pydantic.Field(default_factory=list)
    batch_size: int

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    @pydantic.field_validator("includes", "excludes", mode="before")
    @classmethod
    def _null_list(cls, value: Any) -> Any:
        return [] if value is None else value

    def to_json(self) -> dict[str, Any]:
        return {
            "s3_paths": self.paths,
            "includes": self.includes,
            "excludes": self.excludes,
            "batch_size": self.batch_size,
        }


class Output(pydantic.BaseModel):
    """Where a job's results are written once it completes (`cortex.outputs`)."""

    path: str

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


class Submission(pydantic.BaseModel):
    """A validated job submission. Unknown keys are ignored, as in the spec."""

    workers: int = 0
    config: dict[str, Any] | None = None
    item_list: ItemList | None = None
    file_path_lister: FileDataset | None = None
    delimited_files: FileDataset | None = None
    timeout: int | None = None
    max_attempts: int = spec.DEFAULT_MAX_ATTEMPTS
    # Checked apart (`hookspec`), after the spec's checks, with error kinds of their own.
    metadata: dict[str, str] | None = None
    webhook: hookspec.Webhook | None = None
    # Whether the submission had a `webhook` key: null there turns the API's default off.
    webhook_given: bool = False
    batch_timeout: int | None = None
    max_failed_batches: int | None = None
    output: Output | None = None
    # Scheduling (`cortex.scheduling`): higher first for free capacity; the fewest workers
    # the job keeps while it has batches left.
    priority: int = 0
    min_workers: int = 0

    model_config = pydantic.ConfigDict(extra="ignore")

    @property
    def dataset_kind(self) -> str:
        return next(key for key in DATASET_KEYS if getattr(self, key) is not None)

    @property
    def file_dataset(self) -> FileDataset | None:
        return self.file_path_lister or self.delimited_files


def _invalid(kind: str, message: str) -> errors.InvalidSubmission:
    return errors.InvalidSubmission(message, kind=kind)


def parse_submission(data: Any) -> Submission:
    """Validate a submission in the spec's order, with the spec's error kinds."""
    if not isinstance(data, dict):
        raise errors.InvalidRequest("the request body must be a JSON object")
    # Items are checked as their batches are written (orjson refuses what it cannot write);
    # walking a million of them here in Python would cost more than the rest of the request.
    item_list = data.get("item_list")
    rest = {k: v for k, v in data.items() if k != "item_list"}
    if isinstance(item_list, dict):
        rest["item_list"] = {k: v for k, v in item_list.items() if k != "items"}
    if spec.json_depth(rest) > spec.MAX_JSON_DEPTH:
        raise errors.InvalidRequest(
            f"the request body nests deeper than {spec.MAX_JSON_DEPTH} levels"
        )
    present = [key for key in DATASET_KEYS if data.get(key) is not None]
    if not present:
        raise _invalid(
            "batchapi.specify_exactly_one_key",
            "specify exactly one of the following keys: item_list, file_path_lister, or "
            "delimited_files",
        )
    if len(present) > 1:
        raise _invalid(
            "batchapi.conflicting_fields",
            f"please specify exactly one of the following keys: {', '.join(present)}",
        )
    kind = present[0]
    section = data[kind]
    if isinstance(section, dict) and "s3_paths" in section and "paths" in section:
        raise _invalid("batchapi.conflicting_fields", f"{kind}: give s3_paths or paths, not both")
    own = {k: v for k, v in data.items() if k not in ("metadata", "webhook", "webhook_given")}
    try:
        sub = Submission.model_validate(own, strict=False)
    except pydantic.ValidationError as err:
        raise errors.InvalidRequest(spec.format_error(err, "")) from None
    raw = {
        name: data.get(name)
        for name in (
            "workers",
            "timeout",
            "max_attempts",
            "batch_timeout",
            "max_failed_batches",
            "priority",
            "min_workers",
        )
    }
    if isinstance(data[kind], dict):
        raw[f"{kind}.batch_size"] = data[kind].get("batch_size")
    for name, value in raw.items():
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            raise errors.InvalidRequest(f"{name}: must be an integer")
    if sub.item_list is not None and not sub.item_list.items:
        raise _invalid("batchapi.empty_item_list", "item_list.items: must not be empty")
    batch_size = sub.item_list.batch_size if sub.item_list else sub.file_dataset.batch_size  # type: ignore[union-attr]
    if batch_size < 1:
        raise _invalid("batchapi.invalid_batch_size", f"{kind}.batch_size: must be at least 1")
    if batch_size > spec.MAX_BATCH_SIZE:
        raise _invalid(
            "batchapi.invalid_batch_size",
            f"{kind}.batch_size: must be at most {spec.MAX_BATCH_SIZE}",
        )
    if sub.workers < 1:
        raise _invalid("batchapi.invalid_workers", "workers: must be at least 1")
    if sub.timeout is not None and sub.timeout < 1:
        raise _invalid("batchapi.invalid_timeout", "timeout: must be at least 1 second")
    if sub.timeout is not None and sub.timeout > spec.MAX_INT32:
        raise _invalid(
            "batchapi.invalid_timeout", f"timeout: must be at most {spec.MAX_INT32} seconds"
        )
    if abs(sub.priority) > spec.MAX_INT32:
        raise _invalid(
            "batchapi.invalid_priority",
            f"priority: must be between -{spec.MAX_INT32} and {spec.MAX_INT32}",
        )
    if not 0 <= sub.min_workers <= sub.workers:
        raise _invalid(
            "batchapi.invalid_min_workers",
            f"min_workers: must be between 0 and workers ({sub.workers})",
        )
    if sub.max_attempts < 1:
        raise _invalid("batchapi.invalid_max_attempts", "max_attempts: must be at least 1")
    if sub.max_attempts > spec.MAX_INT32:
        raise _invalid(
            "batchapi.invalid_max_attempts", f"max_attempts: must be at most {spec.MAX_INT32}"
        )
    _check_limits(sub)
    reason = spec.unicode_error(sub.config)
    if reason is not None:
        raise errors.InvalidRequest(f"config: holds text that is not valid unicode ({reason})")
    if sub.file_dataset is not None:
        _check_file_dataset(kind, sub.file_dataset)
    sub.metadata = hookspec.parse_metadata(data.get("metadata"))
    sub.webhook_given = "webhook" in data
    if data.get("webhook") is not None:
        sub.webhook = hookspec.parse_webhook(data["webhook"])
    return sub


def _check_limits(sub: Submission) -> None:
    """`batch_timeout`, `max_failed_batches` and `output`, each refused with its bound."""
    if sub.batch_timeout is not None and not 1 <= sub.batch_timeout <= spec.MAX_INT32:
        raise _invalid(
            "batchapi.invalid_batch_timeout",
            f"batch_timeout: must be from 1 to {spec.MAX_INT32} seconds",
        )
    if sub.max_failed_batches is not None and not 0 <= sub.max_failed_batches <= spec.MAX_INT32:
        raise _invalid(
            "batchapi.invalid_max_failed_batches",
            f"max_failed_batches: must be from 0 to {spec.MAX_INT32}",
        )
    if sub.output is not None:
        output_location(sub.output.path)


def output_location(path: str) -> locations.Location:
    """An output path as a folder: a place this server writes (s3://, gs://, a local path),
    never an http(s) URL; InvalidSubmission otherwise."""
    reason = spec.unicode_error(path)
    if reason is not None or "\0" in path or not path.strip():
        raise _invalid("batchapi.invalid_path", f"output.path: {path!r} is not valid")
    loc = locations.parse_location(path)
    if loc.scheme in locations.HTTP:
        raise locations.invalid_path(path, "results cannot be written to an http(s) URL")
    return loc


def _check_file_dataset(kind: str, dataset: FileDataset) -> None:
    """Step 5 of the spec's order, short of listing: prefixes given, globs compile."""
    if not dataset.paths:
        raise _invalid("batchapi.empty_s3_paths", f"{kind}.s3_paths: must not be empty")
    for name in ("includes", "excludes"):
        try:
            globs.Globs(getattr(dataset, name))
        except globs.GlobError as err:
            raise _invalid("batchapi.invalid_glob", f"{kind}.{name}: {err}") from None
    for path in dataset.paths:
        reason = spec.unicode_error(path)
        if reason is not None or "\0" in path:
            raise _invalid("batchapi.invalid_path", f"{kind}.s3_paths: {path!r} is not valid")
        locations.parse_location(path)


def item_batches(items: list[Any], batch_size: int) -> Iterator[str]:
    """The JSON payload of each batch, in order, checking the spec's per-item size limit.

    An item can only be over the limit if its batch is, so items are measured one by one only
    in batches whose JSON is larger than the limit: the common case serialises once.
    """
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        try:
            encoded = exactjson.dumps(chunk)
        except TypeError as err:
            raise _invalid(
                "batchapi.invalid_item",
                f"item_list.items: an item in batch {start // batch_size} cannot be stored as "
                f"JSON ({err}: lone surrogates and nesting deeper than 254 levels are refused)",
            ) from None
        if len(encoded) > spec.MAX_ITEM_BYTES:
            for offset, item in enumerate(chunk):
                size = len(exactjson.dumps(item))
                if size > spec.MAX_ITEM_BYTES:
                    raise _invalid(
                        "batchapi.item_size_exceeds_limit",
                        f"item {start + offset} has size {size} bytes which exceeds the limit "
                        f"({spec.MAX_ITEM_BYTES} bytes)",
                    )
        yield encoded.decode()
