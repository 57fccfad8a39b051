"""The project folder as a deploy archive: what is shipped, determinism, and safe unpacking."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cortex import errors
from cortex.project import Projects, archive_names, build_archive, extract, iter_files


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def shipped(root: Path, config: Path | None = None) -> set[str]:
    return {name for name, _ in iter_files(root, config)}


def hand_made_archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def file_member(name: str, data: bytes = b"data") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write(root / "predictor.py", "class PythonPredictor: ...\n")
    write(root / "requirements.txt", "numpy\n")
    write(root / "cortex.yaml", "- name: a\n")
    write(root / "lib" / "util.py", "X = 1\n")
    write(root / "lib" / "deep" / "data.json", "{}")
    return root


class TestIterFiles:
    def test_plain_files_with_posix_names(self, project: Path) -> None:
        assert shipped(project) == {
            "predictor.py",
            "requirements.txt",
            "cortex.yaml",
            "lib/util.py",
            "lib/deep/data.json",
        }

    def test_paths_point_at_the_files(self, project: Path) -> None:
        for name, path in iter_files(project):
            assert path == project.resolve() / name
            assert path.is_file()

    def test_config_file_excluded(self, project: Path) -> None:
        names = shipped(project, project / "cortex.yaml")
        assert "cortex.yaml" not in names
        assert "predictor.py" in names

    def test_config_file_given_relative_or_unresolved(self, project: Path) -> None:
        config = project / "lib" / ".." / "cortex.yaml"
        assert "cortex.yaml" not in shipped(project, config)

    def test_config_file_in_subfolder_excluded(self, project: Path) -> None:
        config = write(project / "lib" / "api.yaml")
        names = shipped(project, config)
        assert "lib/api.yaml" not in names
        assert "cortex.yaml" in names

    def test_dot_files_and_folders_excluded_but_the_top_dotenv(self, project: Path) -> None:
        write(project / ".env", "A=1\n")
        write(project / ".secret")
        write(project / ".git" / "config")
        write(project / "lib" / ".hidden" / "x.py")
        write(project / "lib" / ".local.py")
        write(project / "lib" / ".env", "B=2\n")
        names = shipped(project)
        # The project's .env is its workers' variables (as in Cortex); no other dot-file goes.
        assert ".env" in names
        others = names - {".env"}
        assert not any(part.startswith(".") for name in others for part in name.split("/"))
        assert "lib/util.py" in names

    def test_a_cortexignore_can_keep_the_dotenv_behind(self, project: Path) -> None:
        write(project / ".env", "A=1\n")
        write(project / ".cortexignore", ".env\n")
        assert ".env" not in shipped(project)

    @pytest.mark.parametrize("suffix", [".pyc", ".pyo", ".pyd"])
    def test_compiled_python_excluded(self, project: Path, suffix: str) -> None:
        write(project / f"mod{suffix}")
        write(project / "__pycache__" / f"util.cpython-311{suffix}")
        names = shipped(project)
        assert f"mod{suffix}" not in names
        assert f"__pycache__/util.cpython-311{suffix}" not in names

    def test_cortexignore_patterns(self, project: Path) -> None:
        write(project / "data.csv")
        write(project / "lib" / "more.csv")
        write(project / "notes.md")
        write(project / "keep.md")
        write(project / "build" / "out.bin")
        write(project / "lib" / "build" / "nested.bin")
        write(project / "logs" / "a.log")
        write(project / ".cortexignore", "*.csv\n*.md\n!keep.md\nbuild/\n# comment\n/logs\n")
        names = shipped(project)
        assert "data.csv" not in names
        assert "lib/more.csv" not in names
        assert "notes.md" not in names
        assert "keep.md" in names
        assert "build/out.bin" not in names
        assert "lib/build/nested.bin" not in names
        assert "logs/a.log" not in names
        assert ".cortexignore" not in names
        assert {"predictor.py", "lib/util.py", "lib/deep/data.json"} <= names

    def test_cortexignore_anchored_pattern(self, project: Path) -> None:
        write(project / "lib" / "deep" / "other.json")
        write(project / ".cortexignore", "/lib/deep/data.json\n")
        names = shipped(project)
        assert "lib/deep/data.json" not in names
        assert "lib/deep/other.json" in names

    def test_cortexignore_folder_pattern_without_slash(self, project: Path) -> None:
        write(project / ".cortexignore", "deep\n")
        names = shipped(project)
        assert "lib/deep/data.json" not in names
        assert "lib/util.py" in names

    def test_cortexignore_folder_only_pattern_spares_files(self, project: Path) -> None:
        write(project / "cache")  # a file named like the folder pattern
        write(project / "lib" / "cache" / "x.bin")
        write(project / ".cortexignore", "cache/\n")
        names = shipped(project)
        assert "cache" in names
        assert "lib/cache/x.bin" not in names

    def test_cortexignore_in_subfolder_is_not_read(self, project: Path) -> None:
        write(project / "lib" / ".cortexignore", "util.py\n")
        assert "lib/util.py" in shipped(project)

    def test_symlink_to_file_outside_not_shipped(self, tmp_path: Path, project: Path) -> None:
        secret = write(tmp_path / "outside" / "secret.txt", "top secret")
        (project / "leak.txt").symlink_to(secret)
        (project / "lib" / "leak2.txt").symlink_to("../../outside/secret.txt")
        names = shipped(project)
        assert "leak.txt" not in names
        assert "lib/leak2.txt" not in names
        assert b"top secret" not in gzip.decompress(build_archive(project))

    def test_symlinked_directory_not_followed(self, tmp_path: Path, project: Path) -> None:
        outside = tmp_path / "outside"
        write(outside / "secret.py")
        (project / "linked").symlink_to(outside, target_is_directory=True)
        (project / "lib_again").symlink_to(project / "lib", target_is_directory=True)
        names = shipped(project)
        assert not any(name.startswith(("linked", "lib_again")) for name in names)
        assert "lib/util.py" in names

    def test_symlink_to_file_inside_shipped(self, project: Path) -> None:
        (project / "alias.py").symlink_to("lib/util.py")
        (project / "lib" / "up.txt").symlink_to(project / "requirements.txt")
        files = dict(iter_files(project))
        assert files["alias.py"].read_text() == "X = 1\n"
        assert files["lib/up.txt"].read_text() == "numpy\n"

    def test_dangling_symlink_skipped(self, project: Path) -> None:
        (project / "dangling.py").symlink_to(project / "nope.py")
        assert "dangling.py" not in shipped(project)

    def test_symlink_to_config_file_excluded(self, project: Path) -> None:
        (project / "copy.yaml").symlink_to("cortex.yaml")
        assert "copy.yaml" not in shipped(project, project / "cortex.yaml")

    def test_root_given_through_a_symlink(self, tmp_path: Path, project: Path) -> None:
        link = tmp_path / "link-to-proj"
        link.symlink_to(project, target_is_directory=True)
        assert shipped(link) == shipped(project)

    def test_empty_folder(self, tmp_path: Path) -> None:
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        assert shipped(tmp_path / "empty") == set()


def read_archive(archive: bytes) -> dict[str, tuple[bytes, tarfile.TarInfo]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member)
            assert handle is not None
            out[member.name] = (handle.read(), member)
    return out


class TestBuildArchive:
    def test_contents(self, project: Path) -> None:
        contents = read_archive(build_archive(project, project / "cortex.yaml"))
        assert set(contents) == {
            "predictor.py",
            "requirements.txt",
            "lib/util.py",
            "lib/deep/data.json",
        }
        assert contents["lib/util.py"][0] == b"X = 1\n"
        assert contents["requirements.txt"][0] == b"numpy\n"

    def test_fixed_metadata(self, project: Path) -> None:
        for _, info in read_archive(build_archive(project)).values():
            assert info.mtime == 0
            assert info.uid == 0
            assert info.gid == 0
            assert info.uname == ""
            assert info.gname == ""
            assert info.isfile()

    def test_executable_bit_kept(self, project: Path) -> None:
        script = write(project / "dependencies.sh", "echo hi\n")
        script.chmod(0o755)
        (project / "predictor.py").chmod(0o600)
        contents = read_archive(build_archive(project))
        assert contents["dependencies.sh"][1].mode == 0o755
        assert contents["predictor.py"][1].mode == 0o644

    def test_deterministic(self, project: Path) -> None:
        first = build_archive(project)
        assert build_archive(project) == first

    def test_deterministic_after_touching_mtimes(self, project: Path) -> None:
        first = build_archive(project)
        for _, path in iter_files(project):
            os.utime(path, (1_000_000_000, 1_234_567_890))
        os.utime(project / "lib", (5, 5))
        assert build_archive(project) == first

    def test_same_tree_elsewhere_same_bytes(self, tmp_path: Path) -> None:
        for root in (tmp_path / "one", tmp_path / "two"):
            # written in different orders, so directory order on disk may differ
            files = ["b.py", "a.py", "z/y.txt", "m/n.txt"]
            if root.name == "two":
                files.reverse()
            for name in files:
                write(root / name, name)
        assert build_archive(tmp_path / "one") == build_archive(tmp_path / "two")

    def test_changes_when_content_changes(self, project: Path) -> None:
        first = build_archive(project)
        write(project / "lib" / "util.py", "X = 2\n")
        assert build_archive(project) != first

    def test_changes_when_file_added(self, project: Path) -> None:
        first = build_archive(project)
        write(project / "new.py")
        assert build_archive(project) != first

    def test_unaffected_by_ignored_files(self, project: Path) -> None:
        first = build_archive(project)
        write(project / ".hidden", "x")
        write(project / "mod.pyc", "x")
        assert build_archive(project) == first

    def test_names_of_own_archive(self, project: Path) -> None:
        archive = build_archive(project, project / "cortex.yaml")
        assert archive_names(archive) == shipped(project, project / "cortex.yaml")

    def test_empty_project(self, tmp_path: Path) -> None:
        archive = build_archive(tmp_path)
        assert archive_names(archive) == set()


class TestArchiveNames:
    def test_plain_files_and_dirs(self) -> None:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        archive = hand_made_archive(
            file_member("a.py"), (folder, None), file_member("sub/b.txt"), file_member("./c.py")
        )
        assert archive_names(archive) == {"a.py", "sub/b.txt", "c.py"}

    @pytest.mark.parametrize("name", ["../x", "a/../../x", "sub/../x", ".."])
    def test_parent_refused(self, name: str) -> None:
        archive = hand_made_archive(file_member("ok.py"), file_member(name))
        with pytest.raises(errors.InvalidSpec, match="unsafe path"):
            archive_names(archive)

    @pytest.mark.parametrize("name", ["/abs", "/etc/passwd"])
    def test_absolute_refused(self, name: str) -> None:
        archive = hand_made_archive(file_member(name))
        with pytest.raises(errors.InvalidSpec, match="unsafe path"):
            archive_names(archive)

    def test_symlink_member_refused(self) -> None:
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive = hand_made_archive(file_member("ok.py"), (link, None))
        with pytest.raises(errors.InvalidSpec, match="not a plain file"):
            archive_names(archive)

    def test_relative_symlink_member_refused(self) -> None:
        link = tarfile.TarInfo("link.py")
        link.type = tarfile.SYMTYPE
        link.linkname = "ok.py"
        with pytest.raises(errors.InvalidSpec, match="not a plain file"):
            archive_names(hand_made_archive(file_member("ok.py"), (link, None)))

    def test_hard_link_member_refused(self) -> None:
        link = tarfile.TarInfo("hard")
        link.type = tarfile.LNKTYPE
        link.linkname = "ok.py"
        with pytest.raises(errors.InvalidSpec, match="not a plain file"):
            archive_names(hand_made_archive(file_member("ok.py"), (link, None)))

    @pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
    def test_special_member_refused(self, kind: bytes) -> None:
        member = tarfile.TarInfo("dev")
        member.type = kind
        with pytest.raises(errors.InvalidSpec, match="not a plain file"):
            archive_names(hand_made_archive((member, None)))

    @pytest.mark.parametrize(
        "data", [b"", b"not an archive", gzip.compress(b"gzip but not tar" * 40)]
    )
    def test_not_an_archive(self, data: bytes) -> None:
        with pytest.raises(errors.InvalidSpec, match=r"not a valid \.tar\.gz"):
            archive_names(data)

    def test_truncated_archive(self, project: Path) -> None:
        archive = build_archive(project)
        with pytest.raises(errors.InvalidSpec):
            archive_names(archive[: len(archive) // 2])

    def test_uncompressed_tar_refused(self) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info, data = file_member("a.py")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        with pytest.raises(errors.InvalidSpec, match=r"not a valid \.tar\.gz"):
            archive_names(buffer.getvalue())


class TestExtract:
    def test_unpacks(self, tmp_path: Path, project: Path) -> None:
        dest = tmp_path / "unpacked" / "spec-1"
        result = extract(build_archive(project, project / "cortex.yaml"), dest)
        assert result == dest
        assert (dest / "predictor.py").read_text() == "class PythonPredictor: ...\n"
        assert (dest / "lib" / "deep" / "data.json").read_text() == "{}"
        assert not (dest / "cortex.yaml").exists()
        found = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
        assert found == shipped(project, project / "cortex.yaml")

    def test_executable_bit_survives(self, tmp_path: Path, project: Path) -> None:
        write(project / "dependencies.sh", "echo hi\n").chmod(0o755)
        dest = extract(build_archive(project), tmp_path / "out")
        assert os.access(dest / "dependencies.sh", os.X_OK)
        assert not os.access(dest / "predictor.py", os.X_OK)

    def test_idempotent(self, tmp_path: Path, project: Path) -> None:
        archive = build_archive(project)
        dest = tmp_path / "out"
        extract(archive, dest)
        (dest / "marker").write_text("kept")
        # a second call with a different archive leaves the folder as it is
        write(project / "new.py")
        assert extract(build_archive(project), dest) == dest
        assert (dest / "marker").read_text() == "kept"
        assert not (dest / "new.py").exists()

    def test_no_temporary_folders_left(self, tmp_path: Path, project: Path) -> None:
        parent = tmp_path / "cache"
        extract(build_archive(project), parent / "a")
        extract(build_archive(project), parent / "a")
        assert [p.name for p in parent.iterdir()] == ["a"]

    def test_bad_archive_leaves_nothing(self, tmp_path: Path) -> None:
        parent = tmp_path / "cache"
        with pytest.raises(tarfile.TarError):
            extract(b"not an archive", parent / "a")
        assert list(parent.iterdir()) == []

    def test_unsafe_member_not_written_outside(self, tmp_path: Path) -> None:
        archive = hand_made_archive(file_member("../escaped.txt"))
        parent = tmp_path / "cache"
        with pytest.raises(tarfile.TarError):
            extract(archive, parent / "a")
        assert not (parent / "escaped.txt").exists()
        assert not (tmp_path / "escaped.txt").exists()
        assert not (parent / "a").exists()


def zeros_archive(size: int, name: str = "zeros.bin") -> bytes:
    """A gzipped tar holding one file of `size` zero bytes, written in slices: a few MB for a
    gigabyte."""
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|") as tar,
    ):
        info = tarfile.TarInfo(name)
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readinto(self, view: Any) -> int:
                count = min(len(view), self.left)
                view[:count] = bytes(count)
                self.left -= count
                return count

        tar.addfile(info, Zeros())
    return buffer.getvalue()


class TestUnpackedSize:
    def test_an_archive_that_unpacks_past_the_limit_is_refused_from_its_headers(self) -> None:
        archive = zeros_archive(300 << 20)
        assert len(archive) < 1 << 20  # 300 kB of archive
        with pytest.raises(errors.InvalidSpec, match=r"unpacks to more than 104857600 bytes"):
            archive_names(archive, max_unpacked_bytes=100 << 20)
        assert archive_names(archive, max_unpacked_bytes=400 << 20) == {"zeros.bin"}

    def test_every_entry_counts_as_a_block_at_least(self) -> None:
        archive = hand_made_archive(*(file_member(f"f{i}", b"") for i in range(300)))
        with pytest.raises(errors.InvalidSpec, match="unpacks to more than"):
            archive_names(archive, max_unpacked_bytes=1 << 20)  # 300 x 4 KiB

    def test_extracting_stops_at_the_limit_and_leaves_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(errors.InvalidSpec, match="unpacks to more than"):
            extract(zeros_archive(50 << 20), tmp_path / "cache" / "a", max_unpacked_bytes=1 << 20)
        assert list((tmp_path / "cache").iterdir()) == []


class TestProjects:
    def test_folders_nothing_uses_are_removed_and_unpacked_again_when_needed(
        self, tmp_path: Path, project: Path
    ) -> None:
        projects = Projects(tmp_path / "projects")
        archive = build_archive(project)
        for spec_id in ("v1", "v2", "v3"):
            projects.extract(spec_id, archive)
        (tmp_path / "projects" / ".unpack-crashed").mkdir()  # a fresh one: maybe in progress

        assert sorted(projects.prune(lambda: {"v2"})) == ["v1", "v3"]
        left = sorted(p.name for p in (tmp_path / "projects").iterdir())
        assert left == [".unpack-crashed", "v2"]
        assert (projects.extract("v1", archive) / "predictor.py").is_file()

    def test_a_version_being_deployed_is_kept(self, tmp_path: Path, project: Path) -> None:
        projects = Projects(tmp_path / "projects")
        with projects.deploying("v1") as folder:
            projects.extract("v1", build_archive(project))
            assert projects.prune(set) == []
            assert folder.is_dir()
        assert projects.prune(set) == ["v1"]
        assert not folder.exists()
