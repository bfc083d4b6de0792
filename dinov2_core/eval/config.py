"""Typed configuration of a frozen-feature evaluation run (``EvalConfig``).

Defaults follow the official DINOv2 protocols (recipe §7): kNN k ∈ {10, 20, 100, 200}, T = 0.07;
the 52-head linear grid; logistic regression over 45 values of C; Resize 256 / CenterCrop 224 with
ImageNet normalisation. Iteration counts and sweep sizes are configurable so tests stay tiny.
Everything is validated before any image is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dinov2_core.utils.config import ConfigError

EvalName = Literal["knn", "linear", "logreg", "retrieval", "dense", "pca"]
ALL_EVALS: tuple[str, ...] = ("knn", "linear", "logreg", "retrieval", "dense", "pca")
OFFICIAL_LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass
class ImageConfig:
    """Feature transform: Resize(resize_size) → CenterCrop(crop_size) → ImageNet normalisation.
    ``crop_size`` must be a multiple of the backbone's patch size (checked once it is loaded)."""

    resize_size: int = 256
    crop_size: int = 224
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def validate(self) -> None:
        if self.crop_size <= 0 or self.resize_size < self.crop_size:
            raise ConfigError(
                f"image.resize_size ({self.resize_size}) must be >= image.crop_size ({self.crop_size}) > 0"
            )


@dataclass
class KnnConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    #: train features scored at once per query chunk (bounds memory for large train sets)
    train_chunk_size: int = 65536
    query_chunk_size: int = 1024

    def validate(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"knn.ks: every k must be a positive integer, got {self.ks}")
        if self.temperature <= 0:
            raise ConfigError(f"knn.temperature: must be > 0, got {self.temperature}")
        if self.train_chunk_size <= 0 or self.query_chunk_size <= 0:
            raise ConfigError("knn.train_chunk_size / knn.query_chunk_size: must be > 0")


@dataclass
class LinearConfig:
    """The official grid: n_last_blocks × avgpool × lrs heads, trained together on frozen features."""

    n_last_blocks: list[int] = field(default_factory=lambda: [1, 4])
    avgpool: list[bool] = field(default_factory=lambda: [False, True])
    lrs: list[float] = field(default_factory=lambda: list(OFFICIAL_LINEAR_LRS))
    iterations: int = 12500
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 0.0
    #: fraction of the train set held out to choose the best head (never the reported test split)
    val_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if not self.n_last_blocks or any(n < 1 for n in self.n_last_blocks):
            raise ConfigError(f"linear.n_last_blocks: positive integers required, got {self.n_last_blocks}")
        if not self.avgpool or not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ConfigError("linear.avgpool / linear.lrs: non-empty, lrs > 0")
        if self.iterations < 1 or self.batch_size < 1:
            raise ConfigError("linear.iterations / linear.batch_size: must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"linear.val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass
class LogregConfig:
    """L2 logistic regression on raw cls features; C = 10^linspace(c_min_exp, c_max_exp, num_c)."""

    c_min_exp: float = -6.0
    c_max_exp: float = 5.0
    num_c: int = 45
    holdout_fraction: float = 0.1
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-12
    device: Literal["cpu", "auto"] = "cpu"

    def validate(self) -> None:
        if self.num_c < 1 or self.c_max_exp < self.c_min_exp:
            raise ConfigError("logreg.num_c must be >= 1 and logreg.c_max_exp >= logreg.c_min_exp")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"logreg.holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        if self.max_iter < 1:
            raise ConfigError("logreg.max_iter: must be >= 1")


@dataclass
class RetrievalConfig:
    """Queries vs gallery on L2-normalised cls features. Without explicit manifests the test set is
    the query set and the train set the gallery; an item is relevant when its ``group_column``
    value (e.g. a planted near-duplicate group id, or the label) equals the query's."""

    query: str | None = None
    gallery: str | None = None
    group_column: str = "label"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    max_queries: int | None = None

    def validate(self) -> None:
        if (self.query is None) != (self.gallery is None):
            raise ConfigError("retrieval.query and retrieval.gallery: set both or neither")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"retrieval.ks: positive integers required, got {self.ks}")


