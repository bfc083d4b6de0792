"""Fixtures for evaluation tests: an oracle "backbone" and small generated datasets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dinov2_core.data.synthetic import make_classification_splits, make_segmentation_dataset

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class OneHotOracle(nn.Module):
    """The backbone surface, with features that ARE the one-hot class of a solid red/green/blue image
    (the channel with the largest mean), so every protocol must reach 100 %."""

    embed_dim = 3
    patch_size = 8
    n_blocks = 4

    def _one_hot(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(x.mean(dim=(2, 3)).argmax(dim=1), 3).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._one_hot(x)

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        cls = self._one_hot(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = cls[:, :, None, None].expand(-1, -1, h, w)
        if not reshape:
            patches = patches.flatten(2).transpose(1, 2)
        layers = [(patches, cls) if return_class_token else patches for _ in range(n)]
        return tuple(layers)


def write_colour_folder(root: str, per_class: int, seed: int, size: int = 16) -> str:
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.asarray(rgb) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.png"))
    return root


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("colours")
    return {
        "train": write_colour_folder(str(base / "train"), 12, seed=0),
        "test": write_colour_folder(str(base / "test"), 5, seed=1),
    }


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("synthetic")
    splits = make_classification_splits(str(base / "cls"), num_classes=4, train_per_class=16, test_per_class=6)
    segmentation = make_segmentation_dataset(str(base / "seg"), num_images=16, image_size=32)
    return {"train": splits["train"], "test": splits["test"], "seg": segmentation}
