"""``run_evaluation`` and ``dinov2-pipeline eval`` end to end on generated data."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from dinov2_core.data.manifest import read_manifest, write_manifest
from dinov2_core.eval import EvalConfig, run_evaluation
from dinov2_core.utils.config import ConfigError, from_dict, load_config
from dinov2_pipeline.cli import main
from tests.eval.conftest import OneHotOracle

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "eval", "tiny.yaml")


def test_oracle_backbone_scores_100_percent_everywhere(colour_data, tmp_path):
    cfg = from_dict(EvalConfig, {
        "train": colour_data["train"], "test": colour_data["test"], "evals": ["knn", "linear", "logreg", "retrieval"],
        "image": {"resize_size": 16, "crop_size": 16}, "knn": {"ks": [5, 10]},
        "linear": {"iterations": 60, "batch_size": 16}, "logreg": {"num_c": 5, "max_iter": 100, "tol": 1e-8},
    })
    result = run_evaluation(cfg, tmp_path, model=OneHotOracle(), title="oracle")
    metrics = result["metrics"]
    for key in ("knn.top1.k5", "knn.top1.k10", "linear.top1", "logreg.top1", "retrieval.recall@1"):
        assert metrics[key] == 1.0, key
    assert metrics["retrieval.map"] == pytest.approx(1.0)
    assert metrics["data.train.images"] == 36 and metrics["data.test.images"] == 15
    assert "baseline_random.knn.top1.k5" not in metrics  # no spec for an in-memory oracle
    assert "baseline_pixels.knn.top1.k5" in metrics
    assert "| oracle | 100.0 | 100.0 |" in result["table"]


def test_vit_test_export_end_to_end_writes_every_output(synthetic_data, tmp_path):
    from dinov2_core.models import build_backbone
    from dinov2_core.models.checkpoint_io import export_backbone_dir

    export = export_backbone_dir(build_backbone("vit_test", patch_size=8, img_size=32), str(tmp_path / "export"))
    # two corrupt test images must be skipped and counted, never crash the run
    test_records = read_manifest(synthetic_data["test"].manifest_uri)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "cut.png").write_bytes(open(test_records[0].uri, "rb").read()[:40])
    test_manifest = str(tmp_path / "test.jsonl")
    write_manifest([*test_records, {"uri": str(tmp_path / "bad.png"), "label": test_records[0].label},
                    {"uri": str(tmp_path / "cut.png"), "label": test_records[0].label}], test_manifest)
    cfg = load_config(EvalConfig, TINY, [
        f"backbone={export}", f"train={synthetic_data['train'].root}", f"test={test_manifest}",
        f"dense.data={synthetic_data['seg'].manifest_uri}", "evals=[knn,linear,logreg,retrieval,dense,pca]",
        "linear.iterations=30", "logreg.num_c=3", "dense.iterations=30", "pca.num_images=2",
    ])
    out = tmp_path / "eval"
    result = run_evaluation(cfg, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == pytest.approx(result["metrics"])
    assert metrics["data.test.skipped"] == 2 and metrics["data.test.images"] == len(test_records)
    for prefix in ("", "baseline_random."):
        for key in ("knn.top1.k20", "knn.top5.k200", "linear.top1", "logreg.top1", "retrieval.map",
                    "retrieval.recall@10", "dense.miou"):
            assert 0.0 <= metrics[prefix + key] <= 1.0, prefix + key
    assert "baseline_pixels.knn.top1.k20" in metrics and "baseline_pixels.linear.top1" not in metrics
    report = (out / "report.md").read_text()
    assert "| random init |" in report and "| raw pixels |" in report and "test: 24 images, 2 skipped" in report
    with Image.open(out / "pca_maps.png") as figure:  # 2 rows: crop and map, 224 px panels under title strips
        assert figure.size == (472, 496)
    lines = [l for l in (out / "decontamination.txt").read_text().splitlines() if not l.startswith("#")]
    expected = synthetic_data["train"].num_images + len(test_records) + 2 + synthetic_data["seg"].num_images
    assert len(lines) == expected
    assert sum(l.startswith("-\t") for l in lines) == 2  # undecodable images are listed without a hash
    assert len(read_manifest(str(out / "eval_manifest.jsonl"))) == expected


def test_invalid_configs_are_rejected_with_the_key_and_allowed_values(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match=r"evals\[1\].*'knm'.*'knn'"):
        from_dict(EvalConfig, {"backbone": "x", "train": "a", "test": "b", "evals": ["knn", "knm"]})
    with pytest.raises(ConfigError, match="image.interpolation"):
        from_dict(EvalConfig, {"backbone": "x", "train": "a", "test": "b", "image": {"interpolation": "cubic"}})
    with pytest.raises(ConfigError, match="dense.data"):
        from_dict(EvalConfig, {"backbone": "x", "train": "a", "test": "b", "evals": ["dense"]})
    with pytest.raises(ConfigError, match="arch"):
        from_dict(EvalConfig, {"random_init": True, "train": "a", "test": "b"})
    cfg = from_dict(EvalConfig, {"arch": "vit_test", "random_init": True, "backbone_kwargs": {"patch_size": 8},
                                 "train": synthetic_data["train"].root, "test": synthetic_data["test"].root,
                                 "image": {"resize_size": 36, "crop_size": 36}})
    with pytest.raises(ConfigError, match="image.crop_size: 36 is not a multiple of the patch size 8"):
        run_evaluation(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_cli_random_init_run_prints_the_table(synthetic_data, tmp_path, capsys):
    code = main([
        "eval", "--arch", "vit_test", "--random-init", "--train", synthetic_data["train"].manifest_uri,
        "--test", synthetic_data["test"].root, "--config", TINY, "--output-dir", str(tmp_path),
        "evals=[knn,retrieval]", "backbone_kwargs={patch_size: 8}",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| vit_test (random init) |" in printed and "| raw pixels |" in printed
    assert "random init |" not in printed.replace("vit_test (random init) |", "")  # no duplicate row
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "report.md").exists()
    assert main(["eval", "--output-dir", str(tmp_path / "x"), "--train", "a", "--test", "b", "knn.ks=[0]"]) == 2


def test_retrieval_of_planted_near_duplicates_by_group_column(synthetic_data, tmp_path):
    import numpy as np

    originals = read_manifest(synthetic_data["train"].manifest_uri)[::4]
    rng = np.random.default_rng(0)
    queries = []
    for i, record in enumerate(originals[:10]):
        pixels = np.asarray(Image.open(record.uri), dtype=np.float32) + rng.normal(0, 4, (32, 32, 3))
        path = tmp_path / f"dup_{i}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        queries.append({"uri": str(path), "group": f"g{i}"})
    gallery = [{"uri": r.uri, "group": f"g{i}"} for i, r in enumerate(originals)]
    write_manifest(queries, str(tmp_path / "query.jsonl"))
    write_manifest(gallery, str(tmp_path / "gallery.jsonl"))
    cfg = load_config(EvalConfig, TINY, [
        "arch=vit_test", "random_init=true", "backbone_kwargs={patch_size: 8}", "evals=[retrieval]",
        f"retrieval.query={tmp_path / 'query.jsonl'}", f"retrieval.gallery={tmp_path / 'gallery.jsonl'}",
        "retrieval.group_column=group",
    ])
    metrics = run_evaluation(cfg, tmp_path / "out")["metrics"]
    assert metrics["retrieval.num_queries"] == 10 and metrics["baseline_pixels.retrieval.num_queries"] == 10
    assert metrics["baseline_pixels.retrieval.recall@1"] == 1.0
    assert metrics["baseline_pixels.retrieval.map"] == pytest.approx(1.0)
    assert 0.0 < metrics["retrieval.map"] <= 1.0
    bad = load_config(EvalConfig, TINY, [
        "arch=vit_test", "random_init=true", "backbone_kwargs={patch_size: 8}", "evals=[retrieval]",
        f"retrieval.query={tmp_path / 'query.jsonl'}", f"retrieval.gallery={tmp_path / 'gallery.jsonl'}",
        "retrieval.group_column=instance",
    ])
    with pytest.raises(ConfigError, match="retrieval.group_column.*instance"):
        run_evaluation(bad, tmp_path / "bad")
