"""`cortex submit`, `cortex failed`, `cortex retry` and `cortex logs`, and following a job's
progress."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from cortex import display, errors, exactjson, schemas
from cortex.cli.base import (
    EXIT_FAILED,
    EXIT_OK,
    _client,
    _print_json,
    cli,
    console,
    output_option,
    url_option,
)
from cortex.client import Client


@cli.command()
@click.argument("api")
@click.argument("submission", type=click.File("rb"))
@url_option
@click.option("--dry-run", is_flag=True, help="Validate only; create nothing.")
@click.option("--workers", type=int, default=None, help="Override the submission's workers.")
@output_option
@click.option(
    "--wait",
    is_flag=True,
    help="Show the job's progress until it ends; exit 0 if it succeeded, 1 if not.",
)
@click.option("--follow", is_flag=True, help="As --wait, and stream the job's logs.")
def submit(
    api: str,
    submission: Any,
    url: str,
    dry_run: bool,
    workers: int | None,
    output: str,
    wait: bool,
    follow: bool,
) -> None:
    """Submit a job to API: SUBMISSION is a JSON file (or - for stdin), as for POST /<api>."""
    raw = submission.read()
    try:
        # orjson: a 45 MB item list is checked in 0.2 s, and sent as read (the standard
        # library took 0.7 s to parse and encode it again).
        body = exactjson.loads(raw)
    except ValueError as err:
        raise click.UsageError(f"{submission.name} is not valid JSON: {err}") from None
    if workers is not None:
        if not isinstance(body, dict):
            raise click.UsageError(f"{submission.name} must hold a JSON object")
        body["workers"] = workers
        raw = exactjson.dumps(body)
    with _client(url) as client:
        if dry_run:
            click.echo(client.submit(api, raw, dry_run=True), nl=False)
            return
        job = client.submit(api, raw)
        if output == "json" and not (wait or follow):
            _print_json(job.to_json())
            return
        click.echo(f"submitted job {job.job_id}", err=output == "json")
        if not (wait or follow):
            click.echo(f"follow it with: cortex get {api} {job.job_id} --watch")
            return
        final = follow_job(client, api, job.job_id, logs=follow, quiet=output == "json")
    if output == "json":
        _print_json(final.to_json())
    sys.exit(EXIT_OK if final.succeeded else EXIT_FAILED)


def follow_job(
    client: Client, api: str, job_id: str, *, logs: bool = False, quiet: bool = False
) -> schemas.JobStatus:
    """Show a job's progress until it ends, as `ray job submit` does: a Rich bar with counts,
    rate and ETA on a terminal, a plain line when the counts change otherwise; with `logs`,
    the job's log lines above it. Ctrl-C leaves the job running and says how to get back to
    it. Returns the final status."""
    rate = display.Rate()
    streamer = _LogStreamer(client, api, job_id) if logs else None
    try:
        if quiet:
            final = client.wait(api, job_id)
        elif console.is_terminal:
            final = _follow_on_terminal(client, api, job_id, rate, streamer)
        else:
            final = _follow_plain(client, api, job_id, rate, streamer)
    except KeyboardInterrupt:
        click.echo(
            f"\njob {job_id} goes on: follow it with `cortex get {api} {job_id} --watch`, stop "
            f"it with `cortex delete {api} {job_id}`",
            err=True,
        )
        sys.exit(130)
    if streamer is not None:
        streamer.finish()
    if not quiet:
        click.secho(
            display.final_line(final),
            fg=None if final.succeeded else "red",
            err=not final.succeeded,
        )
    return final


def _follow_on_terminal(
    client: Client, api: str, job_id: str, rate: display.Rate, streamer: _LogStreamer | None
) -> schemas.JobStatus:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"job {job_id}", total=None, detail="")
        if streamer is not None:
            streamer.start(lambda line: progress.console.print(line, markup=False))

        def show(job: schemas.JobStatus) -> None:
            done = _done(job)
            progress.update(
                task,
                total=job.total_batch_count or None,
                completed=done,
                detail=display.progress_detail(job, rate.update(done)),
            )

        return client.wait(api, job_id, on_progress=show)


def _follow_plain(
    client: Client, api: str, job_id: str, rate: display.Rate, streamer: _LogStreamer | None
) -> schemas.JobStatus:
    if streamer is not None:
        streamer.start(click.echo)
    last: list[tuple[int, int, str]] = []

    def show(job: schemas.JobStatus) -> None:
        done = _done(job)
        current = (done, job.total_batch_count, job.status)
        speed = rate.update(done)
        if not last or last[0] != current:  # a line when something changed, not every poll
            last[:] = [current]
            click.echo(display.progress_line(job, speed))

    return client.wait(api, job_id, on_progress=show)


def _done(job: schemas.JobStatus) -> int:
    """Batches that have ended, either way."""
    metrics = job.batch_metrics
    return 0 if metrics is None else metrics.succeeded + metrics.failed


class _LogStreamer:
    """The job's log, followed on a thread while the progress shows; the stream ends by
    itself once the job has ended and every line is out."""

    def __init__(self, client: Client, api: str, job_id: str) -> None:
        # A client of its own: httpx clients are not shared across threads mid-stream.
        self._client = Client(client.url, token=client.token)
        self._api = api
        self._job_id = job_id
        self._thread: threading.Thread | None = None

    def start(self, emit: Callable[[str], None]) -> None:
        def run() -> None:
            try:
                for line in self._client.logs(self._api, self._job_id, follow=True):
                    emit(line)
            except errors.CortexError as err:
                emit(f"(the log stream stopped: {err.message})")

        self._thread = threading.Thread(target=run, name="cortex-logs", daemon=True)
        self._thread.start()

    def finish(self, timeout_s: float = 10.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._client.close()


@cli.command()
@click.argument("api")
@click.argument("job_id")
@url_option
@output_option
@click.option("--limit", type=int, default=100, show_default=True)
def failed(api: str, job_id: str, url: str, output: str, limit: int) -> None:
    """The failed batches of job JOB_ID: attempts, error, the end of the traceback."""
    with _client(url) as client:
        batches = client.failed_batches(api, job_id, limit)
    if output == "json":
        _print_json([batch.to_json() for batch in batches])
    elif console.is_terminal:
        console.print(display.failed_table(list(batches)))
    else:  # piped: whole lines, never cut to a table's width
        for batch in batches:
            click.echo(f"batch {batch.batch_id} (attempts {batch.attempts}): {batch.error}")
            for line in (batch.traceback or "").rstrip().splitlines()[-3:]:
                click.echo(f"  {line}")


@cli.command()
@click.argument("api")
@click.argument("job_id")
@url_option
@output_option
@click.option("--workers", type=int, default=None, help="Workers for the new job.")
@click.option("--wait", is_flag=True, help="Show the new job's progress until it ends.")
def retry(api: str, job_id: str, url: str, output: str, workers: int | None, wait: bool) -> None:
    """Re-run the failed batches of ended job JOB_ID, as a new job."""
    with _client(url) as client:
        job = client.retry_failed(api, job_id, workers)
        if output == "json" and not wait:
            _print_json(job.to_json())
            return
        click.echo(
            f"retrying {job.total_batch_count} failed batches of job {job_id} as job {job.job_id}",
            err=output == "json",
        )
        if not wait:
            click.echo(f"follow it with: cortex get {api} {job.job_id} --watch")
            return
        final = follow_job(client, api, job.job_id, quiet=output == "json")
    if output == "json":
        _print_json(final.to_json())
    sys.exit(EXIT_OK if final.succeeded else EXIT_FAILED)


@cli.command()
@click.argument("api")
@click.argument("job_id")
@url_option
@click.option(
    "-f/-F",
    "--follow/--no-follow",
    default=True,
    show_default=True,
    help="Stream new lines until the job ends, as Cortex did (an ended job's log is printed "
    "and the command exits); --no-follow prints what is there now.",
)
@click.option("--since", default=None, help="Only lines since: 30s, 5m, 2h, 1d, or a time.")
@click.option("--tail", type=int, default=None, help="Only the last N lines (then follow).")
@click.option("--worker", "worker_id", default=None, help="One worker: 0, worker-0 or server.")
@click.option("--batch", default=None, help="Only the lines of one batch id.")
def logs(
    api: str,
    job_id: str,
    url: str,
    follow: bool,
    since: str | None,
    tail: int | None,
    worker_id: str | None,
    batch: str | None,
) -> None:
    """Print what every worker of a job wrote, and the server's lines about it."""
    with _client(url) as client:
        lines = client.logs(
            api, job_id, follow=follow, since=since, tail=tail, worker=worker_id, batch=batch
        )
        try:
            for line in lines:
                click.echo(line)
        except KeyboardInterrupt:
            pass
