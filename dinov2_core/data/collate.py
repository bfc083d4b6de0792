"""Batch collation for DINOv2 training: crop-major stacking, iBOT masks, and skipped samples (recipe §4.3).

``collate_data_and_cast`` turns a list of ``(crops_dict, label)`` samples (``crops_dict`` from
:class:`~dinov2_core.data.augmentations.DataAugmentationDINO`) into the official batch dictionary.
``None`` samples (images the dataset could not decode) are dropped and counted in ``n_skipped``.
``mask_collated_crops`` does the masking part alone, for crops that arrive already stacked (the batched
augmentation backend).

Masking per batch of 2B global crops: int(2B·mask_probability) crops get a block-wise mask whose
target size is int(N·U(bin_k, bin_{k+1})) with bins = linspace(ratio_min, ratio_max, n+1); the other
crops are unmasked; the list is shuffled over all 2B crops (the two views of an image are masked
independently). ``upperbound`` = Σ_k int(N·bin_{k+1}) bounds the masked-token count, giving the
trainer a static buffer length.

Pass ``rng`` (a ``random.Random`` or an int seed) for deterministic, resumable masks, e.g. a seed
derived from (base seed, iteration, rank). Without it the module-level ``random`` state is used, as
in the official code.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torch import Tensor

from dinov2_core.data.masking import MaskingGenerator


class EmptyBatchError(ValueError):
    """Every sample of a batch was ``None`` (undecodable); there is nothing to collate."""


def _resolve_rng(rng: random.Random | int | None) -> Any:
    if rng is None:
        return random
    if isinstance(rng, random.Random):
        return rng
    return random.Random(rng)


def _stack_crop_major(crop_lists: list[list[Tensor]], dtype: torch.dtype) -> Tensor:
    """[crop 0 of every image; crop 1 of every image; ...] as one tensor."""
    n_crops = len(crop_lists[0])
    if any(len(crops) != n_crops for crops in crop_lists):
        raise ValueError(f"samples disagree on the number of crops: {sorted({len(c) for c in crop_lists})}")
    if n_crops == 0:
        return torch.empty((0, 3, 0, 0), dtype=dtype)
    return torch.stack([crops[i] for i in range(n_crops) for crops in crop_lists]).to(dtype)


def _check_mask_arguments(mask_probability: float, n_tokens: int | None,
                          mask_generator: MaskingGenerator | None) -> tuple[MaskingGenerator, int]:
    if mask_generator is None:
        raise ValueError("mask_generator: required (a MaskingGenerator for the global-crop patch grid)")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability: {mask_probability!r} must lie in [0, 1]")
    n_tokens = mask_generator.num_patches if n_tokens is None else n_tokens
    if n_tokens != mask_generator.num_patches:
        raise ValueError(f"n_tokens: {n_tokens} does not match the mask generator grid ({mask_generator.num_patches})")
    return mask_generator, n_tokens


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict[str, Any], Any] | None],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: random.Random | int | None = None,
) -> dict[str, Any]:
    """Collate a batch into the official dict, plus ``n_skipped``.

    Returns:
        ``collated_global_crops`` (2B, 3, S, S) ``dtype``, crop-major; ``collated_local_crops`` (L·B, 3,
        s, s) ``dtype``, crop-major; ``collated_masks`` (2B, N) bool; ``mask_indices_list`` (M,) int64
        flat indices into (2B·N); ``masks_weight`` (M,) float32 = 1/#masked(crop of the token);
        ``upperbound`` int ≥ M; ``n_masked_patches`` (1,) int64 = M; ``n_skipped`` int.

    Raises:
        EmptyBatchError: if every sample is ``None``.
    """
    _check_mask_arguments(mask_probability, n_tokens, mask_generator)
    kept = [sample for sample in samples_list if sample is not None]
    n_skipped = len(samples_list) - len(kept)
    if not kept:
        raise EmptyBatchError(f"all {n_skipped} samples of the batch were skipped (undecodable images)")

    return mask_collated_crops(
        _stack_crop_major([crops["global_crops"] for crops, _ in kept], dtype),
        _stack_crop_major([crops["local_crops"] for crops, _ in kept], dtype),
        mask_ratio_tuple, mask_probability, n_tokens=n_tokens, mask_generator=mask_generator, rng=rng,
        n_skipped=n_skipped,
    )


def mask_collated_crops(
    global_crops: Tensor,
    local_crops: Tensor,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: random.Random | int | None = None,
    n_skipped: int = 0,
) -> dict[str, Any]:
    """The batch dict of :func:`collate_data_and_cast` for crops already stacked crop-major (e.g. by
    :class:`~dinov2_core.data.batched_augmentations.BatchedDataAugmentationDINO`): draws the iBOT masks
    for the 2B global crops, with the same RNG consumption as ``collate_data_and_cast``."""
    mask_generator, n_tokens = _check_mask_arguments(mask_probability, n_tokens, mask_generator)
    source = _resolve_rng(rng)
    n_global = global_crops.shape[0]
    n_masked_crops = int(n_global * mask_probability)
    # float32 bins, as in the official code: the integer targets and upperbound depend on this rounding.
    bins = torch.linspace(*mask_ratio_tuple, n_masked_crops + 1)
    masks: list[Tensor] = []
    upperbound = 0
    for low, high in zip(bins[:-1], bins[1:]):
        ratio = low + (high - low) * source.random()
        masks.append(mask_generator(int(n_tokens * ratio), rng=source))
        upperbound += int(n_tokens * high)
    masks.extend(mask_generator(0, rng=source) for _ in range(n_global - n_masked_crops))
    source.shuffle(masks)

    collated_masks = torch.stack(masks).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
        "n_skipped": n_skipped,
    }
