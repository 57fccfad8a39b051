"""What a submission (or an API's cortex.yaml) may say about the automation around its job: a
webhook to call on status changes, metadata to find it by, and the idempotency key that makes
a retried POST answer the job it created. Checked here; sent by `cortex.webhooks`."""

from __future__ import annotations

from typing import Any

import pydantic

from cortex import errors, locations
from cortex.jobs import ENDED_EVENT, WEBHOOK_EVENTS

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 512
MAX_WEBHOOK_URL_CHARS = 2048
MAX_IDEMPOTENCY_KEY_CHARS = 255


class Webhook(pydantic.BaseModel):
    """Where a job's status changes are POSTed, and which ones."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    url: str = pydantic.Field(
        description="an http(s) URL, under a prefix of CORTEX_WEBHOOK_URLS when that is set",
        max_length=MAX_WEBHOOK_URL_CHARS,
    )
    events: list[str] = pydantic.Field(
        default_factory=lambda: [ENDED_EVENT],
        description=(
            "the events to send: `job.ended` (every final status), `job.running`, or one final "
            "status such as `job.succeeded` or `job.timed_out`"
        ),
        min_length=1,
        max_length=len(WEBHOOK_EVENTS),
    )

    @pydantic.field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in locations.HTTP:
            raise ValueError("must be an http:// or https:// URL")
        host = rest.split("/", 1)[0]
        if not host or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @pydantic.field_validator("events")
    @classmethod
    def _check_events(cls, value: list[str]) -> list[str]:
        unknown = [event for event in value if event not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r}; known: {', '.join(WEBHOOK_EVENTS)}")
        return list(dict.fromkeys(value))  # as given, each once


def parse_webhook(value: Any, where: str = "webhook") -> Webhook:
    """A submission's `webhook` (400 `batchapi.invalid_webhook` if it is not one)."""
    if not isinstance(value, dict):
        raise _invalid_webhook(f"{where}: must be an object with a url")
    try:
        return Webhook.model_validate(value, strict=True)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise _invalid_webhook(f"{where}.{loc}: {msg}" if loc else f"{where}: {msg}") from None


def _invalid_webhook(message: str) -> errors.InvalidSubmission:
    return errors.InvalidSubmission(message, kind="batchapi.invalid_webhook")


def check_webhook_url(url: str, allowed: tuple[str, ...]) -> None:
    """Refuse a URL outside the `CORTEX_WEBHOOK_URLS` prefixes (when any are set)."""
    rest = url.partition("://")[2]
    target = url if "/" in rest else url + "/"  # a bare host is its root, as a prefix is
    if allowed and not locations.under_prefixes(target, allowed):
        raise errors.InvalidSubmission(
            f"webhook.url: {url} is not under the URL prefixes this server sends webhooks to "
            f"({', '.join(allowed)}; CORTEX_WEBHOOK_URLS)",
            kind="batchapi.webhook_not_allowed",
        )


def parse_metadata(value: Any) -> dict[str, str] | None:
    """A submission's `metadata`: at most 16 string keys (1-128 characters) to string values
    (at most 512 characters); 400 `batchapi.invalid_metadata` otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid_metadata("metadata: must be an object of string keys to string values")
    if len(value) > MAX_METADATA_KEYS:
        raise _invalid_metadata(f"metadata: at most {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS or not _printable(key):
            raise _invalid_metadata(
                f"metadata: key {key[:40]!r} must be 1 to {MAX_METADATA_KEY_CHARS} printable "
                "characters"
            )
        if not isinstance(item, str):
            raise _invalid_metadata(f"metadata.{key}: must be a string")
        if len(item) > MAX_METADATA_VALUE_CHARS or not _printable(item, newlines=True):
            raise _invalid_metadata(
                f"metadata.{key}: must be at most {MAX_METADATA_VALUE_CHARS} characters of text"
            )
    return dict(value)


def metadata_filter(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """The `metadata.KEY=VALUE` query parameters of a listing, as {KEY: VALUE}; a key or value
    no metadata can hold is refused (400), not searched for."""
    wanted: dict[str, str] = {}
    for name, value in pairs:
        key = name.removeprefix("metadata.")
        if not key or len(key) > MAX_METADATA_KEY_CHARS or not _printable(key):
            raise errors.InvalidRequest(
                f"{name[:60]}: a metadata key is 1 to {MAX_METADATA_KEY_CHARS} printable "
                "characters (metadata.KEY=VALUE)"
            )
        if len(value) > MAX_METADATA_VALUE_CHARS or not _printable(value, newlines=True):
            raise errors.InvalidRequest(
                f"{name[:60]}: a metadata value is at most {MAX_METADATA_VALUE_CHARS} "
                "characters of text"
            )
        if wanted.get(key, value) != value:
            raise errors.InvalidRequest(f"{name[:60]}: given twice with different values")
        wanted[key] = value
    return wanted


def _printable(text: str, newlines: bool = False) -> bool:
    """Text a store keeps and a query string can name: no control characters, no lone
    surrogates (values may hold tabs and newlines)."""
    for char in text:
        code = ord(char)
        if (code < 32 and not (newlines and char in "\t\n\r")) or code == 127:
            return False
        if 0xD800 <= code <= 0xDFFF:
            return False
    return True


def _invalid_metadata(message: str) -> errors.InvalidSubmission:
    return errors.InvalidSubmission(message, kind="batchapi.invalid_metadata")


def check_idempotency_key(key: str) -> str:
    """An `Idempotency-Key` header: 1 to 255 printable ASCII characters."""
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(32 < ord(c) < 127 for c in key):
        raise errors.InvalidRequest(
            f"Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII "
            "characters without spaces",
            kind="batchapi.invalid_idempotency_key",
        )
    return key
