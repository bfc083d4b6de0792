"""Two gloo processes holding halves of a batch reproduce the single-process losses on the whole batch:
DINO Sinkhorn-Knopp, iBOT Sinkhorn-Knopp with the global masked count, and both center EMAs
(DINO: token-weighted mean over all rows; iBOT: mean of per-rank means)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2_core.losses import DINOLoss, iBOTPatchLoss

K = 13
TEMP = 0.06
# Unequal splits on purpose: rank 0 / rank 1 row counts.
DINO_ROWS = (3, 5)
IBOT_TOKENS = (4, 9)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "dino": torch.randn(sum(DINO_ROWS), K, generator=g),
        "ibot": torch.randn(sum(IBOT_TOKENS), K, generator=g),
    }


def _split(tensor: torch.Tensor, sizes: tuple[int, int], rank: int) -> torch.Tensor:
    return tensor.split(list(sizes))[rank]


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        data = _inputs()
        dino_rows = _split(data["dino"], DINO_ROWS, rank)
        ibot_tokens = _split(data["ibot"], IBOT_TOKENS, rank)

        dino = DINOLoss(K)
        dino_sk = dino.sinkhorn_knopp_teacher(dino_rows, TEMP)
        dino.softmax_center_teacher(dino_rows, TEMP)
        dino.update_center(dino_rows)
        # A checkpoint taken while the all-reduce is in flight must hold the reduced statistics.
        dino_state = {k: v.clone() for k, v in dino.state_dict().items()}
        dino.apply_pending_center_update()

        ibot = iBOTPatchLoss(K)
        count = torch.tensor([ibot_tokens.shape[0]])
        ibot_sk = ibot.sinkhorn_knopp_teacher(ibot_tokens, TEMP, n_masked_patches_tensor=count)
        ibot.softmax_center_teacher(ibot_tokens, TEMP)
        ibot.update_center(ibot_tokens)
        ibot.apply_pending_center_update()

        torch.save(
            {
                "dino_sk": dino_sk,
                "dino_center": dino.center,
                "dino_state": dino_state,
                "ibot_sk": ibot_sk,
                "ibot_center": ibot.center,
                "count_after": count,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_single_process_on_concatenated_batch(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "pg_init"), str(out_dir)), nprocs=2, join=True)
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]
    data = _inputs()

    single_dino = DINOLoss(K)
    expected_dino_sk = single_dino.sinkhorn_knopp_teacher(data["dino"], TEMP)
    torch.testing.assert_close(torch.cat([r["dino_sk"] for r in ranks]), expected_dino_sk, atol=1e-6, rtol=1e-5)

    single_ibot = iBOTPatchLoss(K)
    expected_ibot_sk = single_ibot.sinkhorn_knopp_teacher(
        data["ibot"], TEMP, n_masked_patches_tensor=torch.tensor([sum(IBOT_TOKENS)])
    )
    torch.testing.assert_close(torch.cat([r["ibot_sk"] for r in ranks]), expected_ibot_sk, atol=1e-6, rtol=1e-5)
    assert [r["count_after"].item() for r in ranks] == list(IBOT_TOKENS)

    single_dino.update_center(data["dino"])
    single_dino.apply_pending_center_update()
    for r in ranks:
        torch.testing.assert_close(r["dino_center"], single_dino.center, atol=1e-7, rtol=1e-6)
        state = r["dino_state"]
        assert bool(state["has_pending_update"])
        torch.testing.assert_close(state["pending_batch_center"], data["dino"].mean(0, keepdim=True), atol=1e-6, rtol=1e-6)

    ibot_parts = [_split(data["ibot"], IBOT_TOKENS, rank) for rank in range(2)]
    mean_of_means = (ibot_parts[0].mean(0) + ibot_parts[1].mean(0)) / 2
    for r in ranks:
        torch.testing.assert_close(r["ibot_center"], 0.1 * mean_of_means.view(1, 1, K), atol=1e-7, rtol=1e-6)
    # Not the token-weighted mean: the splits are unequal, so the two differ.
    assert not torch.allclose(ranks[0]["ibot_center"], 0.1 * data["ibot"].mean(0).view(1, 1, K), atol=1e-5)
