"""The training configuration: one typed tree for pretraining, 518 px adaptation and distillation.

Section and key names follow the official ``ssl_default_config.yaml`` where one exists
(``dino``, ``ibot``, ``train``, ``student``, ``teacher``, ``optim``, ``crops``), lower-cased; the
sections the official code does not have (``data``, ``checkpoint``, ``parallel``, ``nan_guard``,
``distill``) are ours. Everything is checked by :func:`validate` before a process group, a model or a
file is created, and every error names the dotted key and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from dinov2_core.utils.config import ConfigError, from_dict, load_yaml, apply_overrides

ARCHS = ("vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")


@dataclass
class HeadConfig:
    """A DINO / iBOT projection head (``DINOHead``)."""

    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class DinoConfig(HeadConfig):
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig(HeadConfig):
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False

    def validate(self) -> None:
        low, high = self.mask_ratio_min_max
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"ibot.mask_ratio_min_max: {list(self.mask_ratio_min_max)} must satisfy 0 <= min <= max <= 1")
        if not 0.0 <= self.mask_sample_probability <= 1.0:
            raise ConfigError(f"ibot.mask_sample_probability: {self.mask_sample_probability} must be in [0, 1]")


@dataclass
class TrainSection:
    batch_size_per_gpu: int = 64
    seed: int = 0
    official_epoch_length: int = 1250
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    dataset: str = ""
    num_workers: int = 0
    worker_start_method: Literal["spawn", "forkserver"] = "forkserver"


@dataclass
class StudentConfig:
    """Backbone arguments, passed to ``build_backbone(arch, **kwargs)`` under their official names."""

    arch: Literal["vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"] = "vit_large"
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: float | None = 1.0e-5
    drop_path_uniform: bool = True
    ffn_layer: Literal["mlp", "swiglufused", "swiglu", "identity"] = "mlp"
    block_chunks: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_1024", "none"] = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crops_size: int = 224
    local_crops_size: int = 96
    #: Gaussian-blur probabilities (global 1 / global 2 / local): ``released`` 0/0.9/0.5 (what the released
    #: models saw), ``configured`` 1/0.1/0.5 (the official config values), ``none`` (small images, where a
    #: 9-pixel kernel erases the content)
    blur_mode: Literal["released", "configured", "none"] = "released"
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    #: ``per_image``: torchvision transforms per image in the dataset (bicubic crops, any image size);
    #: ``batched``: :class:`~dinov2_core.data.batched_augmentations.BatchedDataAugmentationDINO` on the
    #: whole batch inside the collate function (bilinear + area-averaging crops, much cheaper per image)
    augmentation: Literal["per_image", "batched"] = "per_image"
    #: ``batched`` only: every image is resized (shorter side) and centre-cropped to this square before
    #: the crops are drawn from it; null = ``global_crops_size`` (a no-op for 32 px CIFAR at 32 px crops)
    batched_source_size: int | None = None

    def validate(self) -> None:
        if self.batched_source_size is not None and self.batched_source_size <= 0:
            raise ConfigError(f"crops.batched_source_size: {self.batched_source_size} must be > 0 (or null)")


@dataclass
class CheckpointConfig:
    period: int = 3750
    keep_last: int = 3
    resume: bool = True
    #: On these signals the iteration in flight is finished and checkpointed, then the signal goes to the
    #: handler installed before training (submitit's requeue) or, without one, the run exits with status 75.
    #: Slurm sends USR2 before the time limit (``--signal=USR2@<s>``, submitit) and TERM on preemption.
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGUSR2", "SIGTERM"])

    def validate(self) -> None:
        from dinov2_core.train.preemption import parse_signal

        for name in self.save_on_signals:
            try:
                parse_signal(name)
            except ValueError as error:
                raise ConfigError(f"checkpoint.save_on_signals: {error}") from None


@dataclass
class ParallelConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True


@dataclass
class NanGuardConfig:
    max_consecutive_bad_steps: int = 3
    max_restores: int = 2


@dataclass
class DistillConfig:
    teacher_path: str = ""
    ema_momentum: float = 0.999


@dataclass
class TrainConfig:
    phase: Literal["pretrain", "highres", "distill"] = "pretrain"
    init_from: str | None = None
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    train: TrainSection = field(default_factory=TrainSection)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    @property
    def max_iter(self) -> int:
        """Last iteration index; the loop runs 0…max_iter inclusive like the official one."""
        return self.optim.epochs * self.train.official_epoch_length

    def validate(self) -> None:
        validate(self)


def _positive(value: float, key: str, strictly: bool = True) -> None:
    if (value <= 0 if strictly else value < 0) or not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} must be {'> 0' if strictly else '>= 0'}")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks (single-field types and enumerations are checked while parsing)."""
    patch = cfg.student.patch_size
    for key in ("global_crops_size", "local_crops_size"):
        size = getattr(cfg.crops, key)
        _positive(size, f"crops.{key}")
        if size % patch:
            raise ConfigError(
                f"crops.{key}: {size} is not a multiple of student.patch_size={patch}; "
                f"allowed: multiples of {patch} such as {[patch * k for k in (size // patch, size // patch + 1) if k]}"
            )
    for key in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(cfg.crops, key)
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"crops.{key}: {[low, high]} must satisfy 0 < min <= max <= 1")
    if cfg.crops.local_crops_number < 0:
        raise ConfigError(f"crops.local_crops_number: {cfg.crops.local_crops_number} must be >= 0")
    _positive(cfg.train.batch_size_per_gpu, "train.batch_size_per_gpu")
    if cfg.dino.koleo_loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
        raise ConfigError(
            f"train.batch_size_per_gpu: {cfg.train.batch_size_per_gpu} is too small while "
            f"dino.koleo_loss_weight={cfg.dino.koleo_loss_weight} > 0; KoLeo needs a nearest neighbour, "
            "allowed: >= 2 (or set dino.koleo_loss_weight=0)"
        )
    _positive(cfg.train.official_epoch_length, "train.official_epoch_length")
    _positive(cfg.optim.epochs, "optim.epochs")
    if cfg.train.num_workers < 0:
        raise ConfigError(f"train.num_workers: {cfg.train.num_workers} must be >= 0")
    if not 0 <= cfg.optim.warmup_epochs <= cfg.optim.epochs:
        raise ConfigError(f"optim.warmup_epochs: {cfg.optim.warmup_epochs} must be in [0, optim.epochs={cfg.optim.epochs}]")
    if cfg.teacher.warmup_teacher_temp_epochs < 0:
        raise ConfigError("teacher.warmup_teacher_temp_epochs: must be >= 0")
    _positive(cfg.optim.base_lr, "optim.base_lr", strictly=False)
    _positive(cfg.optim.clip_grad, "optim.clip_grad", strictly=False)
    for key in ("momentum_teacher", "final_momentum_teacher"):
        value = getattr(cfg.teacher, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"teacher.{key}: {value} must be in [0, 1]")
    for section in ("dino", "ibot"):
        head = getattr(cfg, section)
        for key in ("head_n_prototypes", "head_bottleneck_dim", "head_hidden_dim"):
            _positive(getattr(head, key), f"{section}.{key}")
        if head.head_nlayers < 1:
            raise ConfigError(f"{section}.head_nlayers: {head.head_nlayers} must be >= 1")
        _positive(head.loss_weight, f"{section}.loss_weight", strictly=False)
    if not cfg.ibot.separate_head:
        for key in ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim"):
            if getattr(cfg.ibot, key) != getattr(cfg.dino, key):
                raise ConfigError(
                    f"ibot.{key}: {getattr(cfg.ibot, key)} differs from dino.{key}={getattr(cfg.dino, key)} "
                    "but ibot.separate_head is false (a shared head has one shape); allowed: set "
                    "ibot.separate_head=true or make them equal"
                )
    if cfg.checkpoint.period < 1:
        raise ConfigError(f"checkpoint.period: {cfg.checkpoint.period} must be >= 1")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last: {cfg.checkpoint.keep_last} must be >= 1")
    if cfg.nan_guard.max_consecutive_bad_steps < 0 or cfg.nan_guard.max_restores < 0:
        raise ConfigError("nan_guard.max_consecutive_bad_steps / nan_guard.max_restores: must be >= 0")
    if not cfg.train.dataset:
        raise ConfigError("train.dataset: required; a manifest URI (.parquet/.jsonl/.csv/.txt, local or s3://)")
    if cfg.phase == "highres" and not cfg.init_from:
        raise ConfigError(
            "init_from: required when phase='highres'; a pretraining output directory, its export/ "
            "directory or a DCP checkpoint directory"
        )
    if cfg.phase == "distill":
        if not cfg.distill.teacher_path:
            raise ConfigError(
                "distill.teacher_path: required when phase='distill'; a training output directory or its "
                "export/ directory (backbone.pth + heads.pth + model.json)"
            )
        if not 0.0 <= cfg.distill.ema_momentum <= 1.0:
            raise ConfigError(f"distill.ema_momentum: {cfg.distill.ema_momentum} must be in [0, 1]")


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe (with ``defaults:`` inheritance), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = load_yaml(path) if path else {}
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))
