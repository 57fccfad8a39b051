"""Globs as the spec's datasets use them (gobwas/glob with separator `/`), matched by RE2.

`*` matches any run of characters except `/`, `**` any run including `/`, `?` one character
except `/`, `[abc]`, `[a-z]` and `[!abc]` one character of (or not of) a set, `{a,b}` either
alternative (alternatives may hold patterns and nest), and `\\` escapes the next character. A
glob matches the whole string it is given: for datasets that is a file's full URL, so users
write `**.jsonl` or `s3://bucket/**/part-*.jsonl`.

Globs come from anyone who may submit a job, so matching must not be a way to stall the server.
Python's `re` backtracks: `**a` nine times then `**b` against a long path takes seconds (more
with each star) while holding the GIL, which stalls every thread of the server. The globs are
therefore translated to RE2, whose automata match in time linear in the URL's length whatever
the pattern. The patterns themselves are bounded too (length, brace nesting, how many), which
bounds the time and memory of compiling them; each bound is named in its refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import re2

# A glob longer than this is refused: a real one is a path with a few wildcards.
MAX_GLOB_CHARS = 1024
# Braces nested deeper than this are refused (the translation recurses once per level).
MAX_BRACE_DEPTH = 16
# At most this many globs in one `includes` (or `excludes`): they are matched as one program.
MAX_GLOBS = 100

_OPTIONS = re2.Options()
_OPTIONS.dot_nl = True  # `**` crosses newlines too: a glob matches the whole string
_OPTIONS.never_capture = True
_OPTIONS.log_errors = False  # RE2 would print each refusal on the server's stderr


class GlobError(ValueError):
    """A glob that does not compile; the message says where."""


class Globs:
    """Some globs, compiled into one RE2 program: a URL is matched once, however many globs
    there are, in time linear in its length."""

    def __init__(self, patterns: Sequence[str]) -> None:
        if len(patterns) > MAX_GLOBS:
            raise GlobError(f"{len(patterns)} globs given; at most {MAX_GLOBS} are allowed")
        bodies = [_translate_checked(pattern) for pattern in patterns]
        self.patterns = tuple(patterns)
        self._program: Any = None
        if bodies:
            self._program = _compile("|".join(f"(?:{b})" for b in bodies), "these globs")

    def __bool__(self) -> bool:
        return self._program is not None

    def matches(self, url: str) -> bool:
        if self._program is None:
            return False
        try:
            return self._program.fullmatch(url) is not None
        except UnicodeEncodeError:
            # A local file name that is not UTF-8 reaches us with surrogate escapes, which
            # RE2 (UTF-8 only) cannot take: each such character then matches as a `?` would.
            return self._program.fullmatch(url.encode("utf-8", "replace").decode()) is not None


def compile_glob(pattern: str) -> Globs:
    """One glob, compiled; GlobError if it is malformed or over a bound."""
    return Globs([pattern])


def _translate_checked(pattern: str) -> str:
    if not isinstance(pattern, str):  # pragma: no cover - the submission schema says str
        raise GlobError(f"{pattern!r} is not text")
    if len(pattern) > MAX_GLOB_CHARS:
        raise GlobError(
            f"{_shown(pattern)}: {len(pattern)} characters long; a glob may have at most "
            f"{MAX_GLOB_CHARS}"
        )
    try:
        pattern.encode()
    except UnicodeEncodeError:
        raise GlobError(f"{_shown(pattern)}: holds text that is not valid unicode") from None
    body, _ = _translate(pattern, 0, depth=0)
    _compile(body, _shown(pattern))  # each on its own first, so an error names its glob
    return body


def _compile(body: str, what: str) -> Any:
    try:
        return re2.compile(body, _OPTIONS)
    except re2.error as err:  # the program is over RE2's memory budget
        reason = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else err
        raise GlobError(f"{what}: cannot be compiled ({reason})") from None


def _shown(pattern: str) -> str:
    """The pattern for a message: a long one is cut, so a refusal stays one readable line."""
    return repr(pattern if len(pattern) <= 80 else pattern[:80] + "...")


def _translate(pattern: str, i: int, *, depth: int) -> tuple[str, int]:
    """Translate from `i` until the end, or (inside braces, `depth` > 0) until an unnested
    `,` or `}`."""
    out: list[str] = []
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if depth and c in ",}":
            return "".join(out), i
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                out.append(".*")
                i += 2
                while i < n and pattern[i] == "*":  # `***` is `**`
                    i += 1
            else:
                out.append("[^/]*")
                i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            part, i = _char_class(pattern, i)
            out.append(part)
        elif c == "{":
            if depth >= MAX_BRACE_DEPTH:
                raise GlobError(
                    f"{_shown(pattern)}: braces nest deeper than {MAX_BRACE_DEPTH} levels"
                )
            alternatives = []
            i += 1
            while True:
                part, i = _translate(pattern, i, depth=depth + 1)
                alternatives.append(part)
                if pattern[i] == "}":  # _translate stops only at `,` or `}` inside braces
                    i += 1
                    break
                i += 1  # a `,`
            out.append("(?:" + "|".join(alternatives) + ")")
        elif c == "}":
            raise GlobError(f"{_shown(pattern)}: unexpected '}}' at position {i}")
        elif c == "\\":
            if i + 1 >= n:
                raise GlobError(f"{_shown(pattern)}: ends with an escape character")
            out.append(re2.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re2.escape(c))
            i += 1
    if depth:
        raise GlobError(f"{_shown(pattern)}: '{{' is never closed")
    return "".join(out), i


def _char_class(pattern: str, start: int) -> tuple[str, int]:
    """`[...]` at `start`: an RE2 class (never matching `/` when negated)."""
    i = start + 1
    negate = i < len(pattern) and pattern[i] == "!"
    if negate:
        i += 1
    chars: list[str] = []
    last = ""  # the previous character, unescaped, for a range
    while i < len(pattern) and pattern[i] != "]":
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            last = pattern[i + 1]
            chars.append(_class_char(last))
            i += 2
            continue
        if c == "-" and last and i + 1 < len(pattern) and pattern[i + 1] != "]":
            high = pattern[i + 1]
            if high == "\\" and i + 2 < len(pattern):
                high, step = pattern[i + 2], 3
            else:
                step = 2
            if last > high:
                raise GlobError(f"{_shown(pattern)}: range {last}-{high} is out of order")
            chars.append("-" + _class_char(high))
            last = ""
            i += step
            continue
        last = c
        chars.append(_class_char(c))
        i += 1
    if i >= len(pattern):
        raise GlobError(f"{_shown(pattern)}: '[' is never closed")
    if not chars:
        raise GlobError(f"{_shown(pattern)}: empty character class at position {start}")
    body = "".join(chars)
    return (f"[^/{body}]" if negate else f"[{body}]"), i + 1


def _class_char(c: str) -> str:
    """One character inside an RE2 class: the class's own metacharacters escaped."""
    return "\\" + c if c in "\\]^-[" else c


def keep(url: str, includes: Globs, excludes: Globs) -> bool:
    """The spec's filter: kept if no include is given or one matches, and no exclude does."""
    if includes and not includes.matches(url):
        return False
    return not excludes.matches(url)
