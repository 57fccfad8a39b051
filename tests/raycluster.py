"""A real two-node Ray cluster on loopback, for the Ray launcher's tests (node2 declares two
fake GPUs, which Ray hands out as it would real ones).

Each `ray start --block` runs in its own process session and is stopped by its process group
(SIGTERM, then SIGKILL a few seconds later): never `ray stop`, which would stop every Ray on the
machine. Token authentication as Ray 2.60 wants it, with a token of our own in the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_port, wait_for

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what every Ray process, the cortex server included, needs
    temp_dir: Path
    nodes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def node_ids(self) -> dict[str, str]:
        """{node id: "head" | "node2"} of the live nodes, asked of the GCS by a tiny driver."""
        code = (
            "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR');"
            "print(json.dumps({n['NodeID']: ('node2' if 'node2' in n['Resources'] else 'head')"
            " for n in ray.nodes() if n['Alive']}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, self.address],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return dict(json.loads(out.strip().splitlines()[-1]))

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _stop_group(node)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
    # The head drains for up to 30 s on SIGTERM; its raylets, workers and actors (our worker
    # subprocesses die with their actors) go with the group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def start(log_dir: Path, head_cpus: int = 2, node2_cpus: int = 1) -> Cluster:
    # A short path: Ray puts unix sockets under it (at most 107 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="cxray-", dir="/tmp"))
    port = free_port()
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cluster = Cluster(f"127.0.0.1:{port}", env, temp_dir)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [
        RAY, "start", "--head", "--port", str(port), "--num-cpus", str(head_cpus),
        "--include-dashboard", "false", "--temp-dir", str(temp_dir),
        "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        *common,
    ]  # fmt: skip
    node2 = [
        RAY, "start", "--address", cluster.address, "--num-cpus", str(node2_cpus),
        "--resources", json.dumps({"node2": 1}), "--num-gpus", "2",
        "--dashboard-agent-listen-port", str(free_port()),
        *common,
    ]  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name, argv in (("head", head), ("node2", node2)):
            with open(log_dir / f"ray-{name}.log", "ab") as log:
                cluster.nodes.append(
                    subprocess.Popen(
                        argv,
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            if name == "head":
                wait_for(lambda: _gcs_up(port), 60, "the Ray head to listen")
        wait_for(lambda: len(cluster.node_ids()) == 2, 90, "both Ray nodes to be alive")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _gcs_up(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
