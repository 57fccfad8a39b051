"""`cortex env`: named servers, kept by `cortex.cliconfig`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from cortex import cliconfig, errors
from cortex.cli.base import (
    EXIT_FAILED,
    _error_line,
    _print_json,
    cli,
    output_option,
)


@cli.group("env")
def env_group() -> None:
    """Named environments: which server the other commands talk to (~/.cortex/cli.yaml)."""


@env_group.command("configure")
@click.argument("name")
@click.option("--url", required=True, help="The server, e.g. https://cortex.example.com.")
@click.option("--token", default=None, help="Its token (kept in the file, owner-only).")
def env_configure(name: str, url: str, token: str | None) -> None:
    """Add or change environment NAME (the first one becomes the default)."""
    _config_call(cliconfig.configure, name, url, token)
    click.echo(f"configured environment {name} ({url})")


@env_group.command("list")
@output_option
def env_list(output: str) -> None:
    """The environments, the default marked."""
    found, default = _config_call(cliconfig.environments)
    if output == "json":
        _print_json(
            {
                "default": default,
                "environments": [{"name": e.name, "url": e.url} for e in found],
            }
        )
        return
    if not found:
        click.echo("no environments: add one with `cortex env configure NAME --url URL`")
    for env in found:
        marker = "*" if env.name == default else " "
        token = " (token set)" if env.token else ""
        click.echo(f"{marker} {env.name}\t{env.url}{token}")


@env_group.command("default")
@click.argument("name")
def env_default(name: str) -> None:
    """Make NAME the environment commands use without --env."""
    _config_call(cliconfig.set_default, name)
    click.echo(f"{name} is the default environment")


@env_group.command("delete")
@click.argument("name")
def env_delete(name: str) -> None:
    """Forget environment NAME."""
    _config_call(cliconfig.delete, name)
    click.echo(f"deleted environment {name}")


def _config_call(function: Callable[..., Any], *args: Any) -> Any:
    try:
        return function(*args)
    except errors.CortexError as err:
        _error_line(err.message)
        sys.exit(EXIT_FAILED)
