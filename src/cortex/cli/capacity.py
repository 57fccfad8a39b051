"""`cortex capacity`: the worker pool, what it holds and who waits."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from cortex.cli.base import _client, _print_json, cli, console, output_option, url_option


@cli.command()
@url_option
@output_option
def capacity(url: str, output: str) -> None:
    """The worker pool: total, used and free CPU, memory and GPUs, and each job's share."""
    with _client(url) as client:
        pool = client.capacity()
    if output == "json":
        _print_json(pool)
        return
    totals = Table("", "cpu", "mem", "gpu", box=None)
    for name in ("total", "used", "free"):
        totals.add_row(name, *_amounts(pool[name]))
    console.print(totals)
    if not pool["jobs"]:
        return
    jobs = Table("job id", "api", "priority", "workers", "pending", "cpu", "mem", "gpu", box=None)
    for job in pool["jobs"]:
        jobs.add_row(
            job["job_id"],
            job.get("api_name") or "-",
            str(job.get("priority", "-")),
            str(job["workers"]) + (f" ({job['draining']} draining)" if job["draining"] else ""),
            str(job.get("pending") or 0),
            *_amounts(job["reserved"]),
        )
    console.print()
    console.print(jobs)
    for job in pool["jobs"]:
        if job.get("pending_reason"):
            console.print(f"{job['job_id']}: {job['pending_reason']}")


def _amounts(amounts: dict[str, Any]) -> list[str]:
    mem = amounts["mem"]
    return [f"{amounts['cpu']:g}", f"{mem / (1 << 30):.3g}Gi" if mem else "0", str(amounts["gpu"])]
