"""Prefect deployments of the pipeline: ``prefect.yaml`` and the helper that registers them."""
