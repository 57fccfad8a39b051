"""The `cortex` command: a thin shell over `cortex.client` (and `cortex serve`, `cortex worker`).

Exit codes: 0 ok, 1 an error or a failed job, 2 bad usage, 3 the server is unreachable. The
commands live in this package's modules by what they act on; importing them registers them.
"""

from __future__ import annotations

import sys

import click

from cortex import errors
from cortex.cli import apis, capacity, envs, jobs, server  # noqa: F401 (registers the commands)
from cortex.cli.base import EXIT_FAILED, EXIT_USAGE, _error_line, cli

__all__ = ["cli", "main"]


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _error_line("aborted")
        sys.exit(EXIT_FAILED)
    except click.ClickException as err:
        err.show()
        sys.exit(EXIT_USAGE)
    except errors.CortexError as err:
        _error_line(err.message)
        sys.exit(EXIT_FAILED)
