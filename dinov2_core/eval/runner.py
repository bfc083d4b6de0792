"""``run_evaluation``: every configured protocol on one backbone plus its baselines, written to a directory.

Steps: validate the config → load the backbone (or build a random one) → list the evaluation images →
for each model (backbone, random init of the same spec, raw pixels) extract frozen features once per
image set and run kNN / linear / logistic regression / retrieval / dense probe → PCA maps for the
backbone → write ``metrics.json``, ``details.json``, ``report.md``, ``pca_*.png``, and
``eval_manifest.jsonl`` + ``decontamination.txt`` (every evaluation image's URI and SHA-256: a record of
what was evaluated on; the pipeline decontaminates earlier, in dedup, from embeddings of the test set). Every output is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, get_args

import torch
from torch import nn

from dinov2_core.data.manifest import write_manifest
from dinov2_core.eval.baselines import pixel_baseline, random_init_backbone
from dinov2_core.eval.config import EvalConfig, EvalName
from dinov2_core.eval.datasets import (
    LabelledImages,
    encode_labels,
    load_labelled_images,
    sample,
    split_indices,
)
from dinov2_core.eval.dense import dense_probe
from dinov2_core.eval.features import (
    BackboneFeatures,
    FeatureSet,
    ImageListDataset,
    eval_transform,
    extract_features,
    resolve_device,
)
from dinov2_core.eval.knn import knn_evaluate
from dinov2_core.eval.linear import train_linear_grid
from dinov2_core.eval.logreg import logreg_evaluate
from dinov2_core.eval.pca_maps import write_pca_maps
from dinov2_core.eval.report import markdown_table, report_markdown
from dinov2_core.eval.retrieval import retrieval_metrics
from dinov2_core.utils.atomic import atomic_write_json, atomic_write_text
from dinov2_core.utils.config import ConfigError, to_dict
from dinov2_core.utils.uri import join_uri

METRICS_FILE = "metrics.json"
DETAILS_FILE = "details.json"
REPORT_FILE = "report.md"
EVAL_MANIFEST_FILE = "eval_manifest.jsonl"
DECONTAMINATION_FILE = "decontamination.txt"


def validate_eval_config(cfg: EvalConfig) -> None:
    """Run every section's ``validate`` (a config built in Python skips ``from_dict``'s checks)."""
    for section in [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg))]:
        if dataclasses.is_dataclass(section) and callable(getattr(section, "validate", None)):
            section.validate()
    bad = [e for e in cfg.enabled_evals if e not in get_args(EvalName)]
    if bad:
        raise ConfigError(f"evals: {bad[0]!r} is not one of {list(get_args(EvalName))}")


def load_eval_backbone(cfg: EvalConfig) -> tuple[nn.Module, dict[str, Any] | None, str]:
    """(model, spec, display name) for ``cfg.backbone`` or ``cfg.arch`` at random init."""
    from dinov2_core.models import backbone_spec, build_backbone
    from dinov2_core.models.checkpoint_io import load_backbone

    if cfg.backbone is None and not cfg.random_init:
        raise ConfigError("backbone: required (export dir or .pth), unless arch is set with random_init: true")
    if cfg.backbone is not None:
        model = load_backbone(cfg.backbone)
        name = "/".join(os.fspath(cfg.backbone).rstrip("/").split("/")[-2:])
        return model.eval(), backbone_spec(model), name
    spec = {"arch": cfg.arch, "kwargs": dict(cfg.backbone_kwargs)}
    try:
        build_backbone(cfg.arch, **cfg.backbone_kwargs)
    except ValueError as err:
        raise ConfigError(f"arch / backbone_kwargs: {err}") from err
    return random_init_backbone(spec, cfg.seed), spec, f"{cfg.arch} (random init)"


@dataclasses.dataclass
class EvalData:
    train: LabelledImages | None
    test: LabelledImages | None
    query: LabelledImages | None
    gallery: LabelledImages | None
    dense: LabelledImages | None


def load_eval_data(cfg: EvalConfig) -> EvalData:
    wants = set(cfg.enabled_evals)
    needs_classification = bool(wants & {"knn", "linear", "logreg"}) or (
        "retrieval" in wants and cfg.retrieval.query is None
    )
    train = test = query = gallery = dense = None
    if needs_classification or ("pca" in wants and cfg.test):
        test = sample(load_labelled_images(cfg.test, require_labels=needs_classification), cfg.max_test_images, cfg.seed)
    if needs_classification:
        train = sample(load_labelled_images(cfg.train), cfg.max_train_images, cfg.seed)
    if "retrieval" in wants and cfg.retrieval.query is not None:
        query = load_labelled_images(cfg.retrieval.query, require_labels=False)
        gallery = load_labelled_images(cfg.retrieval.gallery, require_labels=False)
        for name, data in (("query", query), ("gallery", gallery)):
            try:
                data.column(cfg.retrieval.group_column)
            except KeyError as err:
                raise ConfigError(f"retrieval.group_column: {err.args[0]} in retrieval.{name}") from err
    if "dense" in wants or ("pca" in wants and test is None):
        dense = load_labelled_images(cfg.dense.data, require_labels=False)
        if "dense" in wants and "mask_uri" not in dense.extra:
            raise ConfigError(f"dense.data: {cfg.dense.data} has no 'mask_uri' column")
    return EvalData(train, test, query, gallery, dense)


class _Extractor:
    """Feature extraction with the run's transform/device settings; remembers what each image hashed to."""

    def __init__(self, cfg: EvalConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.transform = eval_transform(cfg.image.resize_size, cfg.image.crop_size, cfg.image.interpolation)
        self.seen: dict[str, dict[str, Any]] = {}

    def __call__(self, model: nn.Module, data: LabelledImages, split: str, with_masks: bool = False) -> FeatureSet:
        feature_set = extract_features(
            model, data.uris, self.transform, self.cfg.batch_size, self.cfg.num_workers, self.device,
            self.cfg.precision, data.extra["mask_uri"] if with_masks else None,
        )
        for index, digest in zip(feature_set.indices, feature_set.sha256):
            self.seen.setdefault(data.uris[index], {"split": split, "label": data.labels[index], "sha256": digest})
        for index, uri in enumerate(data.uris):
            self.seen.setdefault(uri, {"split": split, "label": data.labels[index], "sha256": None})
        return feature_set


def _labels_of(data: LabelledImages, fs: FeatureSet) -> list[str | None]:
    return [data.labels[i] for i in fs.indices]


def _evaluate_model(
    model: nn.Module,
    is_backbone: bool,
    cfg: EvalConfig,
    data: EvalData,
    extract: _Extractor,
    device: torch.device,
    details: dict[str, Any],
) -> dict[str, float]:
    """All requested protocols for one model; flat metrics without prefix."""
    wants = set(cfg.enabled_evals)
    metrics: dict[str, float] = {}
    classification = wants & {"knn", "linear", "logreg"} or ("retrieval" in wants and data.query is None)
    wrapper = BackboneFeatures(model, max(cfg.linear.n_last_blocks)) if is_backbone else model
    if classification:
        train_fs = extract(wrapper, data.train, "train")
        test_fs = extract(wrapper, data.test, "test")
        if len(train_fs.indices) == 0 or len(test_fs.indices) == 0:
            raise RuntimeError("evaluation: no decodable train or test image")
        metrics.update({
            "data.train.images": len(train_fs.indices), "data.train.skipped": train_fs.num_skipped,
            "data.test.images": len(test_fs.indices), "data.test.skipped": test_fs.num_skipped,
        })
        details["skipped"] = {"train": train_fs.skipped, "test": test_fs.skipped}
        class_names, (train_y, test_y) = encode_labels(_labels_of(data.train, train_fs), _labels_of(data.test, test_fs))
        train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
        num_classes = len(class_names)
        details["classes"] = class_names
        if "knn" in wants:
            knn = knn_evaluate(
                train_fs.features["cls"], train_y, test_fs.features["cls"], test_y, cfg.knn.ks,
                cfg.knn.temperature, num_classes, cfg.knn.train_chunk_size, cfg.knn.query_chunk_size,
            )
            metrics.update({f"knn.{k}": v for k, v in knn.items()})
        if "linear" in wants and is_backbone:
            keep, val = split_indices(len(train_y), cfg.linear.val_fraction, cfg.linear.seed)
            keep_t, val_t = torch.from_numpy(keep), torch.from_numpy(val)
            pick = lambda feats, idx: {k: v[idx] for k, v in feats.items() if k in ("cls_blocks", "patch_mean")}  # noqa: E731
            result = train_linear_grid(
                pick(train_fs.features, keep_t), train_y[keep_t], pick(train_fs.features, val_t), train_y[val_t],
                test_fs.features, test_y, num_classes, cfg.linear, device,
            )
            metrics.update({"linear.top1": result["top1"], "linear.top5": result["top5"],
                            "linear.val_top1": result["val_top1"]})
            details["linear"] = result
        if "logreg" in wants:
            logreg_device = device if cfg.logreg.device == "auto" else torch.device("cpu")
            result = logreg_evaluate(
                train_fs.features["cls"], train_y, test_fs.features["cls"], test_y, num_classes, cfg.logreg,
                logreg_device,
            )
            metrics.update({"logreg.top1": result["top1"], "logreg.top5": result["top5"],
                            "logreg.best_c": result["best_c"]})
            details["logreg"] = result
        if "retrieval" in wants and data.query is None:
            queries = torch.arange(len(test_y))
            if cfg.retrieval.max_queries is not None:
                queries = queries[: cfg.retrieval.max_queries]
            result = retrieval_metrics(
                test_fs.features["cls"][queries], test_y[queries], train_fs.features["cls"], train_y, cfg.retrieval.ks
            )
            metrics.update({f"retrieval.{k}": v for k, v in result.items()})
    if "retrieval" in wants and data.query is not None:
        query_fs = extract(wrapper, data.query, "retrieval_query")
        gallery_fs = extract(wrapper, data.gallery, "retrieval_gallery")
        column = cfg.retrieval.group_column
        groups = [str(v) for v in data.query.column(column)] + [str(v) for v in data.gallery.column(column)]
        index = {g: i for i, g in enumerate(sorted(set(groups)))}
        query_groups = torch.tensor([index[str(data.query.column(column)[i])] for i in query_fs.indices])
        gallery_groups = torch.tensor([index[str(data.gallery.column(column)[i])] for i in gallery_fs.indices])
        limit = cfg.retrieval.max_queries or len(query_groups)
        result = retrieval_metrics(
            query_fs.features["cls"][:limit], query_groups[:limit], gallery_fs.features["cls"], gallery_groups,
            cfg.retrieval.ks,
        )
        metrics.update({f"retrieval.{k}": v for k, v in result.items()})
    if "dense" in wants and is_backbone:
        dense_wrapper = BackboneFeatures(model, 1, keep_patch_map=True)
        dense_fs = extract(dense_wrapper, data.dense, "dense", with_masks=True)
        result = dense_probe(dense_fs.features["patch_map"], dense_fs.features["mask"], cfg.dense, device)
        metrics.update({"dense.miou": result["miou"], "dense.pixel_acc": result["pixel_acc"],
                        "data.dense.images": len(dense_fs.indices), "data.dense.skipped": dense_fs.num_skipped})
        details["dense"] = result
    return metrics


@torch.inference_mode()
def _pca_inputs(model: nn.Module, data: LabelledImages, extract: _Extractor, count: int, device: torch.device):
    dataset = ImageListDataset(data.uris, extract.transform)
    images = []
    for index in range(len(dataset)):
        item = dataset[index]
        if item[0] is not None:
            images.append(item[0]["image"])
        if len(images) == count:
            break
    if not images:
        return None, None
    batch = torch.stack(images)
    patch_map = BackboneFeatures(model, 1, keep_patch_map=True).to(device).eval()(batch.to(device))["patch_map"]
    return batch, patch_map.float().cpu()


def _write_decontamination(output_dir: str, seen: dict[str, dict[str, Any]]) -> tuple[str, str]:
    rows = [{"uri": uri, **info} for uri, info in sorted(seen.items())]
    manifest_uri = write_manifest(rows, join_uri(output_dir, EVAL_MANIFEST_FILE))
    lines = [
        "# Evaluation images: never train on these. One image per line: <sha256 or '-'>\\t<uri>\n",
        *[f"{row['sha256'] or '-'}\t{row['uri']}\n" for row in rows],
    ]
    decontamination_uri = join_uri(output_dir, DECONTAMINATION_FILE)
    atomic_write_text(decontamination_uri, "".join(lines))
    return manifest_uri, decontamination_uri


def _in_memory_spec(model: nn.Module) -> dict[str, Any] | None:
    from dinov2_core.models import backbone_spec

    try:
        return backbone_spec(model)
    except ValueError:  # not built by a builder: no random-init twin can be made
        return None


def run_evaluation(
    cfg: EvalConfig, output_dir: str | os.PathLike, model: nn.Module | None = None, title: str = "backbone"
) -> dict[str, Any]:
    """Evaluate ``cfg``'s backbone (or the in-memory ``model``) and baselines; write all outputs
    under ``output_dir``.

    Returns ``{"metrics": {flat metrics}, "table": markdown, "files": {name: uri}}``.
    """
    validate_eval_config(cfg)
    output_dir = os.fspath(output_dir)
    device = resolve_device(cfg.device)
    if model is None:
        model, spec, title = load_eval_backbone(cfg)
    else:
        model, spec = model.eval(), _in_memory_spec(model)
    patch_size = int(getattr(model, "patch_size"))
    if cfg.image.crop_size % patch_size:
        raise ConfigError(f"image.crop_size: {cfg.image.crop_size} is not a multiple of the patch size {patch_size}")
    data = load_eval_data(cfg)
    extract = _Extractor(cfg, device)
    details: dict[str, Any] = {"backbone": title, "spec": spec, "config": to_dict(cfg)}
    started = time.perf_counter()
    metrics = _evaluate_model(model, True, cfg, data, extract, device, details)
    pca_files: list[str] = []
    if "pca" in cfg.enabled_evals:
        source = data.test if data.test is not None else data.dense
        images, patch_maps = _pca_inputs(model, source, extract, cfg.pca.num_images, device)
        if images is not None:
            pca_files = write_pca_maps(images, patch_maps, output_dir, cfg.pca.foreground_threshold)
    if cfg.baselines.random_init and not cfg.random_init and spec is not None:
        baseline_details: dict[str, Any] = {}
        random_model = random_init_backbone(spec, cfg.baselines.random_init_seed)
        baseline = _evaluate_model(random_model, True, cfg, data, extract, device, baseline_details)
        metrics.update({f"baseline_random.{k}": v for k, v in baseline.items() if not k.startswith("data.")})
        details["baseline_random"] = baseline_details
    if cfg.baselines.pixels and ({"knn", "retrieval"} & set(cfg.enabled_evals)):
        pixel_cfg = dataclasses.replace(cfg, evals=[e for e in cfg.enabled_evals if e in ("knn", "retrieval")])
        baseline = _evaluate_model(pixel_baseline(cfg.baselines.pixel_size), False, pixel_cfg, data, extract,
                                   device, {})
        metrics.update({f"baseline_pixels.{k}": v for k, v in baseline.items() if not k.startswith("data.")})
    metrics["eval.seconds"] = time.perf_counter() - started
    manifest_uri, decontamination_uri = _write_decontamination(output_dir, extract.seen)
    data_lines = [
        f"{split}: {int(metrics[f'data.{split}.images'])} images, {int(metrics[f'data.{split}.skipped'])} skipped"
        for split in ("train", "test", "dense") if f"data.{split}.images" in metrics
    ]
    if "classes" in details:
        data_lines.append(f"classes: {len(details['classes'])}")
    if "linear" in details:
        data_lines.append(f"linear: best head on validation = `{details['linear']['best_head']}`")
    if "logreg" in details:
        data_lines.append(f"logreg: best C on hold-out = {details['logreg']['best_c']:.3g}")
    data_lines.append(f"device: {device}; evaluation took {metrics['eval.seconds']:.1f} s")
    pca_names = [os.path.basename(p) for p in pca_files]
    table = markdown_table(metrics, cfg.knn.ks, title)
    atomic_write_json(join_uri(output_dir, DETAILS_FILE), details)
    atomic_write_text(join_uri(output_dir, REPORT_FILE), report_markdown(metrics, cfg.knn.ks, title, data_lines, pca_names))
    metrics_uri = join_uri(output_dir, METRICS_FILE)
    atomic_write_json(metrics_uri, metrics)  # last: its presence means the evaluation finished
    files = {"metrics": metrics_uri, "details": join_uri(output_dir, DETAILS_FILE),
             "report": join_uri(output_dir, REPORT_FILE), "eval_manifest": manifest_uri,
             "decontamination": decontamination_uri, **{name: p for name, p in zip(pca_names, pca_files)}}
    return {"metrics": metrics, "table": table, "files": files}
