"""The ``dinov2-pipeline`` command line: one entry point for every stage and the whole pipeline."""
