"""The training data stream: manifest → seeded multi-crop augmentation → sharded sampler → collate.

Every random draw is a function of ``(train.seed, stream position)``: crops through
:class:`~dinov2_core.data.datasets.ManifestDataset`, masks through :class:`SeededCollate` (seeded by
the first stream position of the batch). Together with the sampler position saved in checkpoints this
makes a resumed run see exactly the batches an uninterrupted run would have seen.

With ``crops.augmentation=batched`` the dataset only decodes each image to a uint8 square
(:class:`SquareSource`) and :class:`SeededCollate` runs
:class:`~dinov2_core.data.batched_augmentations.BatchedDataAugmentationDINO` on the stacked batch, with a
``torch.Generator`` seeded from the batch's first stream position (the same rule as the masks, another
salt), so resumption stays exact.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import DataLoader

from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinov2_core.data.augmentations import DataAugmentationDINO
from dinov2_core.data.batched_augmentations import BatchedDataAugmentationDINO
from dinov2_core.data.collate import collate_data_and_cast, mask_collated_crops
from dinov2_core.data.datasets import ManifestDataset, sample_seed
from dinov2_core.data.masking import MaskingGenerator, official_max_num_patches
from dinov2_core.data.samplers import InfiniteShardedSampler
from dinov2_core.train.config import TrainConfig

_MASK_SALT = 1
_BATCHED_AUGMENTATION_SALT = 2


class SquareSource:
    """PIL image → uint8 (3, size, size) tensor: shorter side resized to ``size`` (bicubic, antialiased),
    then centre-cropped; an image already ``size``×``size`` is only converted."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = TF.center_crop(TF.resize(image, self.size, interpolation=TF.InterpolationMode.BICUBIC,
                                             antialias=True), [self.size, self.size])
        return TF.pil_to_tensor(image)


class PositionTagged:
    """Wraps the augmentation so each sample carries its stream position (in the official
    ``(crops, target)`` slot; SSL training ignores targets)."""

    def __init__(self, dataset: ManifestDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int] | None:
        crops = self.dataset[key]
        return None if crops is None else (crops, key[0])


class SeededCollate:
    """``collate_data_and_cast`` with a mask RNG seeded from the batch's stream positions.

    With ``crops.augmentation=batched`` the samples are uint8 (3, S, S) tensors: they are stacked and
    augmented here (:class:`BatchedDataAugmentationDINO`), then masked by the same rule.
    """

    def __init__(self, cfg: TrainConfig, dtype: torch.dtype) -> None:
        grid = cfg.crops.global_crops_size // cfg.student.patch_size
        self.seed = cfg.train.seed
        self.dtype = dtype
        self.mask_arguments: dict[str, Any] = dict(
            mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
            mask_probability=cfg.ibot.mask_sample_probability,
            n_tokens=grid * grid,
            mask_generator=MaskingGenerator(
                input_size=(grid, grid),
                max_num_patches=official_max_num_patches(cfg.crops.global_crops_size, cfg.student.patch_size),
            ),
        )
        self.batched = build_batched_augmentation(cfg) if cfg.crops.augmentation == "batched" else None
        self.batch_size = cfg.train.batch_size_per_gpu

    def __call__(self, samples: list[tuple[Any, int] | None]) -> dict[str, Any]:
        kept = [sample for sample in samples if sample is not None]
        positions = [position for _, position in kept]
        if not positions:
            return {"n_skipped": len(samples), "empty": True}
        mask_rng = random.Random(sample_seed(self.seed, min(positions), _MASK_SALT))
        if self.batched is None:
            batch = collate_data_and_cast(samples, dtype=self.dtype, rng=mask_rng, **self.mask_arguments)
        else:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, min(positions),
                                                                  _BATCHED_AUGMENTATION_SALT))
            crops = self.batched(torch.stack([image for image, _ in kept]), generator)
            batch = mask_collated_crops(crops["collated_global_crops"].to(self.dtype),
                                        crops["collated_local_crops"].to(self.dtype), rng=mask_rng,
                                        n_skipped=len(samples) - len(kept), **self.mask_arguments)
        batch["stream_positions"] = torch.tensor(positions)
        return batch


def _augmentation_arguments(cfg: TrainConfig) -> dict[str, Any]:
    c = cfg.crops
    return {"global_crops_scale": tuple(c.global_crops_scale), "local_crops_scale": tuple(c.local_crops_scale),
            "local_crops_number": c.local_crops_number, "global_crops_size": c.global_crops_size,
            "local_crops_size": c.local_crops_size, "blur_mode": c.blur_mode, "blur_sigma": tuple(c.blur_sigma)}


def build_augmentation(cfg: TrainConfig) -> DataAugmentationDINO:
    return DataAugmentationDINO(**_augmentation_arguments(cfg))


def build_batched_augmentation(cfg: TrainConfig) -> BatchedDataAugmentationDINO:
    return BatchedDataAugmentationDINO(**_augmentation_arguments(cfg))


def build_dataset(cfg: TrainConfig) -> ManifestDataset:
    """The manifest dataset of either backend: augmented crops (``per_image``) or uint8 squares (``batched``)."""
    c = cfg.crops
    if c.augmentation == "batched":
        source_size = c.batched_source_size or c.global_crops_size
        return ManifestDataset(cfg.train.dataset, transform=SquareSource(source_size), seed=cfg.train.seed,
                               seeded=False)
    return ManifestDataset(cfg.train.dataset, transform=build_augmentation(cfg), seed=cfg.train.seed)


def build_train_loader(cfg: TrainConfig, rank: int, world_size: int, start_position: int,
                       dtype: torch.dtype, pin_memory: bool = False) -> DataLoader:
    """An infinite loader of collated batches starting at global stream position ``start_position``."""
    dataset = build_dataset(cfg)
    sampler = InfiniteShardedSampler(len(dataset), rank=rank, world_size=world_size, seed=cfg.train.seed,
                                     start=start_position)
    workers = cfg.train.num_workers
    return DataLoader(
        PositionTagged(dataset),
        batch_size=cfg.train.batch_size_per_gpu,
        sampler=sampler,
        collate_fn=SeededCollate(cfg, dtype),
        num_workers=workers,
        # s3fs (and other fsspec filesystems) are not fork-safe: never fork DataLoader workers.
        multiprocessing_context=cfg.train.worker_start_method if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        drop_last=True,
        # Its own generator: creating the iterator must not consume the global torch RNG (drop path),
        # or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
