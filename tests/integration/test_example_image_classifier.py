"""examples/image-classifier end to end: its requirements.txt (boto3, Pillow) built into an
environment of its own at deploy, a file_path_lister job over PNGs on moto's S3 server (on
loopback), a result file per batch and the aggregate from on_job_complete, read back with s3fs.

Pillow is not in the server's environment, and the boto3 there (moto needs it) is not the one the
workers use: they import both from the API's environment under `<data_dir>/envs/`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import uuid
import zlib
from pathlib import Path

import boto3
import s3fs
import yaml

from helpers import start_server, stop_server, wait_for, wait_for_status
from s3server import BUCKET, S3

EXAMPLE = Path(__file__).parents[2] / "examples" / "image-classifier"
API = "image-classifier"
COLOURS = {"red": (200, 30, 40), "green": (20, 180, 60), "blue": (10, 40, 220)}
# The copied project's .env renames the classes: results labelled so prove it reached the workers.
LABELS = {"red": "rot", "green": "gruen", "blue": "blau"}


def solid_png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A PNG of one colour, written by hand (the test process has no Pillow)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))  # filter 0 per row
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_image_classifier_example(s3: S3, tmp_path: Path) -> None:
    # The isolation the example relies on: the server runs in this interpreter's environment.
    assert importlib.util.find_spec("PIL") is None, "Pillow must not be in the server's venv"

    base = f"image-classifier-{uuid.uuid4().hex[:8]}"
    images = {
        f"{base}/images/{name}-{i}.png": colour
        for i, (name, colour) in enumerate(
            [("red", "red"), ("green", "green"), ("blue", "blue"), ("more", "red"), ("x", "blue")]
        )
    }
    client = s3.client()
    for key, colour in images.items():
        client.put_object(Bucket=BUCKET, Key=key, Body=solid_png(6, 4, COLOURS[colour]))
    client.put_object(Bucket=BUCKET, Key=f"{base}/images/notes.txt", Body=b"not an image")

    # The example, as a user would copy it, pointed at moto and at this test's prefix.
    project = tmp_path / API
    shutil.copytree(EXAMPLE, project)
    config = yaml.safe_load((project / "cortex.yaml").read_text())
    dest = f"s3://{BUCKET}/{base}/results"
    config[0]["predictor"]["config"]["dest_s3_dir"] = dest
    (project / "cortex.yaml").write_text(yaml.safe_dump(config))
    dotenv = project / ".env"
    dotenv.write_text(
        dotenv.read_text()
        + f"LABELS={LABELS['red']},{LABELS['green']},{LABELS['blue']}\n"
        + f"AWS_ENDPOINT_URL={s3.endpoint}\n"
        + "AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test\nAWS_DEFAULT_REGION=us-east-1\n"
    )

    # The server lists the images itself (file_path_lister), hence moto's address for it too.
    server = start_server(tmp_path / "server", **s3.env)
    try:
        with server.client() as cortex:
            cortex.deploy(project / "cortex.yaml")
            env = cortex.wait_environment(API)
            assert env["state"] == "ready", env

            job = cortex.submit(
                API,
                {
                    "workers": 2,
                    "file_path_lister": {
                        "s3_paths": [f"s3://{BUCKET}/{base}/images/"],
                        "includes": ["**.png"],
                        "batch_size": 2,
                    },
                },
            )
            job_id = job["job_id"]
            status = wait_for_status(cortex, API, job_id, timeout_s=60)
            log = list(cortex.logs(API, job_id, follow=True))  # ends once every line is in
            assert status["status"] == "status_succeeded", (status, "\n".join(log))
            assert status["batch_metrics"]["succeeded"] == 3, status

        # The workers imported boto3 and Pillow from the API's environment.
        envs = (server.data_dir / "envs").resolve()
        for package in ("boto3", "Pillow"):
            paths = {m[1] for line in log if (m := re.search(rf" {package} \S+ from (\S+)", line))}
            assert paths, f"no line saying where {package} came from:\n" + "\n".join(log)
            for path in paths:
                assert Path(path).resolve().is_relative_to(envs), (package, path, envs)
        assert not Path(boto3.__file__).resolve().is_relative_to(envs)
    finally:
        stop_server(server)

    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3.endpoint, "region_name": "us-east-1"},
        key="test",
        secret="test",
        skip_instance_cache=True,
    )
    prefix = f"{BUCKET}/{base}/results/{job_id}"
    files = wait_for(lambda: fs.ls(prefix, refresh=True), 5, "the result files")
    names = sorted(Path(f).name for f in files)
    assert "aggregated_results.json" in names
    batch_files = [f for f in files if not f.endswith("/aggregated_results.json")]
    assert len(batch_files) == 3, names  # 5 images in batches of 2

    expected = {f"s3://{BUCKET}/{key}": LABELS[colour] for key, colour in images.items()}
    per_batch = {}
    for path in batch_files:
        results = json.loads(fs.cat_file(path))
        assert 1 <= len(results) <= 2, results
        per_batch.update({r["url"]: r["label"] for r in results})
        assert all(r["size"] == [6, 4] for r in results), results
    assert per_batch == expected

    summary = json.loads(fs.cat_file(f"{prefix}/aggregated_results.json"))
    assert summary["images"] == 5 and summary["batches"] == 3, summary
    assert {r["url"]: r["label"] for r in summary["results"]} == expected
    assert summary["labels"] == {"rot": 2, "gruen": 1, "blau": 2}
