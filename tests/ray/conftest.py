"""A real two-node Ray cluster for the Ray launcher's tests, every socket on 127.0.0.1.

`ray start --node-ip-address 127.0.0.1` still binds its GCS and raylets to the machine's
interface address (Ray 2.60). Ray's own switch `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` keeps a
node on loopback, but then `ray start` refuses a second node; so the two nodes are started by
Ray's test cluster (`ray.cluster_utils.Cluster`) in a helper process of their own session: the
head (2 CPUs) and node2 (1 CPU, two declared GPUs, which Ray hands out as it would real ones,
and the custom resource `node2`). The helper writes the address into a file, then waits for
its stdin to close; it is stopped by closing it (`Cluster.shutdown`), then by SIGKILL to its
process group after a grace period. Never `ray stop`, which would stop every Ray on the machine.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import wait_for

# Run by the helper process: argv = ray temp folder, head CPUs, node2 CPUs, address file.
_HELPER = """
import json, os, sys
from ray.cluster_utils import Cluster
temp_dir, head_cpus, node2_cpus, address_file = sys.argv[1:5]
cluster = Cluster(
    initialize_head=True,
    head_node_args={"num_cpus": int(head_cpus), "temp_dir": temp_dir, "include_dashboard": False},
)
cluster.add_node(num_cpus=int(node2_cpus), num_gpus=2, resources={"node2": 1})
cluster.wait_for_nodes()
with open(address_file + ".tmp", "w") as f:
    json.dump({"address": cluster.address}, f)
os.rename(address_file + ".tmp", address_file)
sys.stdin.read()  # until the test session closes it
cluster.shutdown()
"""


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what every Ray process, the cortex server included, needs
    temp_dir: Path
    helper: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.helper.stdin is not None:
            with contextlib.suppress(OSError):
                self.helper.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.helper.wait(30)
        # The nodes' processes (raylets, workers, actors; our worker subprocesses die with
        # their actors) are in the helper's process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.helper.pid, signal.SIGKILL)
        self.helper.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _read_address(path: Path, helper: subprocess.Popen[bytes], log: Path) -> str:
    def written() -> str | None:
        if helper.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the Ray cluster did not start:\n{tail}")
        return str(json.loads(path.read_text())["address"]) if path.exists() else None

    return wait_for(written, 120, "the Ray cluster to start")


def start(log_dir: Path, head_cpus: int = 2, node2_cpus: int = 1) -> Cluster:
    # A short path: Ray puts unix sockets under it (at most 107 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="cxray-", dir="/tmp"))
    (temp_dir / "ray").mkdir()
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray's switch that keeps every node (and a driver) on 127.0.0.1.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "ray-cluster.log"
    address_file = temp_dir / "address.json"
    with open(log_path, "ab") as log:
        helper = subprocess.Popen(
            [sys.executable, "-c", _HELPER, str(temp_dir / "ray"), str(head_cpus),
             str(node2_cpus), str(address_file)],
            # RAY_TMPDIR: where Ray's test cluster writes its address file (not /tmp/ray).
            # TEST_ON_RAY_NODE: what the nodes' processes have and the server's do not.
            env={**os.environ, **env, "RAY_TMPDIR": str(temp_dir), "TEST_ON_RAY_NODE": "1"},
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    cluster = Cluster("", env, temp_dir, helper)
    try:
        cluster.address = _read_address(address_file, helper, log_path)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.environ.get("CORTEX_TEST_RAY") != "1":
        pytest.skip("Ray tests are slow: run `make test-ray`")
    pytest.importorskip("ray")
    started = start(tmp_path_factory.mktemp("ray"))
    yield started
    started.stop()
