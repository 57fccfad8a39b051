"""moto's standalone S3 server, a real HTTP server on loopback: its endpoint and the
environment a server needs to use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from helpers import free_port, wait_for

BUCKET = "cortex-data"


@dataclass
class S3:
    endpoint: str
    env: dict[str, str]

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )


def run_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """moto's standalone S3 server, a real HTTP server on loopback, with bucket `BUCKET`
    (the `s3` fixture of tests/conftest.py)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto = Path(sys.executable).parent / "moto_server"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(endpoint, timeout=1).status_code < 500
        except httpx.TransportError:
            return False

    try:
        wait_for(up, 30, "moto_server to answer")
        env = {
            "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        S3(endpoint, env).client().create_bucket(Bucket=BUCKET)
        yield S3(endpoint, env)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
