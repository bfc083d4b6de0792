"""Rank-aware embed as one real Slurm job with two tasks (submitit, tasks_per_node=2): the tasks split
the shards and only rank 0 returns the stage summary."""

from __future__ import annotations

import json
import os

import pytest

from curation.config import EmbedConfig
from curation.embed import load_embeddings
from tests.curation.test_embed_ranks import N_IMAGES, SHARD_SIZE, manifest  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)  # submitit's results() has no timeout of its own


def embed_as_task(cfg: EmbedConfig, manifest_uri: str, output_uri: str) -> dict:
    """One task of the job: RANK/WORLD_SIZE/LOCAL_RANK from submitit, as the pipeline's launcher exports them."""
    import submitit

    from curation.embed import run_embed

    env = submitit.JobEnvironment()
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
    return run_embed(cfg, manifest_uri, output_uri, wait_timeout_s=120)


def test_two_slurm_tasks_embed_once_and_return_one_summary(slurm_cluster, tmp_path, manifest):  # noqa: F811
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition, tasks_per_node=2,
                               cpus_per_task=1)
    output = str(tmp_path / "emb")
    job = executor.submit(embed_as_task, EmbedConfig(shard_size=SHARD_SIZE, crop_views=False), manifest, output)
    results = job.results()
    summaries = [r for r in results if r.get("result_holder", True)]
    assert len(results) == 2 and len(summaries) == 1
    summary = summaries[0]
    assert summary["num_shards"] == N_IMAGES // SHARD_SIZE and summary["num_embedded"] == N_IMAGES
    assert summary["tasks"] == 2
    other = next(r for r in results if r.get("result_holder") is False)
    assert other["rank"] == 1 and other["shards_embedded"] == [1, 3, 5, 7]
    ranks = [json.load(open(os.path.join(output, f"shard-{i:05d}._SUCCESS")))["rank"] for i in range(8)]
    assert ranks == [0, 1] * 4
    ids, _, _ = load_embeddings(output)
    assert sorted(ids.tolist()) == list(range(N_IMAGES))
