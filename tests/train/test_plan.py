"""The training plan: the memory estimate against one real CPU step, ViT-g/ViT-L dry runs in seconds,
the lr rule, time coverage and warnings."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time

import pytest
import torch

from dinov2_core.data.collate import mask_collated_crops
from dinov2_core.data.masking import MaskingGenerator, official_max_num_patches
from dinov2_core.train.config import load_train_config
from dinov2_core.train.meta_arch import SSLMetaArch
from dinov2_core.train.param_groups import build_param_groups
from dinov2_core.train.plan import count_parameters, estimate_memory, plan_training, saved_activation_bytes

TINY = "configs/train/tiny_pretrain.yaml"


def _batch(cfg) -> dict:
    b, size, local = cfg.train.batch_size_per_gpu, cfg.crops.global_crops_size, cfg.crops.local_crops_size
    grid = size // cfg.student.patch_size
    generator = MaskingGenerator((grid, grid), max_num_patches=official_max_num_patches(size, cfg.student.patch_size))
    return mask_collated_crops(torch.randn(2 * b, 3, size, size), torch.randn(cfg.crops.local_crops_number * b, 3,
                                                                              local, local),
                               tuple(cfg.ibot.mask_ratio_min_max), cfg.ibot.mask_sample_probability,
                               n_tokens=grid * grid, mask_generator=generator, rng=random.Random(0))


@pytest.mark.parametrize("overrides", [
    [],  # per-sample drop path (rate 0.1), MLP, separate iBOT head
    ["student.drop_path_rate=0.4", "student.ffn_layer=swiglufused", "crops.local_crops_number=4"],  # batch subsets
    ["ibot.separate_head=false", "ibot.head_n_prototypes=64", "student.layerscale=null", "train.batch_size_per_gpu=6"],
])
def test_memory_estimate_matches_a_real_cpu_step(overrides):
    cfg = load_train_config(TINY, ["train.dataset=unused", *overrides])
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg)
    meta.train()
    backbone = meta.student["backbone"]
    optimizer = torch.optim.AdamW(build_param_groups(meta.student.named_parameters(), backbone.n_blocks,
                                                     backbone.chunked_blocks, 0.9, 0.2), lr=1e-3)
    batch = _batch(cfg)
    with saved_activation_bytes(exclude=list(meta.parameters())) as saved:
        loss, _ = meta.forward_losses(batch, teacher_temp=0.04)
    loss.backward()
    optimizer.step()

    counts, largest_unit = count_parameters(cfg)
    estimate = estimate_memory(cfg, counts, largest_unit, world_size=1, compute_bytes=4)
    assert abs(estimate.activations - saved["bytes"]) <= 0.25 * saved["bytes"], (estimate.activation_parts, saved)
    params = sum(p.numel() * p.element_size() for p in meta.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in meta.parameters() if p.grad is not None)
    optim_bytes = sum(v.numel() * v.element_size() for state in optimizer.state.values() for k, v in state.items()
                      if k != "step")
    assert (estimate.params, estimate.grads, estimate.optimizer) == (params, grads, optim_bytes)


def test_activation_checkpointing_and_world_size_shrink_memory():
    cfg = load_train_config("configs/train/vitl14.yaml", ["train.dataset=unused"])
    one = plan_training(cfg, nodes=1, tasks_per_node=8, gpus_per_node=8)
    twelve = plan_training(cfg, nodes=12, tasks_per_node=8, gpus_per_node=8)
    assert twelve.memory.optimizer * 12 == pytest.approx(one.memory.optimizer, rel=1e-6)
    assert one.memory.activations == twelve.memory.activations  # per-GPU batch, not global
    checkpointed = plan_training(load_train_config("configs/train/vitl14.yaml", [
        "train.dataset=unused", "parallel.activation_checkpointing=true"]), 1, 8, 8)
    assert checkpointed.memory.activations < one.memory.activations / 2


@pytest.mark.parametrize("recipe, arch, backbone_millions", [
    ("configs/train/vitg14.yaml", "vit_giant2", (1100, 1150)),  # ViT-g/14: 1.1B
    ("configs/train/vitl14.yaml", "vit_large", (300, 306)),  # ViT-L/14: 0.3B
])
def test_dry_run_prints_the_plan_in_seconds(recipe, arch, backbone_millions):
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "dinov2_pipeline", "train", recipe, "train.dataset=x.parquet", "--dry-run",
         "--nodes", "12", "--tasks-per-node", "8", "--gpus-per-node", "8", "--timeout-min", "2880",
         "--max-requeues", "1", "--seconds-per-iter", "0.9"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    elapsed = time.perf_counter() - started
    assert elapsed < 60, elapsed  # seconds on an idle machine; generous for a loaded 2-core runner
    cfg = load_train_config(recipe, ["train.dataset=x.parquet"])
    global_batch = cfg.train.batch_size_per_gpu * 96
    assert f"{arch} on 12 node(s) x 8 task(s)" in out and "world size 96" in out
    assert f"global {global_batch}" in out
    assert f"peak {cfg.optim.base_lr * math.sqrt(global_batch / 1024):.4g}" in out
    plan = plan_training(cfg, 12, 8, 8, timeout_min=2880, max_requeues=1, seconds_per_iter=0.9)
    assert backbone_millions[0] <= plan.params.student_backbone / 1e6 <= backbone_millions[1]
    # 625,001 iterations x 0.9 s = 156 h: four 48 h jobs, but only two allowed
    assert plan.time.jobs_needed == 4 and plan.time.covered is False
    assert "only 2 are allowed" in out and "--max-requeues to >= 3" in out


def test_warnings_and_unknown_speed():
    cfg = load_train_config("configs/train/vitg14.yaml", ["train.dataset=x", "train.batch_size_per_gpu=64"])
    plan = plan_training(cfg, nodes=1, tasks_per_node=1, gpus_per_node=1, timeout_min=600,
                         partition_max_time_min=240)
    text = plan.render()
    assert "unknown: pass --seconds-per-iter" in text
    assert any("exceeds the 80 GB GPU" in w for w in plan.warnings)
    assert any("exceeds the partition's MaxTime of 240 min" in w for w in plan.warnings)
    assert plan.to_dict()["memory"]["total"] == plan.memory.total
    small = plan_training(load_train_config(TINY, ["train.dataset=x"]), 1, 2, 0, timeout_min=1, max_requeues=0,
                          seconds_per_iter=30.0)  # a 4-iteration checkpoint period outlasts the 1 min limit
    assert small.device == "cpu" and small.world_size == 2
    assert any("no job would ever save a checkpoint" in w for w in small.warnings)
    with pytest.raises(ValueError, match="nodes"):
        plan_training(cfg, nodes=0)


def test_slurm_time_limits_parse():
    from tasks.launch import parse_slurm_time_min

    assert [parse_slurm_time_min(t) for t in ("30", "2:00:00", "1-12", "1-00:00:00", "45:30", "infinite")] == \
        [30, 120, 2160, 1440, 46, None]
    with pytest.raises(ValueError, match="not a Slurm time limit"):
        parse_slurm_time_min("soon")


def test_partition_max_time_from_the_real_cluster(slurm_cluster):
    from tasks.launch import parse_slurm_time_min, slurm_partition_max_time_min

    shown = subprocess.run(["scontrol", "show", "partition", slurm_cluster.partition, "-o"], capture_output=True,
                           text=True, check=True, timeout=20).stdout
    max_time = dict(word.split("=", 1) for word in shown.split() if "=" in word)["MaxTime"]
    assert slurm_partition_max_time_min(slurm_cluster.partition) == parse_slurm_time_min(max_time)


def test_dry_run_json_has_config_and_plan(capsys):
    from dinov2_pipeline.cli import main

    assert main(["train", TINY, "train.dataset=x.parquet", "--dry-run", "--json", "--gpus-per-node", "0",
                 "--tasks-per-node", "2"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["config"]["student"]["arch"] == "vit_test"
    assert report["plan"]["world_size"] == 2 and report["plan"]["global_batch"] == 16
