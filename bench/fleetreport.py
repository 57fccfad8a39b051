"""The fleet simulator's tables (`bench/fleet.py`): throughput, latencies and CPU per
configuration, and the CPU cost of each kind of request."""

from __future__ import annotations

import argparse
import time
from typing import Any

from scale import machine, write_readme

HEADING = "## Fleet: simulated workers against real servers"


def costs(config: dict[str, Any]) -> dict[str, float]:
    """Milliseconds of CPU per request, from the largest fleet's windows, for the servers and
    the store: each calibration window's CPU less the idle rate and what is known already,
    per request of its kind; a lease is what is left of the steady window."""
    idle_s = config["idle"]
    last = config["sizes"][-1]
    per: dict[str, float] = {}
    for part in ("server", "store"):
        rate = idle_s[part] / idle_s["wall"]
        known: dict[str, float] = {}

        def left(
            w: dict[str, Any], part: str = part, rate: float = rate, known: dict[str, float] = known
        ) -> float:
            return float(w[part] - rate * w["wall"] - sum(known[k] * w[k] for k in known if k in w))

        status = config["status_only"]
        known["statuses"] = left(status) / max(1, status["statuses"])
        hb = last["heartbeats_only"]
        known["heartbeats"] = left(hb) / max(1, hb["heartbeats"])
        if "logs_only" in last:
            logs = last["logs_only"]
            known["shipments"] = left(logs) / max(1, logs["shipments"])
        lease = left(last["steady"]) / max(1, last["steady"]["leases"])
        per[f"{part}: status"] = known["statuses"] * 1000
        per[f"{part}: heartbeat"] = known["heartbeats"] * 1000
        per[f"{part}: log shipment"] = known.get("shipments", float("nan")) * 1000
        per[f"{part}: lease (1 result, 1 batch)"] = lease * 1000
        if "eight" in last:
            per8 = left(last["eight"]) / max(1, last["eight"]["leases"])
            per[f"{part}: per batch"] = (per8 - lease) / 7 * 1000
            per[f"{part}: per lease request"] = lease * 1000 - per[f"{part}: per batch"]
    if config["store"] == "sqlite":  # the store is inside the server: its sampled share
        share = last["steady"]["spy"].get("driver", float("nan"))
        for name in list(per):
            if name.startswith("server: "):
                per["store: " + name.removeprefix("server: ")] = per[name] * share
    return per


def tables(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        HEADING,
        "",
        f"`bench/fleet.py --workers {','.join(map(str, args.workers))} --think-ms "
        f"{args.think_ms:g} --duration {args.duration:g}` ({time.strftime('%Y-%m-%d')}; "
        f"{machine()}). Leasing one batch at a time with a think time of {args.think_ms:g} ms "
        "and a log line shipped per batch, "
        "heartbeats at the server's period, 10 status reads a second. CPU in cores (CPU seconds "
        "per second): the servers, the store (PostgreSQL's backends; on SQLite the share of the "
        "server's py-spy samples in the driver's calls), and the simulator itself.",
        "",
        "| store | replicas | workers (jobs) | leases/s (demand) | batches/s | "
        "lease p50 / p99 ms | heartbeat p50 / p99 ms | log shipment p50 / p99 ms | "
        "status p50 / p99 ms | server cores | "
        "store cores | lock waiters | simulator cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in results:
        for size in config["sizes"]:
            s = size["steady"]
            wall = s["wall"]
            store_cores = (
                s["store"] / wall
                if config["store"] == "postgres"
                else s["spy"].get("driver", float("nan")) * s["server"] / wall
            )
            lines.append(
                f"| {config['store']} | {config['replicas']} | "
                f"{size['workers']} ({size['jobs']}) | "
                f"{s['leases/s']:.0f} ({size['demand/s']:.0f}) | {s['batches/s']:.0f} | "
                f"{s['lease p50']:.1f} / {s['lease p99']:.1f} | "
                f"{s['heartbeat p50']:.1f} / {s['heartbeat p99']:.1f} | "
                f"{s['logs p50']:.1f} / {s['logs p99']:.1f} | "
                f"{s['status p50']:.1f} / {s['status p99']:.1f} | {s['server'] / wall:.2f} | "
                f"{store_cores:.2f} | {s['lock waiters']:.1f} | {s['me'] / wall:.2f} |"
            )
    lines += ["", "Cost per request, ms of CPU (the largest fleet; idle CPU subtracted):", ""]
    header = [f"{c['store']}, {c['replicas']} replica(s)" for c in results]
    lines.append("| request | " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * len(header))
    per = [costs(config) for config in results]
    for name in per[0]:
        values = " | ".join(f"{p.get(name, float('nan')):.2f}" for p in per)
        lines.append(f"| {name} | {values} |")
    errors = sum(len(size["errors"]) for config in results for size in config["sizes"])
    retries = sum(size["retries"] for config in results for size in config["sizes"])
    lines += ["", f"Simulated workers' errors: {errors}; requests sent again: {retries}."]
    return "\n".join(lines) + "\n"


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    section = tables(results, args)
    print(section)
    if args.write:
        write_readme(section, HEADING)
