"""Meta-device init: two gloo ranks build the model sharded without a full copy, with the official init,
equal to the one-rank init of the same seed; highres ``init_from`` and the distillation teacher load
into the shards; a 2-rank distillation trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2_core.models.checkpoint_io import load_backbone
from dinov2_core.train import load_train_config
from dinov2_core.train.distributed import init_distributed, shutdown
from dinov2_core.train.metrics import read_metrics
from dinov2_core.train.trainer import build_model

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/train/tiny_pretrain.yaml"
WORKER = str(Path(__file__).with_name("meta_init_worker.py"))


def _two_ranks(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _sharded_build(config: str, overrides: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"report_{len(list(tmp_path.iterdir()))}.json"
    _two_ranks(WORKER, "--config", config, "--out", str(out), *overrides)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_sharded_meta_init_is_official_and_equals_one_rank(tiny_dataset, tmp_path):
    overrides = [f"train.dataset={tiny_dataset.manifest_uri}"]
    report = _sharded_build(TINY, overrides, tmp_path)
    assert report["all_dtensor"]
    # Each rank holds about half: no rank materialised the whole model (dim-0 shards round up).
    assert report["local_numel"] < 0.55 * report["global_numel"]

    context = init_distributed("cpu")
    try:
        meta, _ = build_model(load_train_config(TINY, overrides), context)
        single = dict(meta.named_parameters())
    finally:
        shutdown(context)
    for name, values in report["full"].items():
        assert torch.equal(torch.tensor(values), single[name].detach()), name
    qkv = torch.tensor(report["full"]["student.backbone.blocks.0.attn.qkv.weight"])
    assert abs(qkv.std().item() - 0.02) < 0.003 and abs(qkv.mean().item()) < 0.002
    halves = qkv.chunk(2)  # rank 0's and rank 1's shards: drawn from one stream, not repeated
    assert not torch.equal(halves[0], halves[1])
    gamma = torch.tensor(report["full"]["student.backbone.blocks.0.ls1.gamma"])
    assert torch.all(gamma == load_train_config(TINY, overrides).student.layerscale)
    # The teacher starts as the student's copy.
    assert torch.equal(torch.tensor(report["full"]["teacher.dino_head.last_layer.weight_v"]),
                       single["student.dino_head.last_layer.weight_v"].detach())


@pytest.mark.slow
def test_highres_init_from_and_distill_teacher_load_into_shards(tiny_dataset, pretrain_run, tmp_path):
    source, _ = pretrain_run
    exported = load_backbone(source / "export").state_dict()
    # highres from an export directory: the pos_embed is interpolated, the blocks are the export's.
    report = _sharded_build("configs/train/tiny_highres.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}", f"init_from={source / 'export'}"], tmp_path)
    assert report["all_dtensor"]
    fc2 = torch.tensor(report["full"]["teacher.backbone.blocks.1.mlp.fc2.weight"])
    assert torch.equal(fc2, exported["blocks.1.mlp.fc2.weight"])
    assert len(report["full"]["student.backbone.pos_embed"][0]) != exported["pos_embed"].shape[1]
    # highres from the run directory: DCP reads the checkpoint into the shards.
    report = _sharded_build("configs/train/tiny_highres.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}", f"init_from={source}"], tmp_path)
    fc2 = torch.tensor(report["full"]["teacher.backbone.blocks.1.mlp.fc2.weight"])
    assert torch.equal(fc2, exported["blocks.1.mlp.fc2.weight"])

    # Distillation on two ranks: the frozen teacher is the export, the student trains.
    output = tmp_path / "distill"
    _two_ranks("-m", "dinov2_pipeline", "train", "configs/train/tiny_distill.yaml", "--output-dir", str(output),
               f"train.dataset={tiny_dataset.manifest_uri}", f"distill.teacher_path={source}",
               "train.batch_size_per_gpu=4", "optim.epochs=2")
    rows = read_metrics(output)
    assert rows and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in rows)
    assert rows[-1]["total_loss"] < rows[0]["total_loss"]
