"""Job functions for the multi-task launcher tests (importable on the Slurm nodes of the local cluster)."""

from __future__ import annotations

import os


def fail_on_rank_one() -> str:
    if os.environ.get("RANK") == "1":
        raise FileNotFoundError("rank 1 could not find its shard")
    return f"rank {os.environ.get('RANK')} done"
