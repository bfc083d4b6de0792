"""Process-group environment resolution (torchrun / Slurm) and the reshardable infinite sampler."""

from __future__ import annotations

import itertools

import pytest

from dinov2_core.data.samplers import InfiniteShardedSampler
from dinov2_core.train.distributed import TORCHRUN_VARS, env_from_slurm, init_distributed


def test_slurm_variables_map_to_torchrun_ones():
    env = env_from_slurm({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert env["RANK"] == "9" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "8"
    assert env["MASTER_ADDR"] == "gpu07"  # first host of the node list
    port = int(env["MASTER_PORT"])
    assert 20000 <= port <= 60000
    # Same job id → same port on every task, without communication.
    assert env_from_slurm({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"})["MASTER_PORT"] == str(port)
    assert env_from_slurm({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"


def test_partial_torchrun_environment_is_an_error(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="partial torchrun environment"):
        init_distributed("cpu")


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_shards_one_global_stream_and_reshards():
    size, seed = 10, 3
    single = _take(InfiniteShardedSampler(size, rank=0, world_size=1, seed=seed), 40)
    assert [p for p, _ in single] == list(range(40))
    for first_pass in (single[:10], single[10:20]):
        assert sorted(i for _, i in first_pass) == list(range(size))  # each pass is a permutation
    assert [i for _, i in single[:10]] != [i for _, i in single[10:20]]  # reshuffled per pass
    ranks = [_take(InfiniteShardedSampler(size, rank=r, world_size=2, seed=seed), 20) for r in range(2)]
    merged = sorted(ranks[0] + ranks[1])
    assert merged == single  # the two ranks split exactly the single-process stream
    # Resume at another world size: continue from the global position.
    resumed = _take(InfiniteShardedSampler(size, rank=0, world_size=1, seed=seed, start=16), 4)
    assert resumed == single[16:20]
