"""Where a dataset (or a model) lives: the URL forms this server reads, split into scheme and
path. Shared by the submission checks (`cortex.spec`) and the readers (`cortex.datasets`,
`cortex.modelcache`), and importing neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cortex import errors

LOCAL = "file"
HTTP = ("http", "https")
# The schemes a dataset may use. fsspec knows many more (ftp://, sftp://, smb://, hdfs://,
# memory://...), but each is a way to make the server connect somewhere or read something it
# was never meant to: anything else is refused at submission.
OBJECT_STORES = ("s3", "gs", "gcs")
SCHEMES = (LOCAL, *HTTP, *OBJECT_STORES)


@dataclass(frozen=True)
class Location:
    """One prefix of a submission: `scheme` is "file" for a local path; `prefix` is the text
    items start with (as the user wrote it); `path` is what the filesystem is given."""

    scheme: str
    prefix: str
    path: str

    @property
    def key(self) -> str:
        """The same place whatever way it was written (`/x` and `file:///x` are one)."""
        return f"file://{self.path}" if self.scheme == LOCAL else self.prefix


def parse_location(url: str) -> Location:
    """Split one of `s3_paths`; InvalidSubmission if it is not a path this server reads."""
    if url.startswith("/"):
        return Location(LOCAL, url, url)
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise invalid_path(
            url, "must be a URL (s3://, gs://, https://, file://) or an absolute path"
        )
    if scheme not in SCHEMES:
        raise invalid_path(
            url,
            f"{scheme}:// is not read by this server: use s3://, gs://, http(s)://, file:// or "
            "an absolute path",
        )
    if scheme == LOCAL:
        if not rest.startswith("/"):
            raise invalid_path(url, "a file:// URL must hold an absolute path (file:///data/x)")
        return Location(LOCAL, url, rest)
    if scheme in HTTP:
        if not rest or rest.startswith("/"):
            raise invalid_path(url, "must name a host")
        return Location(scheme, url, url)
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise errors.InvalidSubmission(
            f"{url}: must be a valid {scheme}://bucket/key path", kind="batchapi.invalid_s3_path"
        )
    return Location(scheme, url, rest)


def under_prefixes(url: str, prefixes: tuple[str, ...]) -> bool:
    """Whether a URL starts with one of the allowed prefixes (`CORTEX_DATA_URLS`,
    `CORTEX_WEBHOOK_URLS`; a prefix naming only a bucket or host ends with "/" already, see
    `cortex.cli.server`)."""
    return any(url.startswith(prefix) for prefix in prefixes)


def invalid_path(url: str, why: str) -> errors.InvalidSubmission:
    return errors.InvalidSubmission(f"{url}: {why}", kind="batchapi.invalid_path")
