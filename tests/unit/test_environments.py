"""Environments without the registry: keys, .env files, the worker runtime's imports, builds
of a project without requirements, and removal over the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cortex import envfiles, environments, errors


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestKey:
    def test_no_environment_files_no_environment(self, tmp_path: Path) -> None:
        write(tmp_path / "predictor.py")
        write(tmp_path / ".env", "A=1\n")
        assert envfiles.key_for(tmp_path) is None

    def test_the_key_follows_the_content_of_each_file(self, tmp_path: Path) -> None:
        write(tmp_path / "requirements.txt", "humanize==4.9.0\n")
        first = envfiles.key_for(tmp_path)
        write(tmp_path / "predictor.py", "changed code does not change the environment")
        assert envfiles.key_for(tmp_path) == first
        write(tmp_path / "requirements.txt", "humanize==4.10.0\n")
        second = envfiles.key_for(tmp_path)
        write(tmp_path / "dependencies.sh", "echo hi\n")
        third = envfiles.key_for(tmp_path)
        assert len({first, second, third}) == 3

    def test_the_same_files_elsewhere_give_the_same_key(self, tmp_path: Path) -> None:
        for folder in ("a", "b"):
            write(tmp_path / folder / "requirements.txt", "tabulate\n")
        assert envfiles.key_for(tmp_path / "a") == envfiles.key_for(tmp_path / "b")

    def test_a_file_moved_between_roles_changes_the_key(self, tmp_path: Path) -> None:
        write(tmp_path / "a" / "requirements.txt", "x\n")
        write(tmp_path / "b" / "conda-packages.txt", "x\n")
        assert envfiles.key_for(tmp_path / "a") != envfiles.key_for(tmp_path / "b")


class TestDotenv:
    def test_the_python_dotenv_conventions(self) -> None:
        text = (
            "# comment\n"
            "\n"
            "A=1\n"
            "export B=two\n"
            "C='single # kept'\n"
            'D="double\\nline"\n'
            "E=value # comment\n"
            "F=\n"
        )
        assert envfiles.read_dotenv(text) == {
            "A": "1",
            "B": "two",
            "C": "single # kept",
            "D": "double\nline",
            "E": "value",
            "F": "",
        }

    def test_no_expansion_of_the_servers_variables(self) -> None:
        assert envfiles.read_dotenv("HOME_COPY=${HOME}\n") == {"HOME_COPY": "${HOME}"}

    @pytest.mark.parametrize(
        ("text", "line"),
        [
            ("A=1\nCORTEX_JOB_ID=x\n", 2),
            ("# c\n\n\nexport Cortex_anything=1\n", 4),
        ],
    )
    def test_cortex_names_are_refused_with_their_line(self, text: str, line: int) -> None:
        with pytest.raises(errors.InvalidSpec, match=f"line {line}: .*reserved"):
            envfiles.read_dotenv(text)

    def test_a_name_no_process_environment_takes_is_refused(self) -> None:
        with pytest.raises(errors.InvalidSpec, match="line 2: 'A-B' is not a valid"):
            envfiles.read_dotenv("OK=1\nA-B=2\n")

    def test_a_dotenv_too_big_for_an_environment_is_refused(self, tmp_path: Path) -> None:
        write(tmp_path / ".env", "A=" + "x" * envfiles.MAX_DOTENV_BYTES + "\n")
        with pytest.raises(errors.InvalidSpec, match="more than a worker's environment"):
            envfiles.check_project(tmp_path)

    def test_a_line_that_does_not_parse_is_named(self) -> None:
        with pytest.raises(errors.InvalidSpec, match="line 2: cannot be read"):
            envfiles.read_dotenv("A=1\nthis is not a binding\n")


def test_the_worker_runtime_needs_only_the_standard_library(tmp_path: Path) -> None:
    """The runtime folder alone, in an interpreter without site-packages: every module the
    worker imports is the standard library's or its own."""
    runtime = envfiles.runtime_dir(tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import cortex.worker.runtime, cortex.predictor;"
        "names = {m.split('.')[0] for m in sys.modules};"
        "std = {'__main__', *sys.stdlib_module_names, *sys.builtin_module_names};"
        "print('\\n'.join(sorted(names - std)))"
    )
    base = getattr(sys, "_base_executable", sys.executable)
    done = subprocess.run(
        [base, "-S", "-E", "-s", "-c", code, str(runtime)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["cortex"], done.stdout
    # Named by content: the same folder again, and nothing else of the package in it.
    assert envfiles.runtime_dir(tmp_path) == runtime
    shipped = {p.relative_to(runtime).as_posix() for p in runtime.rglob("*.py")}
    assert "cortex/service.py" not in shipped and "cortex/worker/runtime.py" in shipped


def test_a_build_that_needs_only_dependencies_sh(tmp_path: Path) -> None:
    """A real build (uv venv, no registry): the script runs with the environment active and
    its output is the build's log; a second build of the key is a cache hit."""
    project = tmp_path / "project"
    write(project / "dependencies.sh", 'echo "in $VIRTUAL_ENV"\ntouch "$VIRTUAL_ENV/made"\n')
    key = envfiles.key_for(project)
    assert key is not None
    envs = environments.Environments(tmp_path / "envs", tmp_path / "cache")
    assert envs.build(key, project).state == environments.BUILDING
    status = envs.wait(key, 60)
    assert status.state == environments.READY, envs.status(key)
    python = envs.python(key)
    assert python is not None and python.exists()
    assert (envs.path(key) / "made").exists()
    lines, next_line = envs.log_lines(key)
    assert f"in {envs.path(key)}" in lines
    assert next_line == (envs.root / f"{key}.log").stat().st_size
    assert envs.log_lines(key, next_line) == ([], next_line)
    assert envs.build(key, project).state == environments.READY


def test_the_log_is_read_in_whole_lines_from_an_offset(tmp_path: Path) -> None:
    envs = environments.Environments(tmp_path / "envs", tmp_path / "cache")
    log = write(tmp_path / "envs" / "k.log", "one\ntwo\nthree, still being writ")
    lines, offset = envs.log_lines("k")
    assert lines == ["one", "two"] and offset == len("one\ntwo\n")
    with open(log, "a") as out:
        out.write("ten\nfour\n")
    assert envs.log_lines("k", offset) == (
        ["three, still being written", "four"],
        log.stat().st_size,
    )
    assert envs.log_lines("missing", 7) == ([], 7)


def test_a_failed_build_leaves_no_environment_and_says_why(tmp_path: Path) -> None:
    project = tmp_path / "project"
    write(project / "dependencies.sh", "echo 'about to fail'\nexit 7\n")
    key = envfiles.key_for(project)
    assert key is not None
    envs = environments.Environments(tmp_path / "envs", tmp_path / "cache")
    envs.build(key, project)
    status = envs.wait(key, 60)
    assert status.state == environments.FAILED
    assert status.message is not None
    assert "dependencies.sh failed (exit code 7)" in status.message
    assert "about to fail" in status.message
    assert not envs.path(key).exists()
    assert envs.python(key) is None


def _fake_ready(envs: environments.Environments, key: str, size: int, used_at: float) -> None:
    folder = envs.path(key)
    write(folder / "lib" / "blob", "x" * size)
    marker = write(folder / "cortex-env.json", json.dumps({"key": key}))
    os.utime(marker, (used_at, used_at))


def test_unused_environments_go_least_recently_used_first_over_the_budget(
    tmp_path: Path,
) -> None:
    envs = environments.Environments(tmp_path / "envs", tmp_path / "cache", budget_bytes=2500)
    _fake_ready(envs, "oldest", 1000, 1000.0)
    _fake_ready(envs, "in-use-old", 1000, 1500.0)
    _fake_ready(envs, "middle", 1000, 2000.0)
    _fake_ready(envs, "newest", 1000, 3000.0)
    write(envs.path("crashed") / "bin" / "python")  # a build that never finished
    removed = envs.prune({"in-use-old"})
    # 4000 bytes over a 2500 budget: the two least recently used that nothing uses go.
    assert removed == ["oldest", "middle"]
    assert envs.python("in-use-old") is not None and envs.python("newest") is not None
    assert not envs.path("oldest").exists() and not envs.path("crashed").exists()
    # Under the budget now: nothing more goes.
    assert envs.prune(set()) == []


def test_within_the_budget_nothing_is_removed(tmp_path: Path) -> None:
    envs = environments.Environments(tmp_path / "envs", tmp_path / "cache", budget_bytes=10**6)
    _fake_ready(envs, "unused", 1000, 1000.0)
    assert envs.prune(set()) == []
    assert envs.python("unused") is not None
