"""Keep-first near-duplicate grouping: a removed image is always directly similar to the image kept for
it, so chains of matches (A~B~C with A !~ C) never remove C for A. Synthetic embeddings, real faiss."""

from __future__ import annotations

import numpy as np
import pytest

from curation.config import DedupConfig
from curation.dedup import keep_first_groups, near_duplicate_edges, pair_similarities


def _chain(steps: int, angle: float, dim: int = 16) -> np.ndarray:
    """Unit vectors rotated by ``angle`` radians per step in one plane: neighbours are similar
    (cos angle), items two steps apart are not (cos 2·angle)."""
    vectors = np.zeros((steps, dim), dtype=np.float32)
    vectors[:, 0] = np.cos(angle * np.arange(steps))
    vectors[:, 1] = np.sin(angle * np.arange(steps))
    return vectors


def test_chain_never_removes_c_for_a():
    threshold = DedupConfig.threshold
    angle = float(np.arccos(threshold)) * 0.8  # cos(angle) > threshold > cos(2 angle)
    abc = _chain(3, angle)
    assert abc[0] @ abc[1] > threshold and abc[1] @ abc[2] > threshold and abc[0] @ abc[2] < threshold
    left, right, _, index = near_duplicate_edges(DedupConfig(), abc, None)
    assert {tuple(sorted(p)) for p in zip(left.tolist(), right.tolist())} == {(0, 1), (1, 2)}
    assert index == "IndexFlatIP (CPU)"
    kept_for = keep_first_groups(np.array([0, 1, 2]), left, right)
    assert kept_for.tolist() == [0, 0, 2]  # B removed for A; C is not a copy of A and stays
    # the middle image preferred: both ends are its direct duplicates
    assert keep_first_groups(np.array([1, 0, 2]), left, right).tolist() == [1, 1, 1]


def test_every_removed_item_is_above_threshold_to_its_kept_item():
    """A long chain plus random distinct vectors: connected components would merge the whole chain."""
    threshold = DedupConfig.threshold
    chain = _chain(40, float(np.arccos(threshold)) * 0.6)
    rng = np.random.default_rng(0)
    others = rng.normal(size=(200, 16)).astype(np.float32)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    vectors = np.concatenate([chain, others])
    left, right, _, _ = near_duplicate_edges(DedupConfig(), vectors, None)
    order = rng.permutation(len(vectors))
    kept_for = keep_first_groups(order, left, right)
    removed = np.nonzero(kept_for != np.arange(len(vectors)))[0]
    assert len(removed) > 0
    assert np.all(kept_for[kept_for] == kept_for)  # a kept item is never itself removed
    assert np.all(pair_similarities(removed, kept_for[removed], vectors, None) > threshold)
    assert len(set(kept_for[:40].tolist())) > 1  # the chain is not collapsed into one image
    assert np.all(kept_for[40:] == np.arange(40, len(vectors)))  # random vectors are all distinct


def test_pair_similarities_with_views_take_the_best_view_either_way():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(2, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    views = np.stack([np.stack([vectors[0], -vectors[0]]), np.stack([-vectors[1], vectors[0]])])
    # item 0's full descriptor equals item 1's second view
    assert np.allclose(pair_similarities(np.array([0]), np.array([1]), vectors, views), [1.0])


def test_crowded_look_alikes_need_a_higher_similarity_than_an_isolated_copy():
    """20 different but look-alike vectors (pairwise 0.93-0.98, like featureless sea photos) and one
    isolated pair at ~0.945: with the crowding adjustment only the isolated pair is a duplicate."""
    rng = np.random.default_rng(0)
    dim = 128
    centre = rng.normal(size=dim)
    crowd = centre / np.linalg.norm(centre) + 0.018 * rng.normal(size=(20, dim))
    isolated = rng.normal(size=dim)
    isolated /= np.linalg.norm(isolated)
    copy = isolated + 0.03 * rng.normal(size=dim)
    others = rng.normal(size=(300, dim))
    vectors = np.concatenate([crowd, [isolated, copy], others]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    crowd_sims = (vectors[:20] @ vectors[:20].T)[np.triu_indices(20, 1)]
    assert 0.93 < crowd_sims.min() and crowd_sims.max() < 0.98
    assert 0.93 < vectors[20] @ vectors[21] < 0.96

    left, right, _, _ = near_duplicate_edges(DedupConfig(), vectors, None)
    assert {tuple(sorted(p)) for p in zip(left.tolist(), right.tolist())} == {(20, 21)}
    left, right, _, _ = near_duplicate_edges(DedupConfig(crowding_rank=0), vectors, None)
    pairs = {tuple(sorted(p)) for p in zip(left.tolist(), right.tolist())}
    assert (20, 21) in pairs and len(pairs) == 1 + 20 * 19 // 2  # without it the look-alikes all match


def test_crowding_settings_are_validated_by_name():
    from dinov2_core.utils.config import ConfigError

    with pytest.raises(ConfigError, match="crowding_rank"):
        DedupConfig(crowding_rank=100).validate()  # more than k=64 neighbours
    with pytest.raises(ConfigError, match="crowding_weight"):
        DedupConfig(crowding_weight=-1).validate()
