"""File datasets on local folders: globs, prefixes, listing, and the JSON-lines reader."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from cortex import datasets, errors, globs, jobspec, spec


@pytest.mark.parametrize(
    ("pattern", "url", "matches"),
    [
        ("**.jsonl", "s3://b/a/b/c.jsonl", True),
        ("*.jsonl", "s3://b/c.jsonl", False),  # * stops at /
        ("s3://b/*.jsonl", "s3://b/c.jsonl", True),
        ("s3://b/*.jsonl", "s3://b/a/c.jsonl", False),
        ("s3://b/**/c.jsonl", "s3://b/a/x/c.jsonl", True),
        ("s3://b/?.txt", "s3://b/a.txt", True),
        ("s3://b/?.txt", "s3://b/ab.txt", False),
        ("**/[a-c]*.txt", "s3://b/x/b1.txt", True),
        ("**/[!a-c]*.txt", "s3://b/x/b1.txt", False),
        ("**.{jpg,png}", "s3://b/x.png", True),
        ("**.{jpg,png}", "s3://b/x.gif", False),
        ("**/{a,b*/c}/*", "s3://b/bb/c/x", True),
        (r"**\*.txt", "s3://b/*.txt", True),
        (r"**\*.txt", "s3://b/a.txt", False),
        ("**/é*", "s3://b/x/été.txt", True),
    ],
)
def test_globs_follow_the_spec(pattern: str, url: str, matches: bool) -> None:
    assert globs.compile_glob(pattern).matches(url) is matches


@pytest.mark.parametrize(
    ("pattern", "url", "matches"),
    [
        ("[a-c-]", "-", True),  # a `-` after a range is itself
        ("[\\]]x", "]x", True),
        ("[^a]", "^", True),  # `^` is a character here, not RE2's negation
        ("[!^]", "^", False),
        ("a\nb*", "a\nb\nc", True),  # any character but `/`, a newline included
        ("{a,{b,{c,d}}}.txt", "d.txt", True),
        ("{,x}y", "y", True),
    ],
)
def test_globs_mean_what_they_say_in_re2(pattern: str, url: str, matches: bool) -> None:
    assert globs.compile_glob(pattern).matches(url) is matches


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("a[", "never closed"),
        ("{a,b", "never closed"),
        ("x\\", "escape character"),
        ("[]", "empty character class"),
        ("[z-a]", "out of order"),
        ("a}", "unexpected"),
        ("{" * 17 + "}" * 17, "deeper than 16 levels"),
        ("{" * 5000 + "}" * 5000, "at most 1024"),  # answered 500 (a RecursionError) before
        ("*" * 1025, "at most 1024"),
        ("\ud800", "not valid unicode"),
    ],
)
def test_bad_globs_are_refused_with_the_reason(pattern: str, says: str) -> None:
    with pytest.raises(globs.GlobError, match=says):
        globs.compile_glob(pattern)


def test_too_many_globs_are_refused_with_the_bound() -> None:
    with pytest.raises(globs.GlobError, match="at most 100"):
        globs.Globs(["*"] * 101)


def test_any_pattern_compiles_or_is_refused_as_a_glob_error() -> None:
    """Random patterns over the glob's own metacharacters: each compiles, or is refused with
    GlobError (a 400 `batchapi.invalid_glob`), never anything else (a 500)."""
    rng = random.Random(1234)
    alphabet = "*?[]{},!-\\/a^.()|+$"
    for _ in range(20_000):
        pattern = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            compiled = globs.compile_glob(pattern)
        except globs.GlobError:
            continue
        compiled.matches("s3://b/" + pattern)


def test_hostile_globs_match_in_linear_time() -> None:
    """Stars that make a backtracking matcher explode (`**a` nine times, then `**b`, took
    seconds on a path of a few hundred characters with Python's re) against long paths."""
    hostile = globs.compile_glob("**a" * 9 + "**b")
    nested = globs.compile_glob("{" * 16 + "*a*," * 16 + "}" * 16 + "*b")
    url = "s3://bucket/" + "/".join(["a" * 200] * 50)  # 10 kB of `a`, no `b`
    started = time.perf_counter()
    for _ in range(100):
        assert not hostile.matches(url)
        assert not nested.matches(url)
    assert time.perf_counter() - started < 2.0  # about 10 ms on a loaded laptop


def test_keep_needs_an_include_and_no_exclude() -> None:
    inc = globs.Globs(["**.json", "**.jsonl"])
    exc = globs.Globs(["**/skip/**"])
    assert globs.keep("s3://b/a.json", inc, exc)
    assert globs.keep("s3://b/a.jsonl", inc, exc)
    assert not globs.keep("s3://b/a.txt", inc, exc)
    assert not globs.keep("s3://b/skip/a.json", inc, exc)
    assert globs.keep("s3://b/a.txt", globs.Globs([]), exc)


def test_overlapping_prefixes_are_listed_once() -> None:
    kept = datasets.distinct_locations(
        ["s3://b/data/img", "s3://b/data/", "s3://b/data/", "s3://b/other", "/d/x", "file:///d/"]
    )
    assert [loc.prefix for loc in kept] == ["s3://b/data/", "s3://b/other", "file:///d/"]


def _tree(root: Path) -> Path:
    data = root / "data"
    for rel, text in {
        "images/img_1.png": "",
        "images/img_2.png": "",
        "images/other/x.png": "",
        "images/img_dir/y.png": "",
        "images2/z.png": "",
        "text/a.jsonl": "1\n",
    }.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    return data


def _list(roots: tuple[Path, ...], *paths: str, **kw: list[str]) -> list[str]:
    ds = jobspec.FileDataset.model_validate({"s3_paths": list(paths), "batch_size": 1, **kw})
    return list(datasets.list_files(ds, roots))


def test_local_listing_uses_string_prefixes_and_globs(tmp_path: Path) -> None:
    data = _tree(tmp_path)
    roots = (tmp_path,)
    assert _list(roots, f"{data}/images/img") == [
        f"{data}/images/img_1.png",
        f"{data}/images/img_2.png",
        f"{data}/images/img_dir/y.png",
    ]
    # A prefix without a slash also matches images2/; file:// URLs come back as file:// URLs.
    # (`*` stops at `/`: img_dir/y.png is not excluded by **/img_*.)
    assert _list(roots, f"file://{data}/images", excludes=["**/img_*"]) == [
        f"file://{data}/images/img_dir/y.png",
        f"file://{data}/images/other/x.png",
        f"file://{data}/images2/z.png",
    ]
    assert _list(roots, f"{data}/", includes=["**/text/*.jsonl"]) == [f"{data}/text/a.jsonl"]
    assert _list(roots, f"{data}/nothing-here") == []


def test_local_paths_stay_inside_the_roots(tmp_path: Path) -> None:
    data = _tree(tmp_path / "root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("1\n")
    roots = (tmp_path / "root",)
    for path in (str(outside), f"{data}/../../outside/", f"file://{outside}/"):
        with pytest.raises(datasets.PathNotAllowed):
            _list(roots, path)
    # A folder link that leads outside is refused by its name; a file link is refused when
    # listed; a folder link met while walking is not followed.
    os.symlink(outside, data / "escape")
    with pytest.raises(datasets.PathNotAllowed, match="through a link"):
        _list(roots, f"{data}/escape/")
    assert _list(roots, f"{data}/es") == []
    os.symlink(outside / "secret.jsonl", data / "secret.jsonl")
    with pytest.raises(datasets.PathNotAllowed, match="outside the server's data roots"):
        _list(roots, f"{data}/")
    assert _list(roots, f"{data}/", excludes=["**/secret.jsonl"])  # not listed: not refused


def _values(path: Path, roots: tuple[Path, ...]) -> list[object]:
    return [json.loads(v) for v in datasets.read_values(str(path), roots)]


def test_reader_handles_values_and_characters_split_across_chunks(tmp_path: Path) -> None:
    chunk = datasets.READ_CHUNK_BYTES
    # After a 3-byte byte order mark, the filler ends 2 bytes before the chunk boundary, so
    # the next value and the two-byte "é" in it straddle the boundary; the final line has no
    # newline.
    line = '"' + "x" * 1021 + '"\n'
    count, rest = divmod(chunk - 5, len(line))
    filler = line * count + '"' + "y" * (rest - 3) + '"\n'
    assert len(filler) == chunk - 5
    text = filler + '"é"\n{"k": "é€😀"}\n\n  \r\n[1, 2]\t"three"\n4'
    data = b"\xef\xbb\xbf" + text.encode()
    assert data[chunk - 1 : chunk + 1] == "é".encode()  # the boundary cuts "é" in two
    (tmp_path / "f.jsonl").write_bytes(data)
    values = _values(tmp_path / "f.jsonl", (tmp_path,))
    assert len(values) == count + 1 + 5
    assert values[count + 1 :] == ["é", {"k": "é€😀"}, [1, 2], "three", 4]


def test_reader_edge_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n \n")
    (tmp_path / "crlf.jsonl").write_bytes(b'{"a":1}\r\n{"a":2}\r\n')
    assert _values(tmp_path / "empty.jsonl", (tmp_path,)) == []
    assert _values(tmp_path / "blank.jsonl", (tmp_path,)) == []
    assert _values(tmp_path / "crlf.jsonl", (tmp_path,)) == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("content", "kind", "where"),
    [
        (b'1\n2\n{"a": \n', "batchapi.invalid_item", "line 3: not valid JSON"),
        (b"1\nNaN\n", "batchapi.invalid_item", "line 2: not valid JSON"),
        (b'1\n"\xff"\n', "batchapi.invalid_item", "line 2: not valid UTF-8"),
        (b"1\n2\n" + b"[" * 100 + b"]" * 100, "batchapi.invalid_item", "line 3: nests deeper"),
        (
            b'1\n"' + b"x" * spec.MAX_ITEM_BYTES + b'"\n',
            "batchapi.item_size_exceeds_limit",
            "line 2: an item has size 262146 bytes which exceeds the limit (262144 bytes)",
        ),
    ],
)
def test_reader_errors_name_the_file_and_line(
    tmp_path: Path, content: bytes, kind: str, where: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(datasets.DatasetError) as info:
        _values(path, (tmp_path,))
    assert info.value.kind == kind
    assert info.value.message.startswith(f"{path}, {where}")


def test_batches_fill_across_files(tmp_path: Path) -> None:
    for name, text in {"a.jsonl": "1\n2\n3", "b.jsonl": "", "c.jsonl": "4\n5\n"}.items():
        (tmp_path / name).write_text(text)
    ds = jobspec.FileDataset.model_validate({"s3_paths": [f"{tmp_path}/"], "batch_size": 2})
    values = datasets.items("delimited_files", ds, (tmp_path,))
    assert list(datasets.batch_payloads(values, 2)) == [("[1,2]", 2), ("[3,4]", 2), ("[5]", 1)]
    urls = datasets.items("file_path_lister", ds, (tmp_path,))
    assert [json.loads(p) for p, _ in datasets.batch_payloads(urls, 2)] == [
        [f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl"],
        [f"{tmp_path}/c.jsonl"],
    ]


@pytest.mark.parametrize(
    "url", ["nosuchproto://b/x", "ftp://host/x", "sftp://host/x", "memory://x", "HDFS://nn/x"]
)
def test_unknown_schemes_are_refused(url: str) -> None:
    """fsspec would read (or connect to) each of these; a submission may not ask for them."""
    with pytest.raises(errors.InvalidSubmission) as info:
        datasets.parse_location(url)
    assert info.value.kind == "batchapi.invalid_path"
    assert "is not read by this server: use s3://, gs://, http(s)://" in info.value.message


def test_remote_datasets_can_be_limited_to_url_prefixes() -> None:
    allowed = ("s3://data/jobs/", "https://files.example.com/")
    datasets.check_remote(["s3://data/jobs/a.jsonl", "https://files.example.com/x"], allowed)
    datasets.check_remote(["/local/paths/are/the/roots/business"], allowed)
    for outside in (
        "s3://data/private/a.jsonl",
        "s3://data-jobs/x",
        "gs://data/jobs/x",
        "https://files.example.com.evil.org/x",
        "http://169.254.169.254/latest/meta-data/",
    ):
        with pytest.raises(datasets.PathNotAllowed, match="CORTEX_DATA_URLS"):
            datasets.check_remote([outside], allowed)
    datasets.check_remote(["http://169.254.169.254/"], ())  # none set: anywhere
