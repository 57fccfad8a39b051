"""The `cortex` command: a thin shell over `cortex.client` (and `cortex serve`, `cortex worker`).

Exit codes: 0 ok, 1 an error or a failed job, 2 bad usage, 3 the server is unreachable.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.live import Live

from cortex import cliconfig, display, errors, exactjson
from cortex.client import Client
from cortex.jobs import JobStatus
from cortex.settings import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_URL

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


@cli.command()
@click.option("--host", envvar="CORTEX_HOST", default=DEFAULT_HOST, show_default=True)
@click.option("--port", envvar="CORTEX_PORT", default=DEFAULT_PORT, show_default=True, type=int)
@data_dir_option
@store_option
@click.option(
    "--launcher",
    envvar="CORTEX_LAUNCHER",
    default="local",
    show_default=True,
    type=click.Choice(["local", "ray"]),
    help="Where workers run: local processes, or actors on a Ray cluster.",
)
@click.option(
    "--ray-address",
    envvar="CORTEX_RAY_ADDRESS",
    default="",
    help="With --launcher ray: the cluster, ray://head:10001 or head:6379 (default: RAY_ADDRESS).",
)
@click.option(
    "--gpus",
    envvar="CORTEX_GPUS",
    default=None,
    help="With --launcher local: the GPU ids to hand out, e.g. 0,1,2,3, or none "
    "(default: CUDA_VISIBLE_DEVICES, else what `nvidia-smi -L` lists).",
)
@click.option(
    "--public-url",
    envvar="CORTEX_PUBLIC_URL",
    default="",
    help="The address workers use to reach this server (default: from host and port).",
)
@click.option("--max-body-bytes", envvar="CORTEX_MAX_BODY_BYTES", default=10 << 20, type=int)
@click.option("--lease-s", envvar="CORTEX_LEASE_S", default=30.0, type=float)
@click.option("--heartbeat-s", envvar="CORTEX_HEARTBEAT_S", default=5.0, type=float)
@click.option("--worker-grace-s", envvar="CORTEX_WORKER_GRACE_S", default=3.0, type=float)
@click.option(
    "--leader-lease-s",
    envvar="CORTEX_LEADER_LEASE_S",
    default=5.0,
    type=float,
    help="With replicas: how soon a dead leader is replaced, and a dead replica noticed.",
)
@click.option("--max-workers", envvar="CORTEX_MAX_WORKERS", default=64, type=int)
@click.option(
    "--auth-token",
    envvar="CORTEX_AUTH_TOKEN",
    default="",
    help="Require `Authorization: Bearer <token>` on every public endpoint but /healthz.",
)
@click.option(
    "--insecure",
    is_flag=True,
    envvar="CORTEX_INSECURE",
    help="Allow listening on a non-loopback address without --auth-token.",
)
@click.option(
    "--log-retention-s",
    envvar="CORTEX_LOG_RETENTION_S",
    default=7 * 86400.0,
    type=float,
    help="Keep a job's logs this long after it ends.",
)
@click.option(
    "--log-max-lines",
    envvar="CORTEX_LOG_MAX_LINES",
    default=2_000_000,
    type=int,
    help="Keep at most this many log lines per job (the oldest go first).",
)
@click.option(
    "--log-max-bytes",
    envvar="CORTEX_LOG_MAX_BYTES",
    default=128 << 20,
    type=click.IntRange(min=0),
    help="Store at most this many bytes of log per job; later lines are dropped and counted.",
)
@click.option(
    "--max-project-bytes",
    envvar="CORTEX_MAX_PROJECT_BYTES",
    default=1 << 30,
    type=click.IntRange(min=0),
    help="Refuse a deploy whose project unpacks to more than this.",
)
@click.option(
    "--job-retention-s",
    envvar="CORTEX_JOB_RETENTION_S",
    default=30 * 86400.0,
    type=float,
    help="Delete a job (its record, batches and logs) this long after it ends.",
)
@click.option(
    "--prune-s",
    envvar="CORTEX_PRUNE_S",
    default=60.0,
    type=click.FloatRange(min=0.1),
    help="How often what is past its retention is deleted and its space given back.",
)
@click.option(
    "--data-roots",
    envvar="CORTEX_DATA_ROOTS",
    default="",
    help="Folders (colon-separated) local file datasets may be read from "
    "(default: the folder the server is started in).",
)
@click.option(
    "--data-urls",
    envvar="CORTEX_DATA_URLS",
    default="",
    help="URL prefixes (comma-separated, e.g. s3://bucket/data/,https://host/) remote file "
    "datasets must start with (default: any).",
)
@click.option(
    "--env-cache-bytes",
    envvar="CORTEX_ENV_CACHE_BYTES",
    default=20 * 10**9,
    type=int,
    help="Remove API environments that nothing uses, least recently used first, while they "
    "take more than this.",
)
@click.option(
    "--env-installer",
    envvar="CORTEX_ENV_INSTALLER",
    default="",
    type=click.Choice(["", "uv", "pip"]),
    help="What installs requirements.txt into API environments (default: uv, else pip).",
)
@click.option(
    "--env-build-timeout-s",
    envvar="CORTEX_ENV_BUILD_TIMEOUT_S",
    default=1800.0,
    type=float,
    help="A step of an environment build (dependencies.sh, an install) that runs longer fails.",
)
@click.option("--log-level", envvar="CORTEX_LOG_LEVEL", default="info")
@click.option(
    "--log-format",
    envvar="CORTEX_LOG_FORMAT",
    default="text",
    type=click.Choice(["text", "json"]),
    help="The server's own log: text, or JSON lines for log collectors.",
)
def serve(
    host: str,
    port: int,
    data_dir: Path,
    store_url: str,
    launcher: str,
    ray_address: str,
    gpus: str | None,
    public_url: str,
    max_body_bytes: int,
    lease_s: float,
    heartbeat_s: float,
    worker_grace_s: float,
    leader_lease_s: float,
    max_workers: int,
    auth_token: str,
    insecure: bool,
    log_retention_s: float,
    log_max_lines: int,
    log_max_bytes: int,
    max_project_bytes: int,
    job_retention_s: float,
    prune_s: float,
    data_roots: str,
    data_urls: str,
    env_cache_bytes: int,
    env_installer: str,
    env_build_timeout_s: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run the server (the public API, the worker API and the reconciler)."""
    import logging.config

    import uvicorn

    from cortex import gpus as gpus_mod
    from cortex import serverlog
    from cortex.api.app import create_app
    from cortex.settings import Settings

    try:
        settings = Settings(
            host=host,
            port=port,
            data_dir=data_dir,
            store_url=store_url,
            launcher=launcher,
            ray_address=ray_address,
            gpus=None if gpus is None else gpus_mod.parse(gpus),
            public_url=public_url,
            max_body_bytes=max_body_bytes,
            lease_s=lease_s,
            heartbeat_s=heartbeat_s,
            worker_grace_s=worker_grace_s,
            leader_lease_s=leader_lease_s,
            max_workers=max_workers,
            auth_token=auth_token,
            log_retention_s=log_retention_s,
            log_max_lines_per_job=log_max_lines,
            log_max_bytes=log_max_bytes,
            max_project_bytes=max_project_bytes,
            job_retention_s=job_retention_s,
            prune_s=prune_s,
            data_roots=tuple(Path(p) for p in data_roots.split(":") if p),
            data_urls=tuple(_url_prefix(u.strip()) for u in data_urls.split(",") if u.strip()),
            env_cache_bytes=env_cache_bytes,
            env_installer=env_installer,
            env_build_timeout_s=env_build_timeout_s,
        )
    except ValueError as err:  # settings that contradict each other
        _error_line(str(err))
        sys.exit(EXIT_USAGE)
    if not auth_token and not insecure and not _is_loopback(host):
        _error_line(
            f"refusing to listen on {host} without a token: anyone who can reach it could run "
            "code on this machine. Set --auth-token (or CORTEX_AUTH_TOKEN), or pass --insecure."
        )
        sys.exit(EXIT_USAGE)
    log_config = serverlog.config(log_level, json_lines=log_format == "json")
    logging.config.dictConfig(log_config)
    # Before uvicorn: a store that is away or not migrated is one line and exit code 1, not
    # a traceback from the application's start-up.
    from cortex import launchers

    launchers.check(settings)  # Ray missing, or its address: one line, exit code 1
    _hold_data_dir(settings)  # another server on this folder: one line, exit code 1
    _prepare_store(settings)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config,
        access_log=log_level == "debug",
        # wsproto rather than "auto" (websockets' sans-I/O protocol where the websockets
        # package is installed): that one logs an error for every websocket refused with a
        # response, as the log websockets refuse an unknown job or a missing token
        # (Kludex/uvicorn#3138).
        ws="wsproto",
    )


