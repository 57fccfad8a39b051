"""A project folder as a deploy archive: built by the CLI, checked and unpacked by the server;
and the server's unpacked projects, removed once nothing uses them.

The archive is a gzipped tar with fixed metadata (sorted names, zero times and owners), so the
same folder always gives the same bytes and a re-deploy of unchanged code is "up to date".
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pathspec

from cortex import errors

IGNORE_FILE = ".cortexignore"
MAX_ARCHIVE_BYTES = 256 << 20
# What an archive may unpack to (`CORTEX_MAX_PROJECT_BYTES`): a 2 MB archive can hold 2 GB of
# zeros. Each file and folder counts as at least one block, as it does on the file system, so
# that a million empty entries are not free either.
DEFAULT_MAX_UNPACKED_BYTES = 1 << 30
_BLOCK_BYTES = 4096
# An unpacking that a crash left half done is removed once this old.
_STALE_UNPACK_S = 3600.0


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


def archive_names(archive: bytes, max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> set[str]:
    """The file names in an archive, refusing anything that could land outside its folder,
    and an archive that would unpack to more than `max_unpacked_bytes` (read from the
    headers, so it is refused before anything is written)."""
    names = set()
    unpacked = _Unpacked(max_unpacked_bytes)
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
                unpacked.add(member)
                if member.isfile():
                    names.add(Path(name).as_posix())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise errors.InvalidSpec(f"the project archive is not a valid .tar.gz: {err}") from None
    return names


class _Unpacked:
    """The bytes an archive's members take once unpacked, refused past a limit."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total = 0

    def add(self, member: tarfile.TarInfo) -> None:
        self.total += max(member.size, _BLOCK_BYTES)
        if self.total > self.max_bytes:
            raise errors.InvalidSpec(
                f"the project unpacks to more than {self.max_bytes} bytes "
                f"(CORTEX_MAX_PROJECT_BYTES; {member.name!r} passes it)"
            )


def extract(
    archive: bytes, dest: Path, max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
) -> Path:
    """Unpack into `dest` once; concurrent callers see either nothing or the whole folder.
    The limit is enforced while writing too: an archive stored before it was lowered (or
    before it existed) stops at the limit instead of filling the disk."""

    def unpack(tmp: Path) -> None:
        unpacked = _Unpacked(max_unpacked_bytes)

        def within_limit(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
            unpacked.add(member)
            return tarfile.data_filter(member, path)

        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            tar.extractall(tmp, filter=within_limit)

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


class Projects:
    """The unpacked projects of a server, one folder per API version (`<root>/<spec id>`),
    where workers run; removed once nothing uses them (`prune`).

    A folder is in use while its version serves, is being built, or runs an in-progress job
    (the store says which), or while a deploy is unpacking it and has not stored it yet
    (`deploying`). A removed folder is unpacked again from the store if it is needed later."""

    def __init__(self, root: Path, max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES) -> None:
        self.root = root
        self.max_unpacked_bytes = max_unpacked_bytes
        self._deploying: dict[str, int] = {}
        # Held by `prune` from reading what is in use to moving the rest aside, and by a
        # deploy to say it starts: a deploy is either seen by the prune or starts after it.
        self._lock = threading.Lock()

    def path(self, spec_id: str) -> Path:
        return (self.root / spec_id).resolve()

    def extract(self, spec_id: str, archive: bytes) -> Path:
        return extract(archive, self.path(spec_id), self.max_unpacked_bytes)

    @contextlib.contextmanager
    def deploying(self, spec_id: str) -> Iterator[Path]:
        """Keep the version's folder from `prune` while a deploy unpacks and stores it."""
        with self._lock:
            self._deploying[spec_id] = self._deploying.get(spec_id, 0) + 1
        try:
            yield self.path(spec_id)
        finally:
            with self._lock:
                self._deploying[spec_id] -= 1
                if not self._deploying[spec_id]:
                    del self._deploying[spec_id]

    def prune(self, in_use: Callable[[], set[str]]) -> list[str]:
        """Remove the folders of versions that nothing uses (and unpackings a crash left);
        returns their spec ids. Folders are moved aside under the lock (a rename), and
        deleted after it, so that a deploy waits for no deletion."""
        if not self.root.is_dir():
            return []
        removed: list[str] = []
        trash: list[Path] = []
        now = time.time()
        with self._lock:
            keep = in_use() | set(self._deploying)
            for folder in self.root.iterdir():
                name = folder.name
                if name.startswith(".unpack-"):
                    with contextlib.suppress(OSError):
                        if now - folder.stat().st_mtime > _STALE_UNPACK_S:
                            trash.append(folder)
                    continue
                if name.startswith(".") or name in keep or not folder.is_dir():
                    continue
                aside = self.root / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                with contextlib.suppress(OSError):
                    folder.rename(aside)
                    trash.append(aside)
                    removed.append(name)
            # Trash a previous prune could not delete (it was stopped) goes too.
            trash += [
                f for f in self.root.iterdir() if f.name.startswith(".trash-") and f not in trash
            ]
        for folder in trash:
            shutil.rmtree(folder, ignore_errors=True)
        return removed
