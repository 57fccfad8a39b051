"""`cortex deploy`, `cortex get` and `cortex delete`: APIs, their builds, and listings."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import RenderableType

from cortex import display, schemas
from cortex.cli.base import (
    EXIT_FAILED,
    EXIT_OK,
    _client,
    _error_line,
    _print_json,
    _watch,
    cli,
    console,
    output_option,
    url_option,
)
from cortex.cli.jobs import follow_job
from cortex.client import Client
from cortex.jobs import JobStatus


@cli.command()
@click.argument("config", default="cortex.yaml", type=click.Path(path_type=Path))
@url_option
@output_option
@click.option(
    "--no-wait",
    is_flag=True,
    help="Answer once the APIs are stored, without waiting for their environments to build.",
)
def deploy(config: Path, url: str, output: str, no_wait: bool) -> None:
    """Validate CONFIG (cortex.yaml), package its folder and deploy its APIs.

    An API whose folder holds requirements.txt, dependencies.sh or conda-packages.txt runs in
    an environment of its own: the deploy waits until it is built (or says why it failed,
    exit code 1), showing the installer's progress.
    """
    failed = False
    shown: list[dict[str, Any]] = []
    with _client(url) as client:
        for result in client.deploy(config):
            if output != "json":
                click.echo(result.message)
            answer = result.to_json()
            shown.append(answer)
            if no_wait or result.environment.state != "building":
                continue
            env = _follow_build(client, result.api_name, quiet=output == "json")
            answer["environment"] = env.to_json()  # how the build ended
            failed = failed or env.state == "failed"
    if output == "json":
        _print_json(shown)
    if failed:
        sys.exit(EXIT_FAILED)


def _follow_build(client: Client, api_name: str, *, quiet: bool) -> schemas.EnvironmentLog:
    """Wait for an API's environment: a spinner with the current step on a terminal, the
    installer's lines as they come when piped; then how it ended, in one line."""
    started = time.monotonic()
    # The log's own last line ("==> environment ready in ...") is said once, below.
    ending = ("==> environment ready", "==> the build failed")
    if quiet:
        env = client.wait_environment(api_name)
    elif console.is_terminal:
        with console.status(f"{api_name}: building its environment") as status:

            def show(lines: list[str]) -> None:
                for line in lines:
                    if line.startswith("==> ") and not line.startswith(ending):
                        console.print(f"  {line[4:]}", highlight=False, markup=False)
                last = next((line for line in reversed(lines) if line.strip()), "")
                status.update(f"{api_name}: {last.strip()[:100]}")

            env = client.wait_environment(api_name, show)
    else:

        def echo(lines: list[str]) -> None:
            for line in lines:
                if not line.startswith(ending):
                    click.echo(f"  {line}")

        env = client.wait_environment(api_name, echo)
    took = env.duration_s or (time.monotonic() - started)
    if env.state == "failed":
        if not quiet:
            _error_line(f"{api_name}: the environment failed to build after {took:.1f} s:")
            click.echo(env.message or "", err=True)
    elif not quiet:
        click.echo(f"{api_name}: environment ready in {took:.1f} s")
    return env


@cli.command()
@click.argument("api", required=False)
@click.argument("job_id", required=False)
@url_option
@output_option
@click.option(
    "-w",
    "--watch",
    is_flag=True,
    help="Re-run every 2 s: for an API until none of its jobs is in progress, for a job until "
    "it ends, for the list until Ctrl-C.",
)
def get(api: str | None, job_id: str | None, url: str, output: str, watch: bool) -> None:
    """List APIs, the jobs of API, or one job."""
    with _client(url) as client:

        def fetch() -> tuple[schemas.Record, bool]:
            if api is None:
                return client.get_all(), False
            if job_id is None:
                summary = client.get_api(api).batch_api
                return summary, not any(job.in_progress for job in summary.job_statuses)
            data = client.get_job(api, job_id)
            return data, JobStatus(data.job_status.status).terminal

        def render() -> tuple[RenderableType, bool]:
            data, final = fetch()
            if api is None:
                return display.apis_table(data), final
            if job_id is None:
                return display.jobs_table(data), final
            return display.job_view(data), final

        if output == "json":
            _print_json(fetch()[0].to_json())
        elif watch and api is not None and job_id is not None:
            # One job: its progress bar until it ends, as `submit --wait` shows it.
            final = follow_job(client, api, job_id)
            console.print(render()[0])
            sys.exit(EXIT_OK if final.succeeded else EXIT_FAILED)
        elif watch:
            _watch(render)
        else:
            console.print(render()[0])


@cli.command()
@click.argument("api")
@click.argument("job_id", required=False)
@url_option
@output_option
@click.option("-f", "--force", is_flag=True, help="Do not ask before deleting an API.")
def delete(api: str, job_id: str | None, url: str, output: str, force: bool) -> None:
    """Stop job JOB_ID of API, or delete API (stopping its jobs first)."""
    with _client(url) as client:
        if job_id is not None:
            result = client.stop_job(api, job_id)
        else:
            if not force and sys.stdin.isatty():
                click.confirm(
                    f"deleting {api} stops its running jobs and erases its job history; continue?",
                    abort=True,
                )
            result = client.delete(api)
    if output == "json":
        _print_json(result.to_json())
    else:
        click.echo(result.message)
