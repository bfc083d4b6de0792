"""Exports load into the real libraries (official dinov2, timm, transformers) and give our backbone's outputs.

Each library builds the model from the call the export prints / records; cls and patch tokens are compared
at the exported image size, where no library resizes position embeddings (tolerance 1e-4).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dinov2_core.models import build_backbone
from dinov2_core.models.checkpoint_io import (
    export_backbone_dir,
    load_backbone,
    to_official_state_dict,
    unchunk_state_dict,
)
from dinov2_core.models.export_formats import (
    ExportError,
    complete_state_dict,
    export,
    load_training_state,
    read_export_source,
    to_timm_state_dict,
)

TOL = 1e-4
REG = {"interpolate_antialias": True, "interpolate_offset": 0.0}


def trained_like(arch="vit_test", **kwargs):
    """A backbone with non-trivial weights everywhere (LayerScale, tokens, pos_embed) and chunked training keys."""
    torch.manual_seed(0)
    model = build_backbone(arch, **{"patch_size": 14, "img_size": 28, "init_values": 1e-5, "block_chunks": 2,
                                    **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def features(model, x):
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def assert_close(ours, cls, patches):
    assert cls.shape == ours[0].shape and patches.shape == ours[1].shape
    assert (cls - ours[0]).abs().max() <= TOL
    assert (patches - ours[1]).abs().max() <= TOL


def exported(tmp_path, model, formats, **kwargs):
    export_backbone_dir(model, tmp_path / "src")
    return export(tmp_path / "src", tmp_path / "out", formats, **kwargs)


def check_timm(model, info, directory, x):
    timm = pytest.importorskip("timm")
    # the recorded call: create_model loads checkpoint_path with strict=True
    built = timm.create_model(info["timm_model"], pretrained=False, checkpoint_path=str(directory / info["weights"]),
                              **info["timm_kwargs"]).eval()
    with torch.no_grad():
        tokens = built.forward_features(x)
    registers = model.num_register_tokens
    assert_close(features(model, x), tokens[:, 0], tokens[:, 1 + registers:])
    return built


def check_hf(model, directory, x):
    transformers = pytest.importorskip("transformers")
    cls = transformers.Dinov2WithRegistersModel if model.num_register_tokens else transformers.Dinov2Model
    loaded, loading = cls.from_pretrained(str(directory), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"], loading
    with torch.no_grad():
        tokens = loaded.eval()(pixel_values=x).last_hidden_state
    assert_close(features(model, x), tokens[:, 0], tokens[:, 1 + model.num_register_tokens:])


@pytest.mark.parametrize("kwargs", [{}, {"num_register_tokens": 4, **REG},
                                    {"num_register_tokens": 2, "ffn_layer": "swiglufused", **REG}],
                         ids=["plain", "reg4", "reg2-swiglu"])
def test_vit_test_exports_match_in_timm_transformers_and_hub(tmp_path, kwargs):
    model = trained_like(**kwargs)
    results = exported(tmp_path, model, ["hub", "timm", "hf"])
    x = torch.randn(2, 3, 28, 28)
    timm_model = check_timm(model, results["timm"], tmp_path / "out" / "timm", x)
    check_hf(model, tmp_path / "out" / "hf", x)
    # our conversion equals timm's own dinov2 filter applied to the hub-format state at the same grid
    from timm.models.vision_transformer import checkpoint_filter_fn

    theirs = checkpoint_filter_fn(complete_state_dict(to_official_state_dict(model)), timm_model)
    ours = to_timm_state_dict(complete_state_dict(to_official_state_dict(model)))
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    # hub: 518-px grid; it reproduces the model at 518 px, where the model resizes its own pos_embed
    hub = torch.load(tmp_path / "out" / "hub" / "backbone.pth", weights_only=True)
    assert hub["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    info = json.loads((tmp_path / "out" / "hub" / "export_info.json").read_text())
    assert info["official_builder"] is None and "DinoVisionTransformer(" in info["load"]
    x518 = torch.randn(1, 3, 518, 518)
    reloaded = load_backbone(tmp_path / "out" / "hub")
    cls, patches = features(reloaded, x518)
    assert_close(features(model, x518), cls, patches)


@pytest.mark.parametrize("registers", [0, 4], ids=["plain", "reg4"])
def test_vit_small_exports_and_hub_builder_layout(tmp_path, registers):
    model = trained_like("vit_small", num_register_tokens=registers, **(REG if registers else {}))
    results = exported(tmp_path, model, ["hub", "timm", "hf"])
    x = torch.randn(1, 3, 28, 28)
    check_timm(model, results["timm"], tmp_path / "out" / "timm", x)
    check_hf(model, tmp_path / "out" / "hf", x)
    reg = "_reg4" if registers else ""
    assert results["timm"]["timm_model"] == f"vit_small_patch14{reg}_dinov2"
    assert results["timm"]["timm_kwargs"] == {"img_size": 28, "num_classes": 0}
    builder = "dinov2_vits14_reg" if registers else "dinov2_vits14"
    assert results["hub"]["official_builder"] == builder and f"'{builder}', pretrained=False" in results["hub"]["load"]
    # the hub builder's model (vit_small, img_size=518, patch 14, init_values=1.0, block_chunks=0 + registers)
    # takes the file strictly, unchanged
    hub_state = torch.load(tmp_path / "out" / "hub" / "backbone.pth", weights_only=True)
    with torch.device("meta"):
        builder_model = build_backbone("vit_small", patch_size=14, img_size=518, init_values=1.0, block_chunks=0,
                                       num_register_tokens=registers, **(REG if registers else {}))
    assert {k: v.shape for k, v in builder_model.state_dict().items()} == {k: v.shape for k, v in hub_state.items()}
    # a requested grid keeps the builder, with its img_size argument
    again = export(tmp_path / "src", tmp_path / "again", ["hub"], img_size=224)["hub"]
    assert again["official_builder"] == builder and "pretrained=False, img_size=224); model.load" in again["load"]


@pytest.mark.parametrize("arch,ffn_layer", [("vit_base", "mlp"), ("vit_large", "mlp"), ("vit_giant2", "swiglufused")])
@pytest.mark.parametrize("registers", [0, 4])
def test_timm_names_and_keys_fit_the_released_sizes(arch, ffn_layer, registers):
    """Shapes only (meta device): our timm keys equal those of the named timm model, ViT-g packed SwiGLU included."""
    timm = pytest.importorskip("timm")
    from dinov2_core.models.export_formats import backbone_layout, timm_model_args

    with torch.device("meta"):
        ours = build_backbone(arch, patch_size=14, img_size=518, init_values=1.0, block_chunks=0, ffn_layer=ffn_layer,
                              num_register_tokens=registers, **(REG if registers else {}))
        name, kwargs = timm_model_args(backbone_layout(ours), 518)
        theirs = timm.create_model(name, pretrained=False, **kwargs)
    assert kwargs == {"img_size": 518, "num_classes": 0}
    converted = to_timm_state_dict(complete_state_dict(unchunk_state_dict(ours.state_dict())))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.official
def test_official_hub_builder_loads_vit_small_export(tmp_path):
    """What ``dinov2_vits14(pretrained=False)`` builds (its exact kwargs; the installed release has no dinov2.hub)
    loads the file with the default strict=True and equals our backbone at 518 px."""
    official = pytest.importorskip("dinov2.models.vision_transformer")
    model = trained_like("vit_small")
    exported(tmp_path, model, ["hub"])
    theirs = official.vit_small(img_size=518, patch_size=14, init_values=1.0, ffn_layer="mlp", block_chunks=0).eval()
    theirs.load_state_dict(torch.load(tmp_path / "out" / "hub" / "backbone.pth", weights_only=True))
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        out = theirs.forward_features(x)
    assert_close(features(model, x), out["x_norm_clstoken"], out["x_norm_patchtokens"])


@pytest.mark.official
def test_official_class_loads_tiny_export_without_layerscale_or_biases(tmp_path):
    """No official builder for vit_test: the recorded official kwargs build the official class, which loads the
    completed file (LayerScale 1 and zero biases added) and gives the same tokens."""
    official = pytest.importorskip("dinov2.models.vision_transformer")
    model = trained_like(patch_size=8, img_size=32, init_values=None, qkv_bias=False, proj_bias=False,
                         ffn_bias=False)
    results = exported(tmp_path, model, ["hub"])
    info = results["hub"]
    assert info["img_size"] == 32 and info["official_builder"] is None  # patch 8: the training grid is kept
    theirs = official.DinoVisionTransformer(**info["official_kwargs"]).eval()
    theirs.load_state_dict(torch.load(tmp_path / "out" / "hub" / "backbone.pth", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs.forward_features(x)
    assert_close(features(model, x), out["x_norm_clstoken"], out["x_norm_patchtokens"])


def test_torch_weights_fallback_loads_in_timm_and_transformers(tmp_path):
    model = trained_like(num_register_tokens=4, **REG)
    results = exported(tmp_path, model, ["timm", "hf"], weights_format="torch", img_size=42)
    assert sorted(os.listdir(tmp_path / "out" / "hf")) == ["config.json", "export_info.json", "pytorch_model.bin"]
    assert results["timm"]["load"].endswith("model.pth', img_size=42, num_classes=0, embed_dim=64, depth=4, "
                                            "num_heads=2)")
    x = torch.randn(1, 3, 42, 42)  # the requested grid: pos_embed resized once, as our model does at 42 px
    check_timm(model, results["timm"], tmp_path / "out" / "timm", x)
    check_hf(model, tmp_path / "out" / "hf", x)


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """A real 2-iteration tiny pretraining run: DCP checkpoints, config.yaml and export/."""
    from dinov2_core.data.synthetic import make_classification_dataset
    from dinov2_core.train import load_train_config, run_training

    root = tmp_path_factory.mktemp("export_run")
    data = make_classification_dataset(root / "data", num_classes=2, images_per_class=4, image_size=32, seed=0)
    cfg = load_train_config("configs/train/tiny_pretrain.yaml", [
        f"train.dataset={data.manifest_uri}", "optim.epochs=1", "train.official_epoch_length=2", "checkpoint.period=2",
        "train.batch_size_per_gpu=4", "optim.warmup_epochs=0"])
    run_training(cfg, root / "out")
    return root / "out"


def test_full_training_state_from_dcp_checkpoint(training_run, tmp_path):
    results = export(training_run, tmp_path / "exports", ["full", "hf"])
    assert results["full"]["source"].endswith("checkpoints/00000002") and results["full"]["iteration"] == 2
    state = load_training_state(tmp_path / "exports" / "full")
    assert state.spec["modules"] == {side: ["backbone", "dino_head", "ibot_head"] for side in ("student", "teacher")}
    assert "dino_loss.center" in state.spec["other_tensors"]
    assert state.spec["backbone"]["kwargs"]["block_chunks"] == 0 and state.spec["config"]["phase"] == "pretrain"
    teacher, student = state.modules("teacher"), state.modules("student")
    published = load_backbone(training_run / "export")  # the run's own export = teacher of the last checkpoint
    heads = torch.load(training_run / "export" / "heads.pth", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher["backbone"](x), published(x))
        assert not torch.equal(student["backbone"](x), published(x))
    for name in ("dino_head", "ibot_head"):
        assert all(torch.equal(v, teacher[name].state_dict()[k]) for k, v in heads[name].items())
    check_hf(published, tmp_path / "exports" / "hf", x)  # backbone formats come from the same checkpoint
    with pytest.raises(KeyError, match="allowed: \\['student.backbone'"):
        state.state_dict("model_ema", "backbone")
    # without safetensors: the same tensors in a torch.save file, read back weights-only
    export(training_run, tmp_path / "torch", ["full"], weights_format="torch")
    assert (tmp_path / "torch" / "full" / "training_state.pth").exists()
    again = load_training_state(tmp_path / "torch" / "full")
    assert again.tensors.keys() == state.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in state.tensors.items())


def test_full_training_state_of_a_distillation_keeps_each_sides_architecture(training_run, tmp_path):
    """Distilling, the checkpoint holds the frozen teacher (here MLP), the student and its EMA (SwiGLU)."""
    from dinov2_core.train import load_train_config, run_training

    dataset = load_train_config(str(training_run / "config.yaml")).train.dataset
    cfg = load_train_config("configs/train/tiny_distill.yaml", [
        f"train.dataset={dataset}", f"distill.teacher_path={training_run}",
        "student.ffn_layer=swiglufused", "optim.epochs=1", "train.official_epoch_length=2", "checkpoint.period=2",
        "train.batch_size_per_gpu=4", "optim.warmup_epochs=0"])
    run_training(cfg, tmp_path / "distill")
    results = export(tmp_path / "distill", tmp_path / "exports", ["full", "hub"])
    state = load_training_state(tmp_path / "exports" / "full")
    assert state.sides == ["model_ema", "student", "teacher"] and state.spec["exported_side"] == "model_ema"
    assert state.spec["backbones"]["teacher"]["kwargs"]["ffn_layer"] == "mlp"
    assert state.spec["backbones"]["student"]["kwargs"]["ffn_layer"] == "swiglufused"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(state.modules("teacher")["backbone"](x), load_backbone(training_run / "export")(x))
        published = load_backbone(tmp_path / "distill" / "export")  # the student's EMA
        assert torch.equal(state.modules("model_ema")["backbone"](x), published(x))
        assert torch.equal(load_backbone(tmp_path / "exports" / "hub")(x), published(x))
    assert results["hub"]["official_kwargs"]["ffn_layer"] == "swiglufused"


def test_cli_export_prints_the_load_calls_and_rejects_bad_input(training_run, tmp_path, capsys):
    from dinov2_pipeline.cli import main

    out = tmp_path / "exports"
    assert main(["export", str(training_run / "export"), "--to", "all", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full: skipped" in printed
    for line in ("hub: model = dinov2.models.vision_transformer.DinoVisionTransformer(img_size=32, patch_size=8",
                 f"timm: model = timm.create_model('vit_small_patch14_dinov2', pretrained=False, "
                 f"checkpoint_path='{out}/timm/model.safetensors', img_size=32",
                 f"hf: model = transformers.Dinov2Model.from_pretrained('{out}/hf')"):
        assert line in printed
    assert sorted(p for p in os.listdir(out)) == ["hf", "hub", "timm"]  # no temporary directories left
    assert main(["export", str(training_run / "export"), "--to", "hub", "--out", str(out)]) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["export", str(training_run / "export"), "--to", "full", "--out", str(out)]) == 2
    assert "Allowed formats for it: ['hub', 'timm', 'hf']" in capsys.readouterr().err
    assert main(["export", str(training_run), "--to", "hub", "--out", str(out), "--overwrite", "--img-size", "36"]) == 2
    assert "img_size=36 must be a positive multiple of the patch size 8" in capsys.readouterr().err


def test_bad_sources_and_formats_name_the_allowed_values(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        read_export_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither an export directory"):
        read_export_source(tmp_path / "empty")
    export_backbone_dir(trained_like(ffn_layer="identity"), tmp_path / "src")
    with pytest.raises(ExportError, match=r"formats \['onnx'\]: allowed: \['hub', 'timm', 'hf', 'full'\]"):
        export(tmp_path / "src", tmp_path / "out", ["onnx"])
    with pytest.raises(ExportError, match="ffn_layer='identity' has no timm equivalent"):
        export(tmp_path / "src", tmp_path / "out", ["timm"])
    with pytest.raises(ExportError, match="weights_format='zip'; allowed"):
        export(tmp_path / "src", tmp_path / "out", ["hf"], weights_format="zip")
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # temporaries removed
    (tmp_path / "half-saved").mkdir()
    (tmp_path / "half-saved" / ".metadata").write_bytes(b"")
    with pytest.raises(ExportError, match="incomplete DCP checkpoint"):
        read_export_source(tmp_path / "half-saved")
