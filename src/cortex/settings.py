"""Server settings: one typed object, filled from flags or `CORTEX_*` environment variables."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


def _setting(name: str) -> str:
    """A setting as a user sets it: its `cortex serve` flag and its variable."""
    if name in ("reconcile_s", "max_lease_batches", "webhook_max_backoff_s"):
        return name  # not a flag: set only where Settings is built in code
    flag = "log_max_lines" if name == "log_max_lines_per_job" else name
    return f"--{flag.replace('_', '-')} (CORTEX_{flag.upper()})"


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path(".cortex")
    # SQLAlchemy URL of the store; empty means SQLite in `data_dir`.
    store_url: str = ""
    launcher: str = "local"
    # The Ray cluster of `launcher="ray"` (`ray://head:10001` or `head:6379`); empty: RAY_ADDRESS.
    ray_address: str = ""
    # The GPU ids the local launcher hands out; None: detected (CUDA_VISIBLE_DEVICES, then
    # `nvidia-smi -L`).
    gpus: tuple[str, ...] | None = None
    # The worker pool's capacity where it differs from what the launcher finds (this
    # machine's CPUs, memory and GPUs; a Ray cluster's resources): `cpu=8,mem=16Gi,gpu=2`,
    # each resource optional.
    capacity: str = ""
    # The address workers (and hooks that chain jobs) use to reach this server; empty means
    # derived from host and port.
    public_url: str = ""
    max_body_bytes: int = 10 << 20
    # What a deploy's project may unpack to (its archive is at most 256 MiB).
    max_project_bytes: int = 1 << 30
    # A leased batch whose worker stops heartbeating becomes leasable again after `lease_s`.
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    # The reconciler's safety tick: timeouts, exited workers, stop requests.
    reconcile_s: float = 0.25
    # How long a stopped worker gets between SIGTERM and SIGKILL.
    worker_grace_s: float = 3.0
    # Server replicas on one PostgreSQL store: the leader holds its lease this long without
    # renewing it, and a replica not heard from for this long is gone (its workers are the
    # leader's to watch). A dead leader is replaced within about this time.
    leader_lease_s: float = 5.0
    # Most batches one lease request may take.
    max_lease_batches: int = 1024
    # Most workers one job may ask for: a typo must not start a thousand processes.
    max_workers: int = 64
    # Job logs are kept this long after a job ends, and at most this many lines per job (the
    # oldest go first).
    log_retention_s: float = 7 * 86400.0
    log_max_lines_per_job: int = 2_000_000
    # Per job, the bytes of log stored (before compression) before later lines are dropped;
    # the count of dropped lines is in the log.
    log_max_bytes: int = 128 << 20
    # Ended jobs are deleted (their batches, payloads, workers and logs with them) this long
    # after they end.
    job_retention_s: float = 30 * 86400.0
    # How often what is past its retention is deleted, and the space it held given back.
    prune_s: float = 60.0
    # With a token set, every public endpoint but /healthz requires `Authorization: Bearer`.
    auth_token: str = ""
    # Local file datasets are read only under these folders; empty means the folder the
    # server was started in.
    data_roots: tuple[Path, ...] = ()
    # Remote datasets (s3://, gs://, http(s)://) are read only under these URL prefixes;
    # empty means anywhere the server's credentials and network reach.
    data_urls: tuple[str, ...] = ()
    # API environments (`cortex.environments`): the most bytes the built ones may take before
    # unused ones are removed; "uv" or "pip" (empty: uv where installed); a build's time limit.
    env_cache_bytes: int = 20 * 10**9
    env_installer: str = ""
    env_build_timeout_s: float = 1800.0
    # Webhooks (`cortex.webhooks`): the HMAC-SHA256 key that signs them (without one, jobs
    # cannot ask for webhooks); the URL prefixes they may go to (empty: any http(s) URL); how
    # long one attempt may take; how long a delivery is retried before it is given up; the
    # first retry's delay (doubling, with jitter, up to `webhook_max_backoff_s`).
    webhook_secret: str = ""
    webhook_urls: tuple[str, ...] = ()
    webhook_timeout_s: float = 10.0
    webhook_give_up_s: float = 86400.0
    webhook_retry_base_s: float = 5.0
    webhook_max_backoff_s: float = 600.0

    def __post_init__(self) -> None:
        """Refuse settings that contradict each other or cannot work, before anything starts:
        a server that runs with them fails later, and in ways that do not point here."""
        positive = (
            "lease_s",
            "heartbeat_s",
            "reconcile_s",
            "leader_lease_s",
            "max_lease_batches",
            "max_workers",
            "max_body_bytes",
            "log_max_lines_per_job",
            "env_build_timeout_s",
            "webhook_timeout_s",
            "webhook_give_up_s",
            "webhook_retry_base_s",
            "webhook_max_backoff_s",
        )
        for name in positive:
            value = getattr(self, name)
            if not value > 0:  # NaN too
                raise ValueError(f"{_setting(name)} must be more than 0, not {value}")
        for name in ("worker_grace_s", "log_retention_s", "env_cache_bytes"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{_setting(name)} must be 0 or more, not {value}")
        from cortex import capacity  # (it reads the machine only when asked)

        capacity.parse(self.capacity)  # a ValueError that names the flag
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{_setting('port')} must be 0 to 65535, not {self.port}")
        if self.heartbeat_s > self.lease_s / 2:
            # A lease renewed less often than twice per lease lapses whenever one heartbeat
            # is late: the batch goes to another worker while the first still runs it.
            raise ValueError(
                f"{_setting('heartbeat_s')} {self.heartbeat_s:g} must be at most half of "
                f"{_setting('lease_s')} {self.lease_s:g}: a batch would be leased again while "
                "its worker still runs it"
            )
        if self.auth_token != self.auth_token.strip():
            # A blank token would pass for "a token is set" (and allow listening on every
            # interface) while guarding nothing that a client could match: HTTP trims spaces
            # around a header's value.
            what = "is blank" if not self.auth_token.strip() else "starts or ends with whitespace"
            raise ValueError(f"{_setting('auth_token')} {what}: give a real secret, or none")

    def __repr__(self) -> str:  # never print the token
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["auth_token"] = "***" if self.auth_token else ""
        fields["webhook_secret"] = "***" if self.webhook_secret else ""
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return f"sqlite:///{(self.data_dir / 'cortex.db').resolve()}"

    @property
    def resolved_data_roots(self) -> tuple[Path, ...]:
        return tuple(root.resolve() for root in (self.data_roots or (Path.cwd(),)))

    @property
    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        return self.listen_url

    @property
    def listen_url(self) -> str:
        """Where this server itself listens (one replica, not a load balancer)."""
        host = self.host
        try:
            if ipaddress.ip_address(host).is_unspecified:
                host = "127.0.0.1"
        except ValueError:
            pass
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
