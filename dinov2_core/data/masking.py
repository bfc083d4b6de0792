"""Block-wise (BEiT-style) patch-mask generator for iBOT (recipe §4.2).

A mask with a target number T of masked patches is built by repeatedly dropping random rectangles
(area ~ U(min_num_patches, min(T − count, max_num_patches)), log-uniform aspect ratio in
[min_aspect, max_aspect]) onto the patch grid. A rectangle is accepted when it covers between 1 and
``min(T − count, max_num_patches)`` new cells; each rectangle gets up to 10 tries and generation stops
when T is reached or a rectangle adds nothing, so the count never exceeds T and can fall short.

Randomness comes from a ``random.Random`` passed per call (default: the module-level ``random``
state), drawn in the same order as the official generator, so equal seeds give equal masks.
"""

from __future__ import annotations

import math
import random
import torch
from torch import Tensor

_TRIES_PER_RECTANGLE = 10


def official_max_num_patches(image_size: int, patch_size: int) -> float:
    """The cap the official trainer passes: ``0.5·S // p · S // p`` evaluated left to right.

    That is half the grid (128 for 224/14) whenever S/p is even, slightly less otherwise (666 rather
    than 684.5 for 518/14).
    """
    return 0.5 * image_size // patch_size * image_size // patch_size


class MaskingGenerator:
    """Callable ``(num_masking_patches, rng=None) -> (H, W) bool tensor`` for a fixed patch grid."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"input_size: {input_size!r} must be positive")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect: {min_aspect!r} must be > 0")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            raise ValueError("max_num_patches: give max_num_patches or num_masking_patches")
        upper_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(upper_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, area [{self.min_num_patches}, {self.max_num_patches}], "
            f"log-aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def _add_rectangle(self, mask: Tensor, cap: float, rng: random.Random) -> int:
        """Try up to 10 rectangles; mark the first acceptable one. Returns the number of new cells."""
        for _ in range(_TRIES_PER_RECTANGLE):
            area = rng.uniform(self.min_num_patches, cap)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= self.height or w >= self.width:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            newly_covered = h * w - int(window.sum())
            if 0 < newly_covered <= cap:
                window.fill_(True)
                return newly_covered
        return 0

    def __call__(self, num_masking_patches: int = 0, rng: random.Random | None = None) -> Tensor:
        source = random if rng is None else rng
        mask = torch.zeros((self.height, self.width), dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            cap = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_rectangle(mask, cap, source)
            if added == 0:
                break
            count += added
        return mask
