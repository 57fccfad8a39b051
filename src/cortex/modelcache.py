"""Models named by a URL (`s3://`, `gs://`, `http(s)://`) or an absolute path, made local for
the workers of this machine.

A remote model is downloaded once per machine into `<data>/models/<digest>/<name>`, the digest
made of its URL and its version as the storage reports it (an S3 or GCS ETag, which is a digest
of the content; otherwise size and modification time; for a folder, those of every file), so
workers of every job share one copy, and a model replaced at the same URL is downloaded again.
A download goes to a fresh folder renamed into place: a worker never sees half a model. Local
paths must lie under the server's data roots, as local datasets must, and are used where they
are. Remote URLs obey `CORTEX_DATA_URLS` as datasets do.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Any

from cortex import datasets, errors, project


class ModelFetchError(errors.CortexError):
    """A model could not be fetched from its storage."""

    kind = "batchapi.model_fetch_failed"


class ModelCache:
    def __init__(
        self, root: Path, data_roots: tuple[Path, ...], data_urls: tuple[str, ...]
    ) -> None:
        self.root = root.resolve()
        self.data_roots = data_roots
        self.data_urls = data_urls

    def fetch(self, url: str) -> Path:
        """The model at `url` as a local file or folder, downloaded if it is not cached."""
        loc = datasets.parse_location(url)
        if loc.scheme == "file":
            datasets.check_local(loc, self.data_roots)
            path = Path(loc.path)
            if not path.exists():
                raise ModelFetchError(f"{url}: no such file or folder")
            return path
        datasets.check_remote([url], self.data_urls)
        fs = datasets.filesystem(loc)
        target = url if loc.scheme in ("http", "https") else loc.path
        try:
            info = fs.info(target)
            folder = info.get("type") == "directory"
            version = _folder_version(fs, target) if folder else _version(info)
        except FileNotFoundError:
            raise ModelFetchError(f"{url}: not found") from None
        except Exception as err:
            raise ModelFetchError(f"{url}: {datasets.storage_reason(err)}") from None
        digest = hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:32]
        name = posixpath.basename(loc.path.rstrip("/")) or "model"
        dest = self.root / digest

        def download(tmp: Path) -> None:
            try:
                fs.get(target, str(tmp / name), recursive=folder)
            except Exception as err:
                raise ModelFetchError(f"{url}: {datasets.storage_reason(err)}") from None
            (tmp / "source.json").write_text(json.dumps({"url": url, "version": version}))

        return project.publish(dest, download) / name


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "md5Hash", "crc32c"):
        if info.get(key):
            return str(info[key])
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or ""
    return f"{info.get('size')}-{modified}"


def _folder_version(fs: Any, target: str) -> str:
    files = fs.find(target, detail=True)
    listing = sorted((name, _version(entry)) for name, entry in files.items())
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
