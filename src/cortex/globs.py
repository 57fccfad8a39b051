"""Globs as the spec's datasets use them (gobwas/glob with separator `/`), compiled to regexes.

`*` matches any run of characters except `/`, `**` any run including `/`, `?` one character
except `/`, `[abc]`, `[a-z]` and `[!abc]` one character of (or not of) a set, `{a,b}` either
alternative (alternatives may hold patterns and nest), and `\\` escapes the next character. A
glob matches the whole string it is given: for datasets that is a file's full URL, so users
write `**.jsonl` or `s3://bucket/**/part-*.jsonl`.
"""

from __future__ import annotations

import re


class GlobError(ValueError):
    """A glob that does not compile; the message says where."""


def compile_glob(pattern: str) -> re.Pattern[str]:
    """The anchored regex for `pattern`; GlobError if the pattern is malformed."""
    body, end = _translate(pattern, 0, in_braces=False)
    if end != len(pattern):  # pragma: no cover - _translate consumes all outside braces
        raise GlobError(f"{pattern!r}: unexpected {pattern[end]!r} at position {end}")
    return re.compile(body + r"\Z", re.DOTALL)


def _translate(pattern: str, i: int, *, in_braces: bool) -> tuple[str, int]:
    """Translate from `i` until the end, or (inside braces) until an unnested `,` or `}`."""
    out: list[str] = []
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if in_braces and c in ",}":
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
            alternatives = []
            i += 1
            while True:
                part, i = _translate(pattern, i, in_braces=True)
                alternatives.append(part)
                if i >= n:
                    raise GlobError(f"{pattern!r}: '{{' is never closed")
                if pattern[i] == "}":
                    i += 1
                    break
                i += 1  # a `,`
            out.append("(?:" + "|".join(alternatives) + ")")
        elif c == "}" or (c == "," and in_braces):  # pragma: no cover - handled above
            raise GlobError(f"{pattern!r}: unexpected {c!r} at position {i}")
        elif c == "\\":
            if i + 1 >= n:
                raise GlobError(f"{pattern!r}: ends with an escape character")
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    if in_braces:
        raise GlobError(f"{pattern!r}: '{{' is never closed")
    return "".join(out), i


def _char_class(pattern: str, start: int) -> tuple[str, int]:
    """`[...]` at `start`: a regex class (never matching `/` when negated)."""
    i = start + 1
    negate = i < len(pattern) and pattern[i] == "!"
    if negate:
        i += 1
    chars: list[str] = []
    while i < len(pattern) and pattern[i] != "]":
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            chars.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "-" and chars and i + 1 < len(pattern) and pattern[i + 1] != "]":
            low, high = chars[-1].lstrip("\\"), pattern[i + 1]
            if low > high:
                raise GlobError(f"{pattern!r}: range {low}-{high} is out of order")
            chars.append("-" + re.escape(high))
            i += 2
            continue
        chars.append(re.escape(c))
        i += 1
    if i >= len(pattern):
        raise GlobError(f"{pattern!r}: '[' is never closed")
    if not chars:
        raise GlobError(f"{pattern!r}: empty character class at position {start}")
    body = "".join(chars)
    return (f"[^/{body}]" if negate else f"[{body}]"), i + 1


def keep(url: str, includes: list[re.Pattern[str]], excludes: list[re.Pattern[str]]) -> bool:
    """The spec's filter: kept if no include is given or one matches, and no exclude does."""
    if includes and not any(p.match(url) for p in includes):
        return False
    return not any(p.match(url) for p in excludes)
