"""DINO, iBOT and KoLeo losses: hand-computable cases, independent fp64 references, delayed centering,
exact resume through ``state_dict``, and (``official`` marker) parity with the official dinov2 package."""

from __future__ import annotations

import math

import pytest
import torch

from dinov2_core.losses import (
    DINOLoss,
    KoLeoLoss,
    dino_global_and_local_terms,
    dino_loss_term_counts,
    iBOTPatchLoss,
)

K = 11


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _probs(rows: int, k: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(rows, k, generator=_generator(seed)) * 3, dim=-1)


def _reference_sinkhorn(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Plain fp64 Sinkhorn-Knopp written from the recipe text: Q = exp(z/τ)ᵀ, alternate row/column sums."""
    q = torch.exp(logits.double() / temp).t()
    n_prototypes, n_samples = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / n_samples
    return (q * n_samples).t()


# ---------------------------------------------------------------- DINO


def test_dino_forward_uniform_student_gives_log_k_per_pair():
    loss = DINOLoss(K)
    students = [torch.zeros(4, K), torch.zeros(4, K)]
    teachers = [_probs(4, K, 0), _probs(4, K, 1), _probs(4, K, 2)]
    assert loss(students, teachers).item() == pytest.approx(6 * math.log(K), rel=1e-6)


def test_dino_forward_matches_fp64_cross_entropy():
    loss = DINOLoss(K, student_temp=0.1)
    students = [torch.randn(5, K, generator=_generator(s)) for s in range(3)]
    teachers = [_probs(5, K, 10 + s) for s in range(2)]
    expected = 0.0
    for s in students:
        log_q = torch.log_softmax(s.double() / 0.1, dim=-1)
        for t in teachers:
            expected += -(t.double() * log_q).sum(-1).mean().item()
    assert loss(students, teachers).item() == pytest.approx(expected, rel=1e-6)


def test_softmax_center_uses_delayed_ema_over_three_steps():
    loss = DINOLoss(K, center_momentum=0.9)
    batches = [torch.randn(6, K, generator=_generator(s)).double().float() for s in range(3)]
    center = torch.zeros(1, K, dtype=torch.float64)
    for step, batch in enumerate(batches):
        probs = loss.softmax_center_teacher(batch, teacher_temp=0.05)
        # The center used at step t only includes batches < t.
        expected = torch.softmax((batch.double() - center) / 0.05, dim=-1)
        torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(loss.center.double(), center, atol=1e-7, rtol=0)
        loss.update_center(batch)
        assert bool(loss.has_pending_update)
        center = 0.9 * center + 0.1 * batch.double().mean(0, keepdim=True)
    loss.apply_pending_center_update()
    torch.testing.assert_close(loss.center.double(), center, atol=1e-7, rtol=0)
    assert loss.center.dtype == torch.float32


def test_sinkhorn_rows_sum_to_one_and_match_fp64_reference():
    loss = DINOLoss(K)
    logits = torch.randn(8, K, generator=_generator(3))
    q = loss.sinkhorn_knopp_teacher(logits, teacher_temp=0.07)
    torch.testing.assert_close(q.sum(-1), torch.ones(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.double(), _reference_sinkhorn(logits, 0.07), atol=1e-6, rtol=1e-5)
    assert q.dtype == torch.float32


def test_dino_term_counts_follow_recipe():
    assert dino_loss_term_counts(8) == (2, 16)  # normaliser 18
    assert dino_loss_term_counts(0) == (2, 1)  # the official floor of 1 local term


def _dinov3_style_terms(student_global, student_local, teacher_natural, n_local, student_temp=0.1):
    """The einsum formulation (dinov3): local mean over all pairs × 16/18; global over s≠t pairs × 2/18."""
    b = teacher_natural.shape[0] // 2
    teacher = teacher_natural.double().view(2, b, -1)
    log_local = torch.log_softmax(student_local.double() / student_temp, -1).view(n_local, b, -1)
    log_global = torch.log_softmax(student_global.double() / student_temp, -1).view(2, b, -1)
    local = -torch.einsum("sbk,tbk->", log_local, teacher) / (b * n_local * 2)
    pair = -torch.einsum("sbk,tbk->st", log_global, teacher)
    pair = pair - torch.diag(torch.diagonal(pair))
    global_ = pair.sum() / (b * 2 * 2 - b * 2)
    n_terms = 2 + 2 * n_local
    return local * (2 * n_local) / n_terms, global_ * 2 / n_terms


@pytest.mark.parametrize("teacher_order", ["natural", "swapped"])
def test_dino_combination_equals_dinov3_einsum_formulation(teacher_order):
    b, n_local = 3, 4
    student_global = torch.randn(2 * b, K, generator=_generator(5))
    student_local = torch.randn(n_local * b, K, generator=_generator(6))
    teacher_natural = _probs(2 * b, K, 7)
    teacher = teacher_natural if teacher_order == "natural" else torch.cat(teacher_natural.chunk(2)[::-1])
    terms = dino_global_and_local_terms(
        DINOLoss(K), student_global, student_local, teacher, teacher_order=teacher_order
    )
    local_ref, global_ref = _dinov3_style_terms(student_global, student_local, teacher_natural, n_local)
    assert terms.local_crops_loss.item() == pytest.approx(local_ref.item(), rel=1e-6)
    assert terms.global_crops_loss.item() == pytest.approx(global_ref.item(), rel=1e-6)


def test_dino_combination_pairs_views_crosswise_only():
    # Student view 1 equals teacher view 1 exactly (low loss if paired same-view) but view 2 is far away:
    # the global term must pair s1 with t2 and s2 with t1.
    b = 2
    t1 = torch.full((b, K), -30.0)
    t1[:, 0] = 30.0
    t2 = torch.full((b, K), -30.0)
    t2[:, 1] = 30.0
    teacher_probs = torch.cat([torch.softmax(t1, -1), torch.softmax(t2, -1)])
    student = torch.cat([t1, t2]) / 10  # log_softmax(student/0.1) puts all mass on the own view's prototype
    terms = dino_global_and_local_terms(DINOLoss(K), student, None, teacher_probs, teacher_order="natural")
    # Each cross term is −log q(prototype of the other view) ≈ 60; a same-view pairing would give ≈ 0.
    # Without local crops the official normaliser is 2 + max(0, 1) = 3.
    cross = -torch.log_softmax(t1, -1)[0, 1].item()
    assert terms.global_crops_loss.item() == pytest.approx(2 * cross / 3, rel=1e-5)
    assert terms.local_crops_loss.item() == 0.0


def test_dino_combination_rejects_bad_order_and_shapes():
    with pytest.raises(ValueError, match="teacher_order"):
        dino_global_and_local_terms(DINOLoss(K), torch.zeros(4, K), None, torch.zeros(4, K), teacher_order="reversed")
    with pytest.raises(ValueError, match="multiple of the batch size"):
        dino_global_and_local_terms(DINOLoss(K), torch.zeros(4, K), torch.zeros(3, K), torch.zeros(4, K), teacher_order="natural")


# ---------------------------------------------------------------- iBOT


def _ibot_batch():
    """4 global crops over N=6 tokens; crop 1 and crop 3 have no masked token."""
    masks = torch.tensor(
        [
            [1, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    m = int(masks.sum())
    student = torch.randn(m, K, generator=_generator(8))
    teacher = _probs(m, K, 9)
    return masks, student, teacher


def test_ibot_forward_masked_is_mean_of_per_crop_means_over_all_crops():
    masks, student, teacher = _ibot_batch()
    ce = -(teacher.double() * torch.log_softmax(student.double() / 0.1, -1)).sum(-1)
    # crop 0 owns tokens 0..2, crop 2 owns token 3; crops 1 and 3 count as 0 in the mean over 4 crops.
    expected = (ce[:3].mean() + ce[3]) / 4
    loss = iBOTPatchLoss(K).forward_masked(student, teacher, masks)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_ibot_forward_masked_ignores_upperbound_padding_and_accepts_weights():
    masks, student, teacher = _ibot_batch()
    m = student.shape[0]
    upperbound = m + 5
    # Rows past M stand for the head's output on the zero padding of the static buffer.
    padded_student = torch.cat([student, torch.randn(upperbound - m, K, generator=_generator(1)) * 100])
    padded_teacher = torch.cat([teacher, _probs(upperbound - m, K, 2)])
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    module = iBOTPatchLoss(K)
    plain = module.forward_masked(student, teacher, masks)
    padded = module.forward_masked(padded_student, padded_teacher, masks, n_masked_patches=m, masks_weight=weights)
    assert padded.item() == pytest.approx(plain.item(), rel=1e-6)


def test_ibot_center_is_mean_over_masked_tokens_and_skips_empty_batches():
    loss = iBOTPatchLoss(K, center_momentum=0.9)
    tokens = torch.randn(7, K, generator=_generator(2))
    loss.update_center(tokens)
    loss.softmax_center_teacher(tokens, teacher_temp=0.05)
    torch.testing.assert_close(loss.center, 0.1 * tokens.mean(0).view(1, 1, K), atol=1e-7, rtol=0)
    before = loss.center.clone()
    loss.update_center(tokens[:0])
    loss.apply_pending_center_update()
    assert torch.equal(loss.center, before) and not torch.isnan(loss.center).any()


def test_ibot_sinkhorn_uses_masked_count_and_leaves_it_untouched():
    logits = torch.randn(5, K, generator=_generator(4))
    count = torch.tensor([5])
    q = iBOTPatchLoss(K).sinkhorn_knopp_teacher(logits, 0.06, n_masked_patches_tensor=count)
    torch.testing.assert_close(q.double(), _reference_sinkhorn(logits, 0.06), atol=1e-6, rtol=1e-5)
    assert count.tolist() == [5]


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("loss_cls", [DINOLoss, iBOTPatchLoss])
def test_state_dict_between_steps_resumes_bit_exactly(loss_cls):
    batches = [torch.randn(6, K, generator=_generator(20 + s)) for s in range(4)]

    def step(module, batch):
        probs = module.softmax_center_teacher(batch, teacher_temp=0.04)
        module.update_center(batch)
        return probs

    uninterrupted = loss_cls(K)
    reference = [step(uninterrupted, b) for b in batches]

    first = loss_cls(K)
    for b in batches[:2]:
        step(first, b)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert set(state) == {"center", "pending_batch_center", "has_pending_update"}
    assert state["center"].dtype == torch.float32 and bool(state["has_pending_update"])

    resumed = loss_cls(K)
    resumed.load_state_dict(state)
    for expected, b in zip(reference[2:], batches[2:]):
        assert torch.equal(step(resumed, b), expected)
    resumed.apply_pending_center_update()
    uninterrupted.apply_pending_center_update()
    assert torch.equal(resumed.center, uninterrupted.center)


# ---------------------------------------------------------------- KoLeo


def test_koleo_points_on_a_circle():
    n = 8
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    radii = torch.linspace(0.5, 3.0, n, dtype=torch.float64)  # normalisation makes the radius irrelevant
    points = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=1)
    chord = 2 * math.sin(math.pi / n)
    # Both tied neighbours are one chord away. ε enters inside the norm (added to each coordinate of the
    # difference, shifting the distance by at most √2·ε) and before the log: well inside 1e-7.
    loss = KoLeoLoss()(points)
    assert loss.item() == pytest.approx(-math.log(chord), abs=1e-7)


def test_koleo_simplex_vertices():
    vertices = torch.eye(5) * torch.tensor([1.0, 2.0, 0.5, 4.0, 3.0]).unsqueeze(1)
    assert KoLeoLoss()(vertices).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)


def test_koleo_duplicate_points_take_the_eps_path():
    d = 4
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0], [-1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    per_point = KoLeoLoss()
    # Points 0 and 1 are the same direction: their distance is ‖0 + ε·1‖ = √d·ε, then + ε before the log.
    duplicate_term = -math.log(math.sqrt(d) * 1e-8 + 1e-8)
    unit = x / x.norm(dim=1, keepdim=True)
    third = -math.log((unit[2] - unit[0] + 1e-8).norm().item() + 1e-8)
    expected = (2 * duplicate_term + third) / 3
    assert per_point(x).item() == pytest.approx(expected, rel=1e-9)


def test_koleo_random_batch_matches_bruteforce_reference_and_has_gradients():
    x = torch.randn(16, 7, generator=_generator(11), dtype=torch.float64, requires_grad=True)
    loss = KoLeoLoss()(x)
    unit = x.detach() / x.detach().norm(dim=1, keepdim=True).clamp(min=1e-8)
    distances = torch.cdist(unit, unit) + torch.eye(16, dtype=torch.float64) * 10
    nn_index = distances.argmin(dim=1)
    d = (unit - unit[nn_index] + 1e-8).norm(dim=1)
    assert loss.item() == pytest.approx((-torch.log(d + 1e-8)).mean().item(), rel=1e-9)
    loss.backward()
    # Gradients reach every point that is somebody's neighbour or has a neighbour (here: all).
    assert (x.grad.norm(dim=1) > 0).all()


def test_koleo_single_row_contributes_zero():
    x = torch.randn(1, 5, requires_grad=True)
    loss = KoLeoLoss()(x)
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None


# ---------------------------------------------------------------- official parity


@pytest.mark.official
def test_official_parity_dino_both_centerings_and_combination():
    official = pytest.importorskip("dinov2.loss")
    b, n_local, steps = 4, 3, 3
    ours, theirs = DINOLoss(K), official.DINOLoss(K)
    for step in range(steps):
        teacher_logits = torch.randn(2 * b, K, generator=_generator(100 + step))
        swapped = torch.cat(teacher_logits.chunk(2)[::-1])
        student_global = torch.randn(2 * b, K, generator=_generator(200 + step))
        student_local = torch.randn(n_local * b, K, generator=_generator(300 + step))
        for centering in ("centering", "sinkhorn_knopp"):
            if centering == "centering":
                p_ours = ours.softmax_center_teacher(swapped, 0.05)
                p_theirs = theirs.softmax_center_teacher(swapped, 0.05)
                ours.update_center(swapped)
                theirs.update_center(swapped)
            else:
                p_ours = ours.sinkhorn_knopp_teacher(swapped, 0.05)
                p_theirs = theirs.sinkhorn_knopp_teacher(swapped, 0.05)
            torch.testing.assert_close(p_ours, p_theirs, atol=1e-7, rtol=0)
            terms = dino_global_and_local_terms(ours, student_global, student_local, p_ours, teacher_order="swapped")
            teacher_list = p_theirs.view(2, b, K)
            n_terms = 2 + 2 * n_local
            local_ref = theirs(list(student_local.chunk(n_local)), teacher_list) / n_terms
            global_ref = theirs([student_global], [teacher_list.flatten(0, 1)]) * 2 / n_terms
            assert terms.local_crops_loss.item() == pytest.approx(local_ref.item(), abs=1e-6)
            assert terms.global_crops_loss.item() == pytest.approx(global_ref.item(), abs=1e-6)
    ours.apply_pending_center_update()
    theirs.apply_center_update()
    torch.testing.assert_close(ours.center, theirs.center, atol=0, rtol=0)


@pytest.mark.official
@pytest.mark.filterwarnings("ignore:.*torch.cuda.amp.autocast:FutureWarning")
def test_official_parity_ibot_and_koleo():
    official = pytest.importorskip("dinov2.loss")
    masks, student, _ = _ibot_batch()
    teacher_logits = torch.randn(student.shape[0], K, generator=_generator(12))
    ours, theirs = iBOTPatchLoss(K), official.iBOTPatchLoss(K)
    for _ in range(2):
        p_ours = ours.softmax_center_teacher(teacher_logits.unsqueeze(0), 0.05).squeeze(0)
        p_theirs = theirs.softmax_center_teacher(teacher_logits.unsqueeze(0), 0.05).squeeze(0)
        torch.testing.assert_close(p_ours, p_theirs, atol=0, rtol=0)
        ours.update_center(teacher_logits.unsqueeze(0))
        theirs.update_center(teacher_logits.unsqueeze(0))
    loss_ours = ours.forward_masked(student, p_ours, masks, n_masked_patches=student.shape[0])
    loss_theirs = theirs.forward_masked(student, p_theirs, masks, n_masked_patches=student.shape[0])
    assert loss_ours.item() == pytest.approx(loss_theirs.item(), abs=1e-6)
    x = torch.randn(12, 9, generator=_generator(13))
    x[3] = x[7] * 2  # a duplicate direction exercises the ε path
    assert KoLeoLoss()(x).item() == pytest.approx(official.KoLeoLoss()(x).item(), abs=1e-6)


@pytest.mark.official
def test_official_parity_dino_fp64_to_1e10():
    official = pytest.importorskip("dinov2.loss")
    b, n_local = 4, 8
    teacher_logits = torch.randn(2 * b, K, generator=_generator(400), dtype=torch.float64)
    swapped = torch.cat(teacher_logits.chunk(2)[::-1])
    student_global = torch.randn(2 * b, K, generator=_generator(401), dtype=torch.float64)
    student_local = torch.randn(n_local * b, K, generator=_generator(402), dtype=torch.float64)
    ours, theirs = DINOLoss(K), official.DINOLoss(K)
    p_ours, p_theirs = ours.softmax_center_teacher(swapped, 0.04), theirs.softmax_center_teacher(swapped, 0.04)
    assert p_ours.dtype == torch.float64
    terms = dino_global_and_local_terms(ours, student_global, student_local, p_ours, teacher_order="swapped")
    teacher_list = p_theirs.view(2, b, K)
    local_ref = theirs(list(student_local.chunk(n_local)), teacher_list) / 18
    global_ref = theirs([student_global], [teacher_list.flatten(0, 1)]) * 2 / 18
    assert abs(terms.local_crops_loss.item() - local_ref.item()) <= 1e-10
    assert abs(terms.global_crops_loss.item() - global_ref.item()) <= 1e-10


@pytest.mark.official
def test_official_parity_sinkhorn_inside_a_process_group(tmp_path):
    # The official iBOT Sinkhorn-Knopp always all-reduces, so it needs a (here single-rank gloo) group.
    official = pytest.importorskip("dinov2.loss")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        tokens = torch.randn(9, K, generator=_generator(500)) / 4
        count = torch.tensor([9])
        ours = iBOTPatchLoss(K).sinkhorn_knopp_teacher(tokens, 0.05, n_masked_patches_tensor=count)
        theirs = official.iBOTPatchLoss(K).sinkhorn_knopp_teacher(tokens, 0.05, n_masked_patches_tensor=count.clone())
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
        cls = torch.randn(6, K, generator=_generator(501)) / 4
        torch.testing.assert_close(
            DINOLoss(K).sinkhorn_knopp_teacher(cls, 0.05), official.DINOLoss(K).sinkhorn_knopp_teacher(cls, 0.05), atol=0, rtol=0
        )
    finally:
        dist.destroy_process_group()
