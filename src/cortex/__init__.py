"""Cortex Batch: a self-hosted Batch API for ML inference."""

__version__ = "0.1.0"
