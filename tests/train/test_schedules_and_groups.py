"""Schedules reproduce the recipe's §5.2 table (float64) and param groups follow §5.3."""

from __future__ import annotations

import math

import pytest

from dinov2_core.train.config import load_train_config
from dinov2_core.train.param_groups import build_param_groups, param_multipliers
from dinov2_core.train.schedules import CosineSchedule, build_schedules


@pytest.fixture(scope="module")
def vitl14_at_3072():
    cfg = load_train_config("configs/train/vitl14.yaml", ["train.dataset=unused.txt"])
    return cfg, build_schedules(cfg, world_size=96)  # 96 GPUs x 32 = 3072


def test_vitl14_table_values(vitl14_at_3072):
    cfg, s = vitl14_at_3072
    assert cfg.max_iter == 625_000
    assert s.peak_lr == pytest.approx(2e-4 * math.sqrt(3072 / 1024), rel=1e-15)
    assert s.lr[0] == 0.0
    assert s.lr[50_000] == pytest.approx(1.7321e-4, abs=5e-9)
    assert s.lr[99_999] == pytest.approx(3.4641e-4, abs=5e-9)
    assert s.lr[100_000] == pytest.approx(3.4641e-4, abs=5e-9)
    assert s.lr[362_500] == pytest.approx(1.73705e-4, abs=5e-10)
    assert s.lr[625_000] == 1e-6  # end-inclusive last step runs at the final value
    assert s.wd[0] == pytest.approx(0.04, abs=1e-15)
    assert s.wd[50_000] == pytest.approx(0.042513, abs=5e-7)
    assert s.wd[362_500] == pytest.approx(0.139895, abs=5e-7)
    assert s.wd[625_000] == 0.2
    assert s.momentum[0] == pytest.approx(0.994, abs=1e-15)
    assert s.momentum[50_000] == pytest.approx(0.994094, abs=5e-7)
    assert s.momentum[362_500] == pytest.approx(0.997746, abs=5e-7)
    assert s.momentum[625_000] == 1.0
    assert s.teacher_temp[18_750] == pytest.approx(0.055, abs=1e-6)
    assert s.teacher_temp[37_500] == 0.07 and s.teacher_temp[0] == 0.04
    assert s.last_layer_lr[1_249] == 0.0 and s.last_layer_lr[1_250] == s.lr[1_250] > 0


def test_cosine_schedule_semantics():
    sched = CosineSchedule(base=1.0, final=0.0, total_iters=10, warmup_iters=4, start_warmup_value=0.5)
    assert [sched[i] for i in range(4)] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0])  # end point included
    assert sched[4] == 1.0 and sched[9] > 0.0 and sched[10] == 0.0 and sched[10**6] == 0.0


def test_param_multipliers():
    def mult(name, chunked=False, decay=0.9):
        return param_multipliers(name, n_blocks=12, chunked=chunked, layerwise_decay=decay, patch_embed_lr_mult=0.2)

    assert mult("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.9**13 * 0.2)
    assert mult("backbone.patch_embed.proj.bias")["wd_multiplier"] == 0.0
    assert mult("backbone.pos_embed")["lr_multiplier"] == pytest.approx(0.9**13)
    assert mult("backbone.pos_embed")["wd_multiplier"] == 1.0  # tokens are decayed
    assert mult("backbone.blocks.3.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.9**9)
    assert mult("backbone.blocks.1.3.attn.qkv.weight", chunked=True)["lr_multiplier"] == pytest.approx(0.9**9)
    assert mult("backbone.blocks.3.ls1.gamma")["wd_multiplier"] == 0.0
    assert mult("backbone.blocks.3.norm1.weight")["wd_multiplier"] == 0.0
    assert mult("backbone.norm.weight")["lr_multiplier"] == 1.0
    head = mult("dino_head.last_layer.weight_g")
    assert head == {"lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": True}
    assert mult("ibot_head.mlp.0.bias") == {"lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False}


def test_groups_cover_every_trainable_parameter_once():
    from torch import nn

    from dinov2_core.models import DINOHead, build_backbone

    student = nn.ModuleDict({"backbone": build_backbone("vit_test", patch_size=8, img_size=32, block_chunks=2),
                             "dino_head": DINOHead(64, 32, hidden_dim=16, bottleneck_dim=8)})
    groups = build_param_groups(student.named_parameters(), 4, True, 0.9, 0.2)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in student.named_parameters())
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))
