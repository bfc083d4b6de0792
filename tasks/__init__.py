"""Prefect tasks: one thin module per pipeline stage plus the machinery they share (launching,
tracking, completion manifests, artifacts)."""
