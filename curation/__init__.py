"""Data stages of the pipeline: ingest raw images, embed them, deduplicate, and curate a balanced subset.

Each stage is one function that takes a typed config, input URIs and an output URI, and returns a
small JSON-serialisable dict of output URIs and counts (see ARCHITECTURE.md):

- :func:`curation.ingest.run_ingest`  — sources → ``manifest.parquet`` + ``rejects.parquet``
- :func:`curation.embed.run_embed`    — manifest → ``shard-XXXXX.npy`` / ``.ids.npy`` embeddings
- :func:`curation.dedup.run_dedup`    — exact + near duplicates, eval-set decontamination
- :func:`curation.curate.run_curate`  — retrieval and hierarchical k-means balanced sampling

This package never imports prefect, mlflow or submitit; ``tasks/`` wraps these functions.
"""
