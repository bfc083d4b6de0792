"""Rank-aware embed without Slurm: two processes with RANK/WORLD_SIZE share the shards, every shard is
written once, only rank 0 writes the stage result, and a task killed mid-job costs only its unfinished
shards on the re-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from curation.embed import load_embeddings
from curation.stage_io import RESULT_FILE, write_parquet
from tests.curation.conftest import distinct_image

REPO_ROOT = Path(__file__).resolve().parents[2]
N_IMAGES, SHARD_SIZE = 16, 2  # 8 shards: rank 0 gets 0, 2, 4, 6 and rank 1 gets 1, 3, 5, 7

# One task of the job. ``slow_rank`` sleeps after each of its shards so that the test can kill it
# between two shards; every committed shard is logged ("embedded shard N ...") to count the writes.
WORKER = textwrap.dedent("""
    import json, logging, sys, time
    import curation.embed as embed
    from curation.config import EmbedConfig

    manifest, output, log_file, slow_rank, wait_timeout_s = sys.argv[1:6]
    logging.basicConfig(filename=log_file, level=logging.INFO, format="%(message)s")
    rank, _, _ = embed.task_identity()
    if int(slow_rank) == rank:
        commit = embed.embed_one_shard

        def slow_commit(*args, **kwargs):
            info = commit(*args, **kwargs)
            time.sleep(1.0)
            return info

        embed.embed_one_shard = slow_commit
    result = embed.run_embed(EmbedConfig(shard_size=SHARD_SIZE, crop_views=False), manifest, output,
                             wait_timeout_s=float(wait_timeout_s))
    print(json.dumps(result))
""").replace("SHARD_SIZE", str(SHARD_SIZE))


@pytest.fixture
def manifest(tmp_path) -> str:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for row_id in range(N_IMAGES):
        path = images / f"{row_id:03d}.jpg"
        distinct_image(row_id).save(path, quality=92)
        rows.append({"uri": str(path), "row_id": row_id})
    return write_parquet(rows, str(tmp_path / "manifest.parquet"))


def _start(tmp_path: Path, manifest: str, output: str, rank: int, run: str, slow_rank: int = -1,
           wait_timeout_s: float = 120.0) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(name, None)
    log_file = tmp_path / f"{run}-rank{rank}.log"
    return subprocess.Popen([sys.executable, str(script), manifest, output, str(log_file), str(slow_rank),
                             str(wait_timeout_s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO_ROOT)


def _embedded(tmp_path: Path, run: str) -> list[int]:
    """Shards committed in ``run`` by either rank, from the workers' logs (one line per write)."""
    shards = []
    for rank in (0, 1):
        log_file = tmp_path / f"{run}-rank{rank}.log"
        if log_file.exists():
            shards += [int(line.split()[2]) for line in log_file.read_text().splitlines()
                       if line.startswith("embedded shard")]
    return sorted(shards)


def _finish(process: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = process.communicate(timeout=120)
    lines = out.strip().splitlines()
    return process.returncode, json.loads(lines[-1]) if process.returncode == 0 else None, err


def test_two_tasks_share_the_shards_and_rank0_holds_the_result(tmp_path, manifest):
    output = str(tmp_path / "emb")
    processes = [_start(tmp_path, manifest, output, rank, "run") for rank in (0, 1)]
    (code0, result0, err0), (code1, result1, err1) = [_finish(p) for p in processes]
    assert code0 == 0 and code1 == 0, (err0, err1)

    assert result0["num_shards"] == 8 and result0["num_embedded"] == N_IMAGES and result0["tasks"] == 2
    assert result0["shards_skipped"] == 0
    assert result1 == {"result_holder": False, "rank": 1, "world_size": 2, "shards_embedded": [1, 3, 5, 7],
                       "shards_skipped": []}
    assert _embedded(tmp_path, "run") == list(range(8))  # each shard written exactly once
    for index in range(8):
        marker = json.loads((tmp_path / "emb" / f"shard-{index:05d}._SUCCESS").read_text())
        assert marker["rank"] == index % 2
    assert json.loads((tmp_path / "emb" / RESULT_FILE).read_text())["result"] == result0
    ids, vectors, _ = load_embeddings(output)
    assert sorted(ids.tolist()) == list(range(N_IMAGES))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_a_killed_task_costs_only_its_unfinished_shards(tmp_path, manifest):
    output = str(tmp_path / "emb")
    markers = tmp_path / "emb"
    rank0 = _start(tmp_path, manifest, output, 0, "first", slow_rank=1, wait_timeout_s=3)
    rank1 = _start(tmp_path, manifest, output, 1, "first", slow_rank=1)
    deadline = time.monotonic() + 60
    while not (markers / "shard-00001._SUCCESS").exists():  # rank 1's first shard
        assert time.monotonic() < deadline and rank1.poll() is None, "rank 1 never finished a shard"
        time.sleep(0.05)
    rank1.send_signal(signal.SIGKILL)
    code1, _, _ = _finish(rank1)
    code0, _, err0 = _finish(rank0)
    assert code1 == -signal.SIGKILL
    assert code0 != 0 and "still unfinished" in err0  # rank 0 gave up waiting; no stage result
    assert not (markers / RESULT_FILE).exists()
    first = _embedded(tmp_path, "first")
    assert set(first) >= {0, 1, 2, 4, 6} and len(first) < 8
    finished_at = json.loads((markers / "shard-00001._SUCCESS").read_text())["finished_at"]

    processes = [_start(tmp_path, manifest, output, rank, "again") for rank in (0, 1)]
    (code0, result0, err0), (code1, result1, err1) = [_finish(p) for p in processes]
    assert code0 == 0 and code1 == 0, (err0, err1)
    again = _embedded(tmp_path, "again")
    assert sorted(first + again) == list(range(8))  # the re-run did exactly the missing shards
    assert result0["num_embedded"] == N_IMAGES and result0["shards_skipped"] == len(first)
    assert sorted(result1["shards_embedded"] + result1["shards_skipped"]) == [1, 3, 5, 7]
    assert json.loads((markers / "shard-00001._SUCCESS").read_text())["finished_at"] == finished_at
