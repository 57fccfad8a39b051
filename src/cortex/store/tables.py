"""Table definitions shared by SQLite and PostgreSQL. Times are UNIX seconds (float)."""

from __future__ import annotations

import sqlalchemy as sa

# Named constraints, so that a migration can refer to every one of them by name (SQLite's batch
# mode included). A change to these tables needs a migration in `migrations/versions/`: the
# test suite checks that all migrations applied give exactly these tables.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

apis = sa.Table(
    "apis",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    # The version that serves: new jobs run it (but see pending_spec_id).
    sa.Column("spec_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # A deployed version whose environment is being built: new jobs run it and wait for the
    # build; it replaces spec_id once built. With pending_error set, its build failed: new jobs
    # run spec_id again, and the error stays here for `GET /get/<api>` until the next deploy.
    sa.Column("pending_spec_id", sa.String(64), nullable=True),
    sa.Column("pending_error", sa.Text, nullable=True),
)

# Every deployed version of an API, kept while a job uses it: a running job keeps the spec
# and the code it started with, whatever is deployed later.
api_specs = sa.Table(
    "api_specs",
    metadata,
    sa.Column("spec_id", sa.String(64), primary_key=True),
    sa.Column("api_name", sa.String(64), nullable=False, index=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("archive", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("api_name", sa.String(64), nullable=False),
    sa.Column("spec_id", sa.String(64), nullable=False),
    sa.Column("status", sa.String(40), nullable=False),
    sa.Column("workers", sa.Integer, nullable=False),
    sa.Column("config_json", sa.Text, nullable=True),
    sa.Column("timeout_s", sa.Integer, nullable=True),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("start_time", sa.Float, nullable=False),
    sa.Column("end_time", sa.Float, nullable=True),
    sa.Column("total_batch_count", sa.Integer, nullable=False, server_default="0"),
    # Counters change in the same transaction as the batch rows they count.
    sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("succeeded_time_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("enqueue_done", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("has_hook", sa.Boolean, nullable=True),
    # null: not claimed; "claimed": a worker is running on_job_complete; "done".
    sa.Column("completion_state", sa.String(16), nullable=True),
    sa.Column("completion_worker", sa.String(64), nullable=True),
    sa.Column("error_kind", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("error_traceback", sa.Text, nullable=True),
    sa.Column("worker_token", sa.String(64), nullable=False),
    # A job that re-runs the failed batches of another names it here.
    sa.Column("retry_of", sa.String(32), nullable=True),
    # Workers started to replace workers that died; bounded so a crash loop ends.
    sa.Column("worker_restarts", sa.Integer, nullable=False, server_default="0"),
    # A file dataset, as submitted ({"kind": ..., "s3_paths": ...}); null for an item list,
    # which is written whole at submission.
    sa.Column("dataset_json", sa.Text, nullable=True),
    # The resume cursor of an enqueuing job: items durably written as batches (the batches
    # are `total_batch_count`), and the replica whose enqueuer writes them.
    sa.Column("enqueued_items", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("enqueue_owner", sa.String(64), nullable=True),
    # Seconds one `predict` may run before its worker is replaced and the batch's attempt
    # ends as `batch_timeout` (null: no limit).
    sa.Column("batch_timeout_s", sa.Integer, nullable=True),
    # Failed batches the job tolerates: one more stops it (null: no budget).
    sa.Column("max_failed_batches", sa.Integer, nullable=True),
    # Where the job's results go ({"path"}), and once written the files ({"files",
    # "errors"}); null: results are kept in the store only.
    sa.Column("output_json", sa.Text, nullable=True),
    # The submission's `metadata` ({str: str}, also in `job_metadata` for filtering) and the
    # webhook its status changes are sent to ({"url", "events"}), as JSON.
    sa.Column("metadata_json", sa.Text, nullable=True),
    sa.Column("webhook_json", sa.Text, nullable=True),
    # Scheduling (`cortex.scheduling`): higher priorities get free capacity first; the job
    # keeps at least `min_workers` while batches are left. `pending_workers` and
    # `pending_reason`: the workers it wants and cannot have yet, and why, as of the
    # scheduler's last pass.
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("min_workers", sa.Integer, nullable=False, server_default="0"),
    sa.Column("pending_workers", sa.Integer, nullable=False, server_default="0"),
    sa.Column("pending_reason", sa.Text, nullable=True),
    sa.Index("ix_jobs_api_start", "api_name", "start_time"),
    sa.Index("ix_jobs_status", "status"),
)

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("batch_id", sa.String(36), nullable=False, unique=True),
    sa.Column("state", sa.String(12), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("duration_s", sa.Float, nullable=True),
    # Why the last attempt failed: predict_error, worker_died, worker_oom, lease_expired.
    sa.Column("error_kind", sa.String(32), nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("error_traceback", sa.Text, nullable=True),
    # Characters of the payload (in batch_payloads): a lease sizes its answer without it.
    sa.Column("payload_size", sa.Integer, nullable=False, server_default="0"),
    # With a batch_timeout: when the lease ends whatever the heartbeats say (the server's
    # backstop for a worker too wedged to time out its own `predict`).
    sa.Column("deadline_at", sa.Float, nullable=True),
    sa.Index("ix_batches_job_state_seq", "job_id", "state", "seq"),
    # Leased batches by expiry (the reconciler's sweeps): partial, so that writing queued
    # batches, a job's millions of them, never touches it.
    sa.Index(
        "ix_batches_lease",
        "lease_expires_at",
        sqlite_where=sa.text("state = 'leased'"),
        postgresql_where=sa.text("state = 'leased'"),
    ),
)

# A batch's JSON payload, written once and read by each lease of the batch. It lives apart from
# the batch's state: SQLite rewrites a whole row (a 200 kB payload included) on every update,
# and a batch's row is updated at least twice.
batch_payloads = sa.Table(
    "batch_payloads",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("payload", sa.Text, nullable=False),
)

# What `predict` returned for a batch, written in the transaction that records the batch's
# success (so a report sent again never writes it twice): the batch's JSON lines, ready to be
# streamed (`{"batch_id", "index", "result"}` a line), and their size in bytes.
batch_results = sa.Table(
    "batch_results",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("lines", sa.Text, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
)

# What a job's workers printed or logged, and the server's lines about the job, stored in the
# chunks workers ship them in (thousands of lines a row): appending stays cheap at 100,000 lines
# a second, and reading walks chunks by id. `packed` is a JSON array of
# [ts, stream, level, batch_id, message], compressed with zlib (logs shrink about 5 times).
log_chunks = sa.Table(
    "log_chunks",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("job_id", sa.String(32), nullable=False),
    # The worker id, or "server" for the server's own lines about the job.
    sa.Column("source", sa.String(64), nullable=False),
    sa.Column("first_ts", sa.Float, nullable=False),
    sa.Column("last_ts", sa.Float, nullable=False),
    sa.Column("line_count", sa.Integer, nullable=False),
    sa.Column("packed", sa.LargeBinary, nullable=False),
    # The size of the JSON before compression: what the job's log budget counts, and what a
    # reader holds in memory to decode the chunk.
    sa.Column("raw_bytes", sa.Integer, nullable=False),
    sa.Index("ix_log_chunks_job_id", "job_id", "id"),
    # An ended job's log is read in time order: chunks by their first line's time.
    sa.Index("ix_log_chunks_job_first_ts", "job_id", "first_ts", "id"),
)

# Per job, what its log stored and what it dropped past its budget (`CORTEX_LOG_MAX_BYTES`):
# appends count here rather than on the job's row, which every lease locks.
log_totals = sa.Table(
    "log_totals",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("stored_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dropped_lines", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("dropped_bytes", sa.BigInteger, nullable=False, server_default="0"),
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("pid", sa.Integer, nullable=True),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("error_message", sa.Text, nullable=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # The server replica that starts and watches this worker (its launcher knows the process).
    sa.Column("replica_id", sa.String(64), nullable=True),
    # The last time the worker was heard from (a heartbeat or a state report).
    sa.Column("seen_at", sa.Float, nullable=True),
    # What the worker holds of the pool's capacity while it is alive (its API's compute).
    sa.Column("cpu", sa.Float, nullable=False, server_default="0"),
    sa.Column("mem", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("gpu", sa.Integer, nullable=False, server_default="0"),
    # Asked to finish its current batch and exit (preempted, or no longer needed).
    sa.Column("draining", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_workers_state", "state"),
)

# The worker protocol's memory (`store/protocol.py`): per worker and channel ("loop": state
# reports, leases, the hook's report; "logs": log shipments), the sequence number of the last
# request and the answer it got, written in the transaction that acted on it. A request sent
# again (its answer was lost) is answered from here instead of acting twice. `final`: that
# answer ended the worker's work (nothing left to lease, or the hook's report was taken), so
# an exit after it is a clean one whatever its code says.
worker_replies = sa.Table(
    "worker_replies",
    metadata,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("channel", sa.String(8), primary_key=True),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    # JSON; null while the request that took `seq` has not been answered (see `protocol`).
    sa.Column("reply", sa.Text, nullable=True),
    sa.Column("final", sa.Boolean, nullable=False, server_default=sa.false()),
)

# Every server replica, renewed on its reconciler tick; one not seen for `leader_lease_s` is
# gone, and the workers it started are the leader's to watch.
replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("replica_id", sa.String(64), primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),
)

# One row per lease ("reconciler"): the replica that holds it does the store-wide work until
# `expires_at`, renewing it on each tick; when the holder dies another takes it over.
leadership = sa.Table(
    "leadership",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("replica_id", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
)

# A job's metadata, a row per key: what `GET /<api>?metadata.KEY=VALUE` filters on (the job's
# row keeps the whole mapping, for reading).
job_metadata = sa.Table(
    "job_metadata",
    metadata,
    sa.Column("job_id", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.String(512), nullable=False),
    sa.Index("ix_job_metadata_key_value", "key", "value"),
)

# The webhook outbox: a row per event a job's webhook asked for, written in the transaction that
# changed the job's status, so that no crash can lose it. Deliverers (every replica) claim due
# rows by moving `next_attempt_at` past a lease (compare-and-set), POST, and record the answer.
# `body` is the JSON sent, fixed at the first attempt; `delivered_at` or `gave_up_at` ends it.
# Rows go with their job (retention), or once settled if the job went with its API.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("delivery_id", sa.String(36), primary_key=True),
    sa.Column("job_id", sa.String(32), nullable=False, index=True),
    # Kept when the job's API is deleted (its stop is an event too): the body then says which.
    sa.Column("api_name", sa.String(64), nullable=False),
    sa.Column("event", sa.String(40), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    sa.Column("last_attempt_at", sa.Float, nullable=True),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("delivered_at", sa.Float, nullable=True),
    sa.Column("gave_up_at", sa.Float, nullable=True),
    # Rows still to send, by when they are due (null once delivered or given up).
    sa.Index("ix_webhook_deliveries_due", "next_attempt_at"),
)

# `Idempotency-Key`s of submissions: the unique (API, key) makes two concurrent POSTs with one
# key create one job; `body_digest` tells a replay from a conflicting reuse. Kept 24 hours.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("api_name", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("body_digest", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
)
