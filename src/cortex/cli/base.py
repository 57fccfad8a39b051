"""What every `cortex` command shares: the group, exit codes, the console, one-line errors,
the server options (`--url`, `--env`) and the client that turns errors into exit codes."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.live import Live

from cortex import cliconfig, errors
from cortex.client import Client
from cortex.settings import DEFAULT_URL

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

console = Console(highlight=False)


def _error_line(message: str) -> None:
    """Errors are one line on stderr, never wrapped, so scripts can read them."""
    click.secho(f"error: {' '.join(message.split())}", err=True, fg="red")


def _remember_env(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    ctx.meta["cortex_env"] = value


def _resolve_url(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    """--url, else CORTEX_URL (click reads it), else --env's, else the default environment's
    (`cortex.cliconfig`), else the local server. The environment's token goes with it."""
    if value:
        return value
    try:
        name = ctx.meta.get("cortex_env")
        env = cliconfig.get(name) if name else cliconfig.default()
    except errors.CortexError as err:
        raise click.BadParameter(err.message, param_hint="--env") from None
    if env is None:
        return DEFAULT_URL
    ctx.meta["cortex_token"] = env.token
    return env.url


def url_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--url and --env (-e): which server a client command talks to."""
    command = click.option(
        "--url",
        envvar="CORTEX_URL",
        default=None,
        callback=_resolve_url,
        help=f"The cortex server (env CORTEX_URL; default: the environment's, or {DEFAULT_URL}).",
    )(command)
    return click.option(
        "-e",
        "--env",
        "env_name",
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_remember_env,
        help="A named environment (cortex env list); CORTEX_URL and --url win over it.",
    )(command)


output_option = click.option(
    "-o", "--output", type=click.Choice(["pretty", "json"]), default="pretty", show_default=True
)


@contextmanager
def _client(url: str) -> Iterator[Client]:
    """A client whose errors become one line on stderr and a meaningful exit code."""
    token = click.get_current_context().meta.get("cortex_token")
    try:
        with Client(url, token=os.environ.get("CORTEX_AUTH_TOKEN") or token) as client:
            yield client
    except errors.ConnectionFailed as err:
        _error_line(err.message)
        sys.exit(EXIT_UNREACHABLE)
    except errors.CortexError as err:
        _error_line(err.message)
        sys.exit(EXIT_FAILED)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _watch(render: Callable[[], tuple[RenderableType, bool]]) -> None:
    """Re-render every 2 s until `render` says the view is final (or Ctrl-C)."""
    view, final = render()
    with Live(view, console=console, auto_refresh=False) as live:
        while not final:
            time.sleep(2)
            view, final = render()
            live.update(view, refresh=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cortex-batch")
def cli() -> None:
    """Cortex Batch: deploy predictors as Batch APIs and run batch inference jobs."""


data_dir_option = click.option(
    "--data-dir",
    envvar="CORTEX_DATA_DIR",
    default=".cortex",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the SQLite store, unpacked projects and worker output live.",
)
store_option = click.option(
    "--store",
    "store_url",
    envvar="CORTEX_STORE",
    default="",
    help="The store's URL: postgresql://user:password@host/db, or any SQLAlchemy URL "
    "(default: SQLite in the data dir).",
)
