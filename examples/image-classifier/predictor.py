"""Classify images stored on S3, after Cortex's batch image-classifier example.

Each item is an image URL, `s3://bucket/key` (what a `file_path_lister` job hands out). `predict`
downloads each image with boto3, decodes it with Pillow, classifies it, and writes the batch's
results to `<dest_s3_dir>/<job_id>/<batch_id>.json`; `on_job_complete` gathers every batch file of
the job into `<dest_s3_dir>/<job_id>/aggregated_results.json`.

The "model" is a stand-in: it labels an image by its dominant colour channel, so the example runs
anywhere without downloading weights. `__init__` shows where a real model would be loaded.

S3 is reached with boto3's usual credentials (AWS_ACCESS_KEY_ID, ~/.aws, an instance role) and
region; AWS_ENDPOINT_URL, when set, points it at an S3-compatible store (MinIO, moto).
"""

import io
import json
import os
import sys
from urllib.parse import urlparse

import boto3
import PIL
from PIL import Image, ImageStat

RESULTS = "aggregated_results.json"


def split_s3_url(url):
    """`s3://bucket/some/key` -> ("bucket", "some/key")."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URL: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


class DominantChannelClassifier:
    """Stands in for a real model: the colour channel with the highest mean wins."""

    def __init__(self, labels):
        if len(labels) != 3:
            raise ValueError(f"LABELS must name 3 classes (red, green, blue), got {labels}")
        self.labels = labels

    def __call__(self, image):
        means = ImageStat.Stat(image.convert("RGB")).mean
        best = max(range(3), key=lambda channel: means[channel])
        return self.labels[best], [round(mean, 2) for mean in means]


class PythonPredictor:
    def __init__(self, config, job_spec):
        if "dest_s3_dir" not in config:
            raise ValueError('predictor config: "dest_s3_dir" is required (s3://bucket/prefix)')
        bucket, prefix = split_s3_url(config["dest_s3_dir"])
        self.bucket = bucket
        self.prefix = "/".join(part for part in (prefix.strip("/"), job_spec["job_id"]) if part)
        self.s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)

        # A real classifier would load its model here, once per worker, for example:
        #   self.model = torchvision.models.resnet50(weights="IMAGENET1K_V2").eval()
        # (with torch and torchvision in requirements.txt) and use it in predict.
        labels = os.environ.get("LABELS", "red,green,blue").split(",")
        self.model = DominantChannelClassifier([label.strip() for label in labels])

        # Where the packages come from: this API's own environment, not the server's.
        print(f"python {sys.executable}")
        print(f"boto3 {boto3.__version__} from {boto3.__file__}")
        print(f"Pillow {PIL.__version__} from {PIL.__file__}")

    def predict(self, payload, batch_id):
        results = []
        for url in payload:
            bucket, key = split_s3_url(url)
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            with Image.open(io.BytesIO(body)) as image:
                label, channel_means = self.model(image)
                size = list(image.size)
            results.append(
                {"url": url, "label": label, "size": size, "channel_means": channel_means}
            )
        key = f"{self.prefix}/{batch_id}.json"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(results).encode())
        print(f"batch {batch_id}: {len(results)} image(s) -> s3://{self.bucket}/{key}")

    def on_job_complete(self):
        results, batches = [], 0
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith(".json") or obj["Key"].endswith(f"/{RESULTS}"):
                    continue
                body = self.s3.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                results.extend(json.loads(body))
                batches += 1
        results.sort(key=lambda result: result["url"])
        counts = {}
        for result in results:
            counts[result["label"]] = counts.get(result["label"], 0) + 1
        summary = {"images": len(results), "batches": batches, "labels": counts, "results": results}
        key = f"{self.prefix}/{RESULTS}"
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(summary).encode())
        print(
            f"aggregated {len(results)} results from {batches} batches -> s3://{self.bucket}/{key}"
        )
