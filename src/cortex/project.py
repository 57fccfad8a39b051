"""A project folder as a deploy archive: built by the CLI, checked and unpacked by the server.

The archive is a gzipped tar with fixed metadata (sorted names, zero times and owners), so the
same folder always gives the same bytes and a re-deploy of unchanged code is "up to date".
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pathspec

from cortex import errors

IGNORE_FILE = ".cortexignore"
MAX_ARCHIVE_BYTES = 256 << 20


def iter_files(root: Path, config_file: Path | None = None) -> Iterator[tuple[str, Path]]:
    """(archive name, path) of every file to ship: no dot-files (but the top `.env`) or
    dot-folders, no compiled Python, not the config file, nothing `.cortexignore` excludes,
    and no link that leads out of the folder."""
    root = root.resolve()
    ignore_path = root / IGNORE_FILE
    ignore = pathspec.GitIgnoreSpec.from_lines(
        ignore_path.read_text().splitlines() if ignore_path.is_file() else []
    )
    config = config_file.resolve() if config_file is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        keep = []
        for name in sorted(dirnames):
            rel = (rel_dir / name).as_posix()
            full = here / name
            if name.startswith(".") or ignore.match_file(rel + "/"):
                continue
            if full.is_symlink():
                continue  # never follow a linked folder: it may lead anywhere
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            full = here / name
            rel = (rel_dir / name).as_posix()
            # Dot-files stay behind, but the project's .env (its workers' variables).
            shipped = name == ".env" and rel_dir == Path(".")
            if (name.startswith(".") and not shipped) or name.endswith((".pyc", ".pyo", ".pyd")):
                continue
            if ignore.match_file(rel):
                continue
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    continue
                if any(part.startswith(".") for part in target.relative_to(root).parts):
                    continue  # a link must not ship what the folder itself would not
            if config is not None and full.resolve() == config:
                continue
            if full.is_file():
                yield rel, full


def build_archive(root: Path, config_file: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name, path in iter_files(root, config_file):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def archive_names(archive: bytes) -> set[str]:
    """The file names in an archive, refusing anything that could land outside its folder."""
    names = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar:
                name = member.name
                parts = Path(name).parts
                if name.startswith("/") or ".." in parts or not parts:
                    raise errors.InvalidSpec(f"the project archive holds an unsafe path: {name!r}")
                if not (member.isfile() or member.isdir()):
                    raise errors.InvalidSpec(
                        f"the project archive holds {name!r}, which is not a plain file"
                    )
                if member.isfile():
                    names.add(Path(name).as_posix())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise errors.InvalidSpec(f"the project archive is not a valid .tar.gz: {err}") from None
    return names


def extract(archive: bytes, dest: Path) -> Path:
    """Unpack into `dest` once; concurrent callers see either nothing or the whole folder."""

    def unpack(tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(tmp, filter="data")

    return publish(dest, unpack)


def publish(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Create the folder `dest` once, with what `fill` writes into a fresh folder beside it,
    renamed into place: a reader sees nothing or all of it, and of two writers one wins."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
