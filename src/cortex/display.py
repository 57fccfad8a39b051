"""How the CLI shows APIs and jobs: the tables of the spec §7."""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cortex import schemas
from cortex.jobs import JobStatus

# What the functions below show: a record of the client, or the same JSON as a dict.
Shown = schemas.Record | dict[str, Any]


def _plain(data: Shown) -> dict[str, Any]:
    return data.to_json() if isinstance(data, schemas.Record) else data


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def duration(seconds: float) -> str:
    """Go-style durations truncated to seconds: 45s, 5m20s, 1h2m3s."""
    total = int(max(0, seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def ms_duration(seconds: float | None) -> str:
    """Go-style durations truncated to milliseconds: 250ms, 1.5s, 2m3.25s."""
    if seconds is None:
        return "-"
    ms = round(seconds * 1e9) // 1_000_000  # whole ns first: 1.025 s is not 1.024 s
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    secs = f"{rest_ms // 1000}.{rest_ms % 1000:03d}".rstrip("0").rstrip(".") + "s"
    return f"{minutes}m{secs}" if minutes else secs


def start_time(value: str | None) -> str:
    ts = _ts(value)
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%d %b %Y %H:%M:%S %Z")


def job_duration(status: Shown) -> str:
    status = _plain(status)
    start = _ts(status.get("start_time"))
    if start is None:
        return "-"
    end = _ts(status.get("end_time")) or time.time()
    return duration(end - start)


def status_text(code: str) -> str:
    try:
        return JobStatus(code).text
    except ValueError:
        return code


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column)
    return table


def apis_table(data: Shown) -> RenderableType:
    data = _plain(data)
    apis = data.get("batch_apis", [])
    if not apis:
        return Text("no apis are deployed")
    table = _table("batch api", "running jobs", "latest job id", "last update")
    for api in apis:
        jobs = api["job_statuses"]
        running = sum(1 for job in jobs if JobStatus(job["status"]).in_progress)
        latest = "-"
        if jobs:
            newest = max(jobs, key=lambda job: job["start_time"])
            start = _ts(newest["start_time"]) or time.time()
            latest = f"{newest['job_id']} (submitted {duration(time.time() - start)} ago)"
        updated = _ts(api["updated_at"]) or time.time()
        table.add_row(api["spec"]["name"], str(running), latest, duration(time.time() - updated))
    return table


def jobs_table(api: Shown) -> RenderableType:
    api = _plain(api)
    jobs = api["job_statuses"]
    parts: list[RenderableType] = []
    if not jobs:
        parts.append(Text("no submitted jobs"))
    else:
        show_failed = any(job["batch_metrics"]["failed"] for job in jobs)
        columns = ["job id", "status", "progress"]
        if show_failed:
            columns.append("failed")
        table = _table(*columns, "start time", "duration")
        for job in jobs:
            metrics = job["batch_metrics"]
            row = [
                job["job_id"],
                status_text(job["status"]),
                f"{metrics['succeeded']}/{job['total_batch_count']}",
            ]
            if show_failed:
                row.append(str(metrics["failed"]))
            row += [start_time(job["start_time"]), job_duration(job)]
            table.add_row(*row)
        parts.append(table)
    parts.append(Text(f"\nendpoint: {api['endpoint']}"))
    env = api.get("environment")
    if env and env.get("state") != "none":
        line = f"environment: {env['state']} ({env['key']})"
        if env["state"] == "failed":
            # The latest deploy's build failed: the version before it (if any) serves.
            line += f": {env.get('message') or ''}"
        parts.append(Text(line))
    return Group(*parts)


def job_view(data: Shown) -> RenderableType:
    data = _plain(data)
    job = data["job_status"]
    code = JobStatus(job["status"])
    metrics = job["batch_metrics"]
    lines: list[RenderableType] = [
        Text(f"job id: {job['job_id']}"),
        Text(f"status: {code.text}"),
        Text(""),
        Text(f"start time: {start_time(job['start_time'])}"),
        Text(f"end time: {start_time(job['end_time']) if job['end_time'] else '-'}"),
        Text(f"duration: {job_duration(job)}"),
        Text(""),
    ]
    stats = _table("total", "succeeded", "failed", "avg time per batch")
    stats.add_row(
        str(job["total_batch_count"]),
        str(metrics["succeeded"]),
        str(metrics["failed"]),
        ms_duration(metrics["average_time_per_batch"]),
    )
    lines += [Text("batch stats"), stats, Text(""), Text("worker stats")]
    counts = job.get("worker_counts")
    if code is JobStatus.ENQUEUING:
        lines.append(Text("still enqueuing, workers have not been allocated for this job yet"))
    elif code is not JobStatus.RUNNING:
        lines.append(
            Text("worker stats are not available because this job is not currently running")
        )
    elif not counts:
        lines.append(Text("unable to get worker stats"))
    else:
        columns = ["requested"]
        values = [str(job["workers"])]
        for name in ("pending", "initializing", "stalled", "running", "failed", "succeeded"):
            if name in ("running", "succeeded") or counts.get(name):
                columns.append(name)
                values.append(str(counts.get(name, 0)))
        workers = _table(*columns)
        workers.add_row(*values)
        lines.append(workers)
        if job.get("pending_reason"):
            lines.append(Text(f"pending: {job['pending_reason']}", style="yellow"))
    if job.get("error"):
        lines += [Text(""), Text(f"error: {job['error']['message']}", style="red")]
        if job["error"].get("traceback"):
            lines.append(Text(job["error"]["traceback"].rstrip()))
    if job.get("metadata"):
        lines += [Text(""), Text("metadata")]
        lines += [Text(f"  {key}: {value}") for key, value in job["metadata"].items()]
    if job.get("webhook_deliveries"):
        deliveries = _table("webhook event", "state", "attempts", "last status", "last error")
        for d in job["webhook_deliveries"]:
            deliveries.add_row(
                d["event"],
                d["state"],
                str(d["attempts"]),
                "-" if d["last_status"] is None else str(d["last_status"]),
                (d["last_error"] or "-")[:60],
            )
        lines += [Text(""), deliveries]
    lines += [Text(""), Text(f"job endpoint: {data['endpoint']}"), Text("")]
    lines += [Text("job configuration"), Text(json.dumps(_job_spec(job), indent=2))]
    return Group(*lines)


_RUNTIME_KEYS = {
    "status",
    "end_time",
    "batches_in_queue",
    "batch_counts",
    "batch_metrics",
    "worker_counts",
    "pending_reason",
    "error",
    "webhook_deliveries",
}


def _job_spec(job: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in job.items() if key not in _RUNTIME_KEYS}


class Rate:
    """Batches per second and the time left, from the statuses a follower sees: the rate over
    the last `window_s` of samples, so a slow start does not make the ETA lie for ever."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._samples: list[tuple[float, int]] = []

    def update(self, done: int, now: float | None = None) -> float | None:
        """Batches per second once `done` batches are done; None until some finish."""
        now = time.monotonic() if now is None else now
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.pop(0)
        first_t, first_done = self._samples[0]
        if now - first_t <= 0 or done < first_done:
            return None
        return (done - first_done) / (now - first_t)  # 0.0 while stalled: no ETA

    @staticmethod
    def eta(rate: float | None, left: int) -> float | None:
        return None if not rate else left / rate


def progress_detail(job: Shown, rate: float | None) -> str:
    """The words beside a job's progress bar: counts by state, rate, time left."""
    job = _plain(job)
    counts = job.get("batch_counts") or {}
    metrics = job["batch_metrics"]
    total = job["total_batch_count"]
    left = max(0, total - metrics["succeeded"] - metrics["failed"])
    parts = [f"{metrics['succeeded']} succeeded"]
    if metrics["failed"]:
        parts.append(f"{metrics['failed']} failed")
    if counts.get("leased"):
        parts.append(f"{counts['leased']} running")
    if counts.get("queued"):
        parts.append(f"{counts['queued']} queued")
    if rate is not None:
        parts.append(f"{rate:.1f} batches/s")
        eta = Rate.eta(rate, left)
        if eta is not None and left:
            parts.append(f"ETA {duration(eta)}")
    return ", ".join(parts)


def progress_line(job: Shown, rate: float | None) -> str:
    """One plain line of a job's progress, for output that is not a terminal."""
    job = _plain(job)
    metrics = job["batch_metrics"]
    done = metrics["succeeded"] + metrics["failed"]
    total = job["total_batch_count"]
    status = JobStatus(job["status"])
    of_total = f"{done}/{total}" if status is not JobStatus.ENQUEUING else f"{done}/{total}+"
    return f"job {job['job_id']}: {status.text}, {of_total} batches ({progress_detail(job, rate)})"


def final_line(job: Shown) -> str:
    """How a followed job ended, in one line."""
    job = _plain(job)
    metrics = job["batch_metrics"]
    status = JobStatus(job["status"])
    line = (
        f"job {job['job_id']} {status.text} after {job_duration(job)}: "
        f"{metrics['succeeded']} of {job['total_batch_count']} batches succeeded"
    )
    if metrics["failed"]:
        line += f", {metrics['failed']} failed"
    if job.get("error"):
        line += f" ({job['error']['message']})"
    return line


def failed_table(batches: list[Shown], traceback_lines: int = 3) -> RenderableType:
    """A job's failed batches: id, attempts, error, and the last lines of the traceback (the
    ones that say where)."""
    if not batches:
        return Text("no failed batches")
    table = _table("batch id", "attempts", "error")
    for shown in batches:
        batch = _plain(shown)
        error = batch.get("error") or ""
        trace = (batch.get("traceback") or "").rstrip().splitlines()
        if trace:
            error += "\n" + "\n".join(trace[-traceback_lines:])
        table.add_row(batch["batch_id"], str(batch["attempts"]), error)
    return table