@dataclass
class DenseConfig:
    """Linear (1×1) head on frozen patch tokens, logits upsampled to pixels, CE loss, mIoU."""

    data: str | None = None
    iterations: int = 300
    lr: float = 1e-2
    batch_size: int = 16
    holdout_fraction: float = 0.25
    seed: int = 0
    #: mask value that is ignored in loss and mIoU
    ignore_index: int = 255

    def validate(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"dense.holdout_fraction: must be in (0, 1), got {self.holdout_fraction}")
        if self.iterations < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError("dense.iterations / dense.lr / dense.batch_size: must be positive")


@dataclass
class PcaConfig:
    """The PCA feature-map figure (``pca_maps.png``) of the first ``num_images`` test images."""

    num_images: int = 4
    #: foreground = patches whose first component (oriented so the image border scores low, min-max
    #: scaled to [0, 1]) exceeds this; the colours are a PCA of the foreground only, the background is
    #: black (as in the DINOv2 paper); null = no masking, one PCA over all patches
    foreground_threshold: float | None = 0.5

    def validate(self) -> None:
        if self.num_images < 1:
            raise ConfigError("pca.num_images: must be >= 1")
        if self.foreground_threshold is not None and not 0.0 <= self.foreground_threshold <= 1.0:
            raise ConfigError("pca.foreground_threshold: must be in [0, 1] or null")


@dataclass
class BaselinesConfig:
    """What the report compares the backbone with: same spec at random init, and raw pixels (kNN)."""

    random_init: bool = True
    pixels: bool = True
    pixel_size: int = 32
    random_init_seed: int = 0

    def validate(self) -> None:
        if self.pixel_size < 1:
            raise ConfigError("baselines.pixel_size: must be >= 1")


@dataclass
class EvalConfig:
    """A full evaluation: which backbone, which data, which protocols.

    ``backbone`` is an export directory (``backbone.pth`` + ``model.json``) or an official hub
    ``.pth``. Without it, ``arch`` + ``random_init: true`` evaluates a random network (baseline run);
    ``run_evaluation(cfg, out, model=...)`` evaluates an in-memory module instead.
    ``train``/``test`` are ImageFolder directories or labelled manifests (local or ``s3://``).
    """

    backbone: str | None = None
    arch: str | None = None
    #: builder keyword arguments for ``arch`` (e.g. ``patch_size``), only with ``random_init``
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False
    train: str | None = None
    test: str | None = None
    #: protocols to run; null = every protocol the given data allows (dense only with ``dense.data``)
    evals: list[EvalName] | None = None
    image: ImageConfig = field(default_factory=ImageConfig)
    batch_size: int = 64
    num_workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: autocast dtype for feature extraction on CUDA (the official eval uses fp16)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    #: cap the number of train / test images (null = all), sampled with ``seed``
    max_train_images: int | None = None
    max_test_images: int | None = None
    seed: int = 0
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    logreg: LogregConfig = field(default_factory=LogregConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    pca: PcaConfig = field(default_factory=PcaConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    @property
    def enabled_evals(self) -> list[str]:
        if self.evals is not None:
            return list(self.evals)
        return [e for e in ALL_EVALS if e != "dense" or self.dense.data is not None]

    def validate(self) -> None:
        evals = self.enabled_evals
        if self.random_init and not self.arch:
            raise ConfigError("arch: required with random_init: true (e.g. vit_small)")
        if self.backbone is not None and self.random_init:
            raise ConfigError("random_init: true cannot be combined with backbone (use arch instead)")
        classification = {"knn", "linear", "logreg"} & set(evals)
        if classification and (self.train is None or self.test is None):
            raise ConfigError(f"train and test: required for evals {sorted(classification)}")
        if "retrieval" in evals and self.retrieval.query is None and (self.train is None or self.test is None):
            raise ConfigError("retrieval: needs retrieval.query/gallery or train and test")
        if "dense" in evals and self.dense.data is None:
            raise ConfigError("dense.data: required when 'dense' is in evals (manifest with uri, mask_uri)")
        if "pca" in evals and self.test is None and self.dense.data is None:
            raise ConfigError("pca: needs test or dense.data images")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("batch_size must be >= 1 and num_workers >= 0")
        for name, value in (("max_train_images", self.max_train_images), ("max_test_images", self.max_test_images)):
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null")
