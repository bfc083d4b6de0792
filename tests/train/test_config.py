"""Invalid training configs are rejected before anything runs, naming the key and what is allowed."""

from __future__ import annotations

import pytest

from dinov2_core.train.config import load_train_config
from dinov2_core.utils.config import ConfigError

TINY = "configs/train/tiny_pretrain.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["train.centering=sinkorn"], "train.centering: 'sinkorn' is not one of ['centering', 'sinkhorn_knopp']"),
    (["crops.global_crops_size=30"], "crops.global_crops_size: 30 is not a multiple of student.patch_size=8"),
    (["crops.local_crops_size=20"], "crops.local_crops_size: 20 is not a multiple"),
    (["train.batch_size_per_gpu=1"], "train.batch_size_per_gpu: 1 is too small"),
    (["student.arch=vit_huge"], "student.arch: 'vit_huge' is not one of"),
    (["optim.scaling_rule=cubic"], "optim.scaling_rule"),
    (["ibot.separate_head=false"], "ibot.head_n_prototypes: 48 differs from dino.head_n_prototypes=64"),
    (["optim.lr=0.1"], "optim.lr: unknown key"),
    (["phase=highres"], "init_from: required when phase='highres'"),
    (["phase=distill"], "distill.teacher_path: required"),
    (["crops.blur_mode=fixed"], "crops.blur_mode: 'fixed' is not one of ['released', 'configured', 'none']"),
])
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_train_config(TINY, ["train.dataset=x.txt", *overrides])
    assert message in str(err.value)


def test_dataset_is_required():
    with pytest.raises(ConfigError, match="train.dataset: required"):
        load_train_config(TINY)


def test_batch_one_is_fine_without_koleo():
    cfg = load_train_config(TINY, ["train.dataset=x.txt", "train.batch_size_per_gpu=1", "dino.koleo_loss_weight=0"])
    assert cfg.train.batch_size_per_gpu == 1


def test_paper_recipes():
    for name, arch, batch in (("vitl14", "vit_large", 32), ("vitg14", "vit_giant2", 12)):
        cfg = load_train_config(f"configs/train/{name}.yaml", ["train.dataset=x.txt"])
        assert (cfg.max_iter, cfg.student.arch, cfg.train.batch_size_per_gpu) == (625_000, arch, batch)
        assert cfg.train.centering == "sinkhorn_knopp" and cfg.ibot.separate_head
        assert (cfg.dino.head_n_prototypes, cfg.dino.head_bottleneck_dim, cfg.crops.local_crops_size) == (131072, 384, 98)
        assert (cfg.optim.base_lr, cfg.optim.warmup_epochs, cfg.student.drop_path_rate) == (2e-4, 80, 0.4)
    highres = load_train_config("configs/train/vitl14_highres.yaml", ["train.dataset=x.txt", "init_from=run"])
    assert (highres.crops.global_crops_size, highres.max_iter) == (518, 10_000)
