"""Block-wise masking and batch collation: recipe statistics (masked-crop count, upperbound 967/2496/4941),
per-crop weights, crop-major order, skipped samples, determinism and (``official``) exact parity."""

from __future__ import annotations

import random

import pytest
import torch

from dinov2_core.data.collate import EmptyBatchError, collate_data_and_cast
from dinov2_core.data.masking import MaskingGenerator, official_max_num_patches

GRID = 16
N = GRID * GRID


def _generator() -> MaskingGenerator:
    return MaskingGenerator((GRID, GRID), max_num_patches=official_max_num_patches(224, 14))


def _samples(batch: int, n_local: int = 2, global_size: int = 4, local_size: int = 2) -> list:
    """Crop (image i, crop c) is filled with the value 100·c + i so the stacking order is visible."""
    return [
        (
            {
                "global_crops": [torch.full((3, global_size, global_size), 100.0 * c + i) for c in range(2)],
                "local_crops": [torch.full((3, local_size, local_size), 100.0 * c + i) for c in range(n_local)],
            },
            None,
        )
        for i in range(batch)
    ]


def _collate(samples, rng=0, **kwargs):
    return collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, n_tokens=N, mask_generator=_generator(), rng=rng, **kwargs)


def test_official_cap_is_half_the_grid():
    assert official_max_num_patches(224, 14) == 128
    assert official_max_num_patches(224, 16) == 98
    assert official_max_num_patches(518, 14) == 666


@pytest.mark.parametrize("batch, upperbound", [(12, 967), (32, 2496), (64, 4941)])
def test_collate_mask_statistics_follow_recipe(batch, upperbound):
    out = _collate(_samples(batch), rng=batch)
    masks = out["collated_masks"]
    per_crop = masks.sum(-1)
    assert masks.shape == (2 * batch, N) and masks.dtype == torch.bool
    assert int((per_crop > 0).sum()) == int(2 * batch * 0.5)
    assert out["upperbound"] == upperbound
    m = int(out["n_masked_patches"].item())
    assert out["n_masked_patches"].dtype == torch.int64 and m == int(masks.sum()) <= upperbound
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    # Token weights: 1/#masked of the owning crop, so each masked crop's weights sum to 1.
    owner = out["mask_indices_list"] // N
    weight_per_crop = torch.zeros(2 * batch).index_add_(0, owner, out["masks_weight"])
    torch.testing.assert_close(weight_per_crop[per_crop > 0], torch.ones(int((per_crop > 0).sum())))
    assert out["masks_weight"].dtype == torch.float32 and out["n_skipped"] == 0


def test_masks_are_shuffled_across_both_views():
    views_masked = [0, 0]
    for seed in range(20):
        per_crop = _collate(_samples(8), rng=seed)["collated_masks"].sum(-1)
        views_masked[0] += int((per_crop[:8] > 0).sum())
        views_masked[1] += int((per_crop[8:] > 0).sum())
    assert views_masked[0] > 0 and views_masked[1] > 0


def test_generator_count_never_exceeds_target_and_reaches_it_on_average():
    generator = _generator()
    rng = random.Random(1)
    for target in (0, 5, 26, 64, 100, 128):
        counts = [int(generator(target, rng=rng).sum()) for _ in range(60)]
        assert max(counts) <= target
        assert sum(counts) / len(counts) >= 0.97 * target


def test_generator_places_full_rectangles_smaller_than_the_grid():
    generator = _generator()
    accepted = 0
    for seed in range(30):
        mask = torch.zeros(GRID, GRID, dtype=torch.bool)
        added = generator._add_rectangle(mask, 40, random.Random(seed))
        assert added == int(mask.sum()) <= 40
        if added:
            accepted += 1
            rows, cols = mask.nonzero(as_tuple=True)
            box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all() and box.shape[0] < GRID and box.shape[1] < GRID
    assert accepted >= 25


def test_collate_stacks_crop_major_and_casts():
    out = _collate(_samples(3, n_local=2))
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert g.dtype == torch.float16 and g.shape == (6, 3, 4, 4)
    assert loc.dtype == torch.float16 and loc.shape == (6, 3, 2, 2)
    assert g[:, 0, 0, 0].tolist() == [0, 1, 2, 100, 101, 102]
    assert loc[:, 0, 0, 0].tolist() == [0, 1, 2, 100, 101, 102]


def test_collate_without_local_crops():
    out = _collate(_samples(2, n_local=0))
    assert out["collated_local_crops"].shape[0] == 0


def test_collate_drops_none_samples_and_counts_them():
    samples = _samples(5)
    samples[1] = None
    samples[4] = None
    out = _collate(samples)
    assert out["n_skipped"] == 2
    assert out["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 2, 3, 100, 102, 103]
    assert out["collated_masks"].shape[0] == 6
    with pytest.raises(EmptyBatchError):
        _collate([None, None])


def test_collate_is_deterministic_given_rng():
    a, b, c = _collate(_samples(6), rng=7), _collate(_samples(6), rng=random.Random(7)), _collate(_samples(6), rng=8)
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert not torch.equal(a["collated_masks"], c["collated_masks"])


def test_collate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mask_generator"):
        collate_data_and_cast(_samples(2), (0.1, 0.5), 0.5, torch.float32, n_tokens=N)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(_samples(2), (0.1, 0.5), 0.5, torch.float32, n_tokens=N + 1, mask_generator=_generator())


@pytest.mark.official
@pytest.mark.parametrize("batch", [4, 12])
def test_official_parity_collate_and_masks(batch):
    official_collate = pytest.importorskip("dinov2.data.collate")
    official_masking = pytest.importorskip("dinov2.data.masking")
    samples = _samples(batch)
    ours = _collate(samples, rng=random.Random(123))
    state = random.getstate()
    try:
        random.seed(123)
        generator = official_masking.MaskingGenerator((GRID, GRID), max_num_patches=0.5 * 224 // 14 * 224 // 14)
        theirs = official_collate.collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, N, generator)
    finally:
        random.setstate(state)
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["upperbound"] == theirs["upperbound"]
