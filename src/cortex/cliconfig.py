"""The CLI's named environments (Cortex's `cortex env`): which server a command talks to.

Kept in `~/.cortex/cli.yaml` (or `$CORTEX_CLI_CONFIG`), readable by its owner only since it
may hold tokens:

    default: prod
    environments:
      prod: {url: https://cortex.example.com, token: ...}
      local: {url: http://127.0.0.1:8888}

A command's server is, first to last: `--url`, `CORTEX_URL`, `--env NAME` (`-e`), the default
environment, http://127.0.0.1:8888. Its token: `CORTEX_AUTH_TOKEN`, else the environment's.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from cortex import errors

_NAME = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]{0,62}$")


@dataclasses.dataclass(frozen=True)
class Environment:
    name: str
    url: str
    token: str | None = None


def path() -> Path:
    configured = os.environ.get("CORTEX_CLI_CONFIG")
    return Path(configured) if configured else Path.home() / ".cortex" / "cli.yaml"


def _load() -> dict[str, Any]:
    file = path()
    if not file.is_file():
        return {"default": None, "environments": {}}
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise errors.CortexError(f"{file}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("environments", {}), dict):
        raise errors.CortexError(f"{file}: expected `environments:` as a mapping of names")
    data.setdefault("environments", {})
    data.setdefault("default", None)
    return data


def _save(data: dict[str, Any]) -> None:
    file = path()
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = file.with_name(f".{file.name}.tmp")
    # Created readable by the owner only: it may hold tokens.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        yaml.safe_dump(data, out, sort_keys=True)
    tmp.replace(file)


def environments() -> tuple[list[Environment], str | None]:
    data = _load()
    found = [
        Environment(name, str(entry.get("url", "")), entry.get("token"))
        for name, entry in sorted(data["environments"].items())
        if isinstance(entry, dict)
    ]
    return found, data.get("default")


def get(name: str) -> Environment:
    found, _ = environments()
    for env in found:
        if env.name == name:
            return env
    names = ", ".join(e.name for e in found) or "none yet"
    raise errors.CortexError(
        f"there is no environment named {name!r} (configured: {names}; add it with "
        f"`cortex env configure {name} --url URL`)"
    )


def default() -> Environment | None:
    found, name = environments()
    return next((env for env in found if env.name == name), None)


def configure(name: str, url: str, token: str | None) -> None:
    if not _NAME.fullmatch(name):
        raise errors.CortexError(
            f"{name!r} is not an environment name (letters, digits, '-', '_', '.')"
        )
    if not re.match(r"^https?://[^/\s]+", url):
        raise errors.CortexError(f"--url: {url!r} is not an http(s) URL")
    data = _load()
    entry: dict[str, Any] = {"url": url.rstrip("/")}
    if token:
        entry["token"] = token
    data["environments"][name] = entry
    if not data.get("default"):
        data["default"] = name  # the first one configured is the default
    _save(data)


def set_default(name: str) -> None:
    get(name)
    data = _load()
    data["default"] = name
    _save(data)


def delete(name: str) -> None:
    get(name)
    data = _load()
    del data["environments"][name]
    if data.get("default") == name:
        data["default"] = None
    _save(data)