def _hold_data_dir(settings: Any) -> None:
    from cortex import replicas

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    replica_id = replicas.load_id(settings.data_dir)
    replicas.hold(settings.data_dir, settings.resolved_store_url, settings.listen_url, replica_id)


def _prepare_store(settings: Any) -> None:
    from cortex.store import Store, schema

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.resolved_store_url)
    try:
        schema.prepare(store)
    finally:
        store.close()


@cli.command()
@data_dir_option
@store_option
def migrate(data_dir: Path, store_url: str) -> None:
    """Create the store's schema, or upgrade it to this version's.

    Run it before starting servers on a PostgreSQL store, and after upgrading cortex; servers
    on the default SQLite store do it themselves.
    """
    from cortex.settings import Settings
    from cortex.store import Store, schema, sql

    settings = Settings(data_dir=data_dir, store_url=store_url)
    if not store_url:
        data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.resolved_store_url)
    try:
        done = schema.upgrade(store)
    finally:
        store.close()
    where = sql.display_url(store.url)
    if done.before == done.after:
        click.echo(f"{where} is up to date (schema revision {done.after})")
    else:
        click.echo(
            f"migrated {where} from {done.before or 'an empty database'} "
            f"to schema revision {done.after}"
        )


def _url_prefix(url: str) -> str:
    """A `--data-urls` prefix. One that names only a bucket or host gets its slash, so that
    `s3://data` does not also allow `s3://data-private`."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not rest:
        raise click.UsageError(f"--data-urls: {url!r} is not a URL prefix (s3://bucket/path/)")
    return url if "/" in rest else url + "/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    with _client(url) as client:
        results = client.deploy(config)
        for result in results:
            if output != "json":
                click.echo(result["message"])
            env = result.get("environment") or {}
            if no_wait or env.get("state") != "building":
                continue
            env = _follow_build(client, result["api_name"], quiet=output == "json")
            result["environment"] = env
            failed = failed or env["state"] == "failed"
    if output == "json":
        _print_json(results)
    if failed:
        sys.exit(EXIT_FAILED)


def _follow_build(client: Client, api_name: str, *, quiet: bool) -> dict[str, Any]:
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
    took = env.get("duration_s") or (time.monotonic() - started)
    if env["state"] == "failed":
        if not quiet:
            _error_line(f"{api_name}: the environment failed to build after {took:.1f} s:")
            click.echo(env.get("message") or "", err=True)
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

        def fetch() -> tuple[Any, bool]:
            if api is None:
                return client.get_all(), False
            if job_id is None:
                summary = client.get_api(api)["batch_api"]
                active = any(
                    JobStatus(job["status"]).in_progress for job in summary["job_statuses"]
                )
                return summary, not active
            data = client.get_job(api, job_id)
            return data, JobStatus(data["job_status"]["status"]).terminal

        def render() -> tuple[RenderableType, bool]:
            data, final = fetch()
            if api is None:
                return display.apis_table(data), final
            if job_id is None:
                return display.jobs_table(data), final
            return display.job_view(data), final

        if output == "json":
            _print_json(fetch()[0])
        elif watch and api is not None and job_id is not None:
            # One job: its progress bar until it ends, as `submit --wait` shows it.
            final = _follow_job(client, api, job_id)
            console.print(render()[0])
            sys.exit(EXIT_OK if final["status"] == JobStatus.SUCCEEDED.value else EXIT_FAILED)
        elif watch:
            _watch(render)
        else:
            console.print(render()[0])


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
        result = client.submit(api, raw, dry_run=dry_run)
        if dry_run:
            click.echo(result, nl=False)
            return
        if output == "json" and not (wait or follow):
            _print_json(result)
            return
        click.echo(f"submitted job {result['job_id']}", err=output == "json")
        if not (wait or follow):
            click.echo(f"follow it with: cortex get {api} {result['job_id']} --watch")
            return
        final = _follow_job(client, api, result["job_id"], logs=follow, quiet=output == "json")
    if output == "json":
        _print_json(final)
    sys.exit(EXIT_OK if final["status"] == JobStatus.SUCCEEDED.value else EXIT_FAILED)


def _follow_job(
    client: Client, api: str, job_id: str, *, logs: bool = False, quiet: bool = False
) -> dict[str, Any]:
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
        ok = final["status"] == JobStatus.SUCCEEDED.value
        click.secho(display.final_line(final), fg=None if ok else "red", err=not ok)
    return final


def _follow_on_terminal(
    client: Client, api: str, job_id: str, rate: display.Rate, streamer: _LogStreamer | None
) -> dict[str, Any]:
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

        def show(job: dict[str, Any]) -> None:
            metrics = job["batch_metrics"]
            done = metrics["succeeded"] + metrics["failed"]
            total = job["total_batch_count"]
            progress.update(
                task,
                total=total or None,
                completed=done,
                detail=display.progress_detail(job, rate.update(done)),
            )

        return client.wait(api, job_id, on_progress=show)


def _follow_plain(
    client: Client, api: str, job_id: str, rate: display.Rate, streamer: _LogStreamer | None
) -> dict[str, Any]:
    if streamer is not None:
        streamer.start(click.echo)
    last: list[tuple[int, int, str]] = []

    def show(job: dict[str, Any]) -> None:
        metrics = job["batch_metrics"]
        done = metrics["succeeded"] + metrics["failed"]
        current = (done, job["total_batch_count"], job["status"])
        speed = rate.update(done)
        if not last or last[0] != current:  # a line when something changed, not every poll
            last[:] = [current]
            click.echo(display.progress_line(job, speed))

    return client.wait(api, job_id, on_progress=show)


class _LogStreamer:
    """The job's log, followed on a thread while the progress shows; the stream ends by
    itself once the job has ended and every line is out."""

    def __init__(self, client: Client, api: str, job_id: str) -> None:
        # A client of its own: httpx clients are not shared across threads mid-stream.
        self._client = Client(client.url)
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
            result = client.delete_api(api)
    if output == "json":
        _print_json(result)
    else:
        click.echo(result["message"])


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
        _print_json(batches)
    elif console.is_terminal:
        console.print(display.failed_table(batches))
    else:  # piped: whole lines, never cut to a table's width
        for batch in batches:
            click.echo(
                f"batch {batch['batch_id']} (attempts {batch['attempts']}): {batch['error']}"
            )
            for line in (batch.get("traceback") or "").rstrip().splitlines()[-3:]:
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
            _print_json(job)
            return
        click.echo(
            f"retrying {job['total_batch_count']} failed batches of job {job_id} as job "
            f"{job['job_id']}",
            err=output == "json",
        )
        if not wait:
            click.echo(f"follow it with: cortex get {api} {job['job_id']} --watch")
            return
        final = _follow_job(client, api, job["job_id"], quiet=output == "json")
    if output == "json":
        _print_json(final)
    sys.exit(EXIT_OK if final["status"] == JobStatus.SUCCEEDED.value else EXIT_FAILED)


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


@cli.command()
def worker() -> None:
    """Run one worker (started by a launcher; configured by CORTEX_* variables)."""
    from cortex.worker import runtime

    sys.exit(runtime.main())


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


if __name__ == "__main__":
    main()
