"""Each phase runs a few real steps on CPU and publishes a strictly loadable export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dinov2_core.models.checkpoint_io import load_backbone
from dinov2_core.train import load_train_config, run_training
from dinov2_core.train.metrics import read_metrics
from dinov2_core.train.nan_guard import NanGuard, TrainingDivergedError
from dinov2_core.utils.config import ConfigError

TINY = "configs/train/tiny_pretrain.yaml"


def test_pretrain_outputs_and_learning(pretrain_run, tiny_dataset):
    output, summary = pretrain_run
    rows = read_metrics(output)
    assert [r["iteration"] for r in rows] == list(range(13))  # 0 … max_iter inclusive
    for key in ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss", "lr",
                "wd", "momentum", "teacher_temp", "images_per_s", "peak_mem_mb", "skipped_images", "dino_target_entropy"):
        assert key in rows[0]
    assert all(0.0 < r["dino_target_entropy"] <= 1.0 for r in rows)
    first = sum(r["total_loss"] for r in rows[:3]) / 3
    last = sum(r["total_loss"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert (output / "config.yaml").exists()
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["00000011", "00000012"]  # keep_last 2
    assert all((output / "checkpoints" / n / ".complete").exists() for n in ("00000011", "00000012"))
    backbone = load_backbone(str(output / "export"))  # strict
    spec = json.loads((output / "export" / "model.json").read_text())
    assert spec["arch"] == "vit_test" and spec["kwargs"]["img_size"] == 32
    official = torch.load(output / "export" / "backbone.pth", weights_only=True)
    assert "blocks.0.attn.qkv.weight" in official and not any(k.startswith("backbone.") for k in official)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    heads = torch.load(output / "export" / "heads.pth", weights_only=True)
    assert set(heads) == {"dino_head", "ibot_head", "config"}
    assert summary["iteration"] == 12 and summary["skipped_images"] == 0


def test_corrupt_images_are_counted(tmp_path):
    from dinov2_core.data.synthetic import make_classification_dataset

    data = make_classification_dataset(tmp_path / "data", num_classes=2, images_per_class=6, image_size=32,
                                       corrupt_images=3)
    cfg = load_train_config(TINY, [f"train.dataset={data.manifest_uri}", "optim.epochs=1",
                                   "train.official_epoch_length=4"])
    summary = run_training(cfg, tmp_path / "out")
    rows = read_metrics(tmp_path / "out")
    assert summary["skipped_images"] > 0
    assert rows[-1]["skipped_images"] == summary["skipped_images"]


def test_highres_from_pretrain(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    cfg = load_train_config("configs/train/tiny_highres.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}", f"init_from={output}",
                             "optim.epochs=1", "train.official_epoch_length=2"])
    run_training(cfg, tmp_path / "hr")
    exported = load_backbone(str(tmp_path / "hr" / "export"))
    assert exported.pos_embed.shape == (1, 1 + 6 * 6, 64)  # 48 px / patch 8, interpolated once from 4x4
    assert exported(torch.randn(1, 3, 48, 48)).shape == (1, 64)
    assert len(read_metrics(tmp_path / "hr")) == 3


def test_highres_from_export_dir(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    cfg = load_train_config("configs/train/tiny_highres.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}", f"init_from={output / 'export'}",
                             "optim.epochs=1", "train.official_epoch_length=1"])
    summary = run_training(cfg, tmp_path / "hr")
    assert summary["iteration"] == 1


def test_distill_from_pretrain(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    cfg = load_train_config("configs/train/tiny_distill.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}", f"distill.teacher_path={output}",
                             "optim.epochs=1", "train.official_epoch_length=3", "checkpoint.period=2"])
    summary = run_training(cfg, tmp_path / "distill")
    # Resume from iteration 1 (the mask token never gets a gradient when distilling: no AdamW state for it).
    shutil.rmtree(tmp_path / "distill" / "checkpoints" / "00000003")
    resumed = run_training(cfg, tmp_path / "distill")
    assert resumed["last_metrics"]["total_loss"] == summary["last_metrics"]["total_loss"]
    teacher = load_backbone(str(output / "export"))
    student_ema = load_backbone(str(tmp_path / "distill" / "export"))
    assert summary["iteration"] == 3
    # The exported model is the student's EMA, not the (frozen) teacher.
    assert not torch.equal(teacher.state_dict()["blocks.0.attn.qkv.weight"],
                           student_ema.state_dict()["blocks.0.attn.qkv.weight"])


def test_distill_rejects_teacher_without_heads(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    hub_like = tmp_path / "hub"
    hub_like.mkdir()
    for name in ("backbone.pth", "model.json"):
        (hub_like / name).write_bytes((output / "export" / name).read_bytes())
    cfg = load_train_config("configs/train/tiny_distill.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}", f"distill.teacher_path={hub_like}"])
    with pytest.raises(ConfigError, match="has no heads.pth"):
        run_training(cfg, tmp_path / "distill")
    cfg = load_train_config("configs/train/tiny_distill.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}",
                             f"distill.teacher_path={output / 'export' / 'backbone.pth'}"])
    with pytest.raises(ConfigError, match="hub .pth files hold no DINO/iBOT heads"):
        run_training(cfg, tmp_path / "distill2")


def test_nan_guard_skips_restores_then_stops():
    guard = NanGuard(max_consecutive_bad_steps=1, max_restores=1)
    assert guard.observe(0, {"total_loss": 1.0}, can_restore=lambda: True) == "ok"
    assert guard.observe(1, {"total_loss": float("nan")}, can_restore=lambda: True) == "skip"
    assert guard.observe(2, {"total_loss": float("nan")}, can_restore=lambda: True) == "restore"
    assert guard.observe(3, {"ibot_loss": float("inf"), "total_loss": float("inf")}, can_restore=lambda: True) == "skip"
    with pytest.raises(TrainingDivergedError, match=r"iteration 4: ibot_loss=inf.*lower optim.base_lr"):
        guard.observe(4, {"ibot_loss": float("inf"), "total_loss": float("inf")}, can_restore=lambda: True)


def test_divergence_is_skipped_restored_then_reported(tiny_dataset, tmp_path):
    cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}", "optim.base_lr=1e30",
                                   "checkpoint.period=1", "nan_guard.max_consecutive_bad_steps=1",
                                   "nan_guard.max_restores=1"])
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at iteration \d+: .*total_loss=nan.*1 restore"):
        run_training(cfg, tmp_path / "out")
    rows = read_metrics(tmp_path / "out")
    assert rows[0]["applied"] and not rows[-1]["applied"]
    complete = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert all(rows[int(name)]["applied"] for name in complete)  # never checkpoint a bad step


def test_activation_checkpointing_gives_the_same_losses(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}", "parallel.activation_checkpointing=true"])
    run_training(cfg, tmp_path / "ac")
    for plain, recomputed in zip(read_metrics(output), read_metrics(tmp_path / "ac")):
        assert recomputed["total_loss"] == pytest.approx(plain["total_loss"], rel=1e-5)


def test_export_on_demand_from_checkpoint(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    copy = tmp_path / "run"
    shutil.copytree(output, copy)
    shutil.rmtree(copy / "export")
    from dinov2_core.train import export_from_checkpoint

    cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}"])
    export_from_checkpoint(cfg, copy)  # newest complete checkpoint = the final state
    original = torch.load(output / "export" / "backbone.pth", weights_only=True)
    again = torch.load(copy / "export" / "backbone.pth", weights_only=True)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_highres_from_hub_style_pth_trains_fresh_heads(pretrain_run, tiny_dataset, tmp_path):
    output, _ = pretrain_run
    cfg = load_train_config("configs/train/tiny_highres.yaml",
                            [f"train.dataset={tiny_dataset.manifest_uri}",
                             f"init_from={output / 'export' / 'backbone.pth'}",
                             "optim.epochs=1", "train.official_epoch_length=1"])
    run_training(cfg, tmp_path / "hr")
    heads = torch.load(tmp_path / "hr" / "export" / "heads.pth", weights_only=True)
    assert set(heads) == {"dino_head", "ibot_head", "config"}  # usable as a distillation teacher now
