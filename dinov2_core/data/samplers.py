"""Infinite sharded sampler whose position is plain state (saved in checkpoints, reshardable).

There is one global stream: the concatenation of seeded permutations of the dataset (pass ``p`` uses
seed ``seed + (p << 24)``, as the official ``SHARDED_INFINITE`` sampler reshuffles each pass). Global
batch ``k`` is the slice ``[start + k·B·W, start + (k+1)·B·W)`` of that stream, and rank ``r`` takes
its elements ``r, r + W, …``. The state is the global stream position only, so a run saved at one
world size resumes at another on exactly the following samples.

Each yielded item is ``(stream_position, dataset_index)``: the position seeds the augmentation of
that sample, so a resumed run draws the same crops.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteShardedSampler(Sampler[tuple[int, int]]):
    def __init__(self, dataset_size: int, rank: int, world_size: int, seed: int, start: int = 0) -> None:
        if dataset_size <= 0:
            raise ValueError("InfiniteShardedSampler: the dataset is empty")
        self.dataset_size = dataset_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start

    def _permutation(self, pass_index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + (pass_index << 24))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        pass_index = -1
        permutation = None
        while True:
            current = position // self.dataset_size
            if current != pass_index:
                pass_index, permutation = current, self._permutation(current)
            yield position, int(permutation[position % self.dataset_size])
            position += self.world_size

    def __len__(self) -> int:  # effectively infinite; DataLoader only needs it for progress displays
        return 2**62
