"""Image datasets backed by a manifest of URIs (local paths or ``s3://``), for SSL training.

``ManifestDataset`` decodes with :func:`dinov2_core.data.image_io.load_image`; an image that cannot
be decoded yields ``None`` (the collate function drops it) and is counted by reason. Counts are kept
per process; the trainer reads them from the collated batch (``n_skipped``) rather than from the
dataset object, because DataLoader workers hold their own copies.

Augmentation randomness is drawn from a generator seeded by ``(seed, stream_position)``, so the same
sample at the same position of the training stream always gets the same crops, in any worker, in a
resumed run and after resharding.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov2_core.data.image_io import ImageDecodeError, load_image
from dinov2_core.data.manifest import ManifestRecord, read_manifest


def sample_seed(seed: int, stream_position: int, salt: int = 0) -> int:
    """A 63-bit seed mixing the run seed, a stream position and a salt (different uses, same position)."""
    value = (seed * 0x9E3779B97F4A7C15 + stream_position * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & (2**63 - 1)
    return value


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch / numpy / python RNGs for a block, then restore their previous states."""
    saved = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


class ManifestDataset(Dataset):
    """``dataset[(stream_position, index)]`` → transformed sample, or ``None`` for a corrupt image.

    ``seeded=False`` calls ``transform`` without seeding the RNGs, for a deterministic transform (e.g.
    decode-and-resize for the batched augmentation), where seeding would cost more than the transform.
    """

    def __init__(self, manifest_uri: str, transform: Callable[[Any], Any] | None = None, seed: int = 0,
                 records: list[ManifestRecord] | None = None, seeded: bool = True) -> None:
        self.manifest_uri = manifest_uri
        self.records = records if records is not None else read_manifest(manifest_uri)
        if not self.records:
            raise ValueError(f"manifest {manifest_uri!r} lists no images")
        self.transform = transform
        self.seed = seed
        self.seeded = seeded
        self.skipped: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        stream_position, index = key if isinstance(key, tuple) else (key, key)
        record = self.records[index]
        try:
            image = load_image(record.uri)
        except ImageDecodeError as err:
            self.skipped[err.reason] += 1
            return None
        if self.transform is None:
            return image
        if not self.seeded:
            return self.transform(image)
        with seeded_rngs(sample_seed(self.seed, stream_position)):
            return self.transform(image)
