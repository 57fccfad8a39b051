"""`cortex serve`, `cortex migrate` and `cortex worker`: the commands that run the service."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Any

import click

from cortex.cli.base import (
    EXIT_USAGE,
    _error_line,
    cli,
    data_dir_option,
    store_option,
)
from cortex.settings import DEFAULT_HOST, DEFAULT_PORT


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
    "--capacity",
    envvar="CORTEX_CAPACITY",
    default="",
    help="The worker pool's capacity where it differs from what the launcher finds (this "
    "machine; the Ray cluster), e.g. cpu=8,mem=16Gi,gpu=2; each resource optional.",
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
@click.option(
    "--webhook-secret",
    envvar="CORTEX_WEBHOOK_SECRET",
    default="",
    help="The key webhooks are signed with (HMAC-SHA256, the Cortex-Signature header); "
    "without one, jobs cannot ask for webhooks.",
)
@click.option(
    "--webhook-urls",
    envvar="CORTEX_WEBHOOK_URLS",
    default="",
    help="URL prefixes (comma-separated, e.g. https://hooks.internal/) webhooks may be sent "
    "to (default: any http(s) URL).",
)
@click.option(
    "--webhook-timeout-s",
    envvar="CORTEX_WEBHOOK_TIMEOUT_S",
    default=10.0,
    type=float,
    help="How long one webhook attempt may take.",
)
@click.option(
    "--webhook-give-up-s",
    envvar="CORTEX_WEBHOOK_GIVE_UP_S",
    default=86400.0,
    type=click.FloatRange(min=3600),
    help="How long a webhook that is not accepted is retried (at least an hour).",
)
@click.option(
    "--webhook-retry-base-s",
    envvar="CORTEX_WEBHOOK_RETRY_BASE_S",
    default=5.0,
    type=float,
    help="The delay before a webhook's first retry; it doubles (with jitter) up to 10 minutes.",
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
    capacity: str,
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
    webhook_secret: str,
    webhook_urls: str,
    webhook_timeout_s: float,
    webhook_give_up_s: float,
    webhook_retry_base_s: float,
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
            capacity=capacity,
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
            data_urls=_url_prefixes(data_urls, "--data-urls"),
            env_cache_bytes=env_cache_bytes,
            env_installer=env_installer,
            env_build_timeout_s=env_build_timeout_s,
            webhook_secret=webhook_secret,
            webhook_urls=_url_prefixes(webhook_urls, "--webhook-urls"),
            webhook_timeout_s=webhook_timeout_s,
            webhook_give_up_s=webhook_give_up_s,
            webhook_retry_base_s=webhook_retry_base_s,
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
    _read_bodies_in_bigger_steps()
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
        # Idle connections outlive a worker's heartbeat period: with uvicorn's default of 5 s,
        # equal to CORTEX_HEARTBEAT_S, a heartbeat often met its connection being closed
        # (BrokenPipeError, then a retry on a new one).
        timeout_keep_alive=max(5, int(settings.heartbeat_s * 3)),
    )


# How much of a request's body uvicorn reads ahead of the application (see below).
_BODY_READ_AHEAD_BYTES = 1 << 20


def _read_bodies_in_bigger_steps() -> None:
    """uvicorn stops reading a connection once 64 KiB of a request's body wait for the
    application, and reads on when the application asks for more: a 44 MB submission took
    about 180 such round trips through the event loop, 0.16-0.30 s to read on a 2-core
    machine; reading 1 MiB ahead, about 40, 0.10-0.12 s (bench/README.md). The server reads
    every body at once anyway (`api.body`), within its size limit. uvicorn has no setting
    for it: its protocol modules read the constant at each chunk."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for module in (httptools_impl, h11_impl):
        if hasattr(module, "HIGH_WATER_LIMIT"):
            setattr(module, "HIGH_WATER_LIMIT", _BODY_READ_AHEAD_BYTES)  # noqa: B010


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


def _url_prefixes(urls: str, flag: str) -> tuple[str, ...]:
    """The prefixes of `--data-urls` or `--webhook-urls` (comma-separated). One that names
    only a bucket or host gets its slash, so that `s3://data` does not also allow
    `s3://data-private`."""
    prefixes = []
    for url in (u.strip() for u in urls.split(",")):
        if not url:
            continue
        scheme, sep, rest = url.partition("://")
        if not sep or not scheme or not rest:
            raise click.UsageError(f"{flag}: {url!r} is not a URL prefix (s3://bucket/path/)")
        prefixes.append(url if "/" in rest else url + "/")
    return tuple(prefixes)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
def worker() -> None:
    """Run one worker (started by a launcher; configured by CORTEX_* variables)."""
    from cortex.worker import runtime

    sys.exit(runtime.main())
