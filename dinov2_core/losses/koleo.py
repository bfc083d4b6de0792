"""KoLeo (Kozachenko-Leonenko) differential-entropy regulariser on a batch of embeddings (recipe §3.3).

Spreads the student's global-crop cls embeddings on the sphere by penalising small nearest-neighbour
distances: loss = −mean_i log(‖x̂_i − x̂_NN(i) + ε‖ + ε) with x̂ = x / max(‖x‖, ε) and ε = 1e-8. Note the
ε *inside* the norm (added to the difference vector, as ``F.pairwise_distance`` does) and again outside
the log; exact duplicates therefore give d = √D·ε rather than 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    """Callable on (B, D) embeddings → scalar. Per call, per rank; no gather across ranks.

    The caller applies the recipe's weighting: 0.1 × (KoLeo(view1 rows) + KoLeo(view2 rows)).
    Autocast is disabled inside but inputs are not up-cast (as in the official code).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, embeddings: Tensor) -> Tensor:
        if embeddings.dim() != 2:
            raise ValueError(f"KoLeoLoss expects (B, D) embeddings, got shape {tuple(embeddings.shape)}")
        if embeddings.shape[0] < 2:
            # No neighbour exists; contribute nothing rather than the constant −log(√D·ε + ε).
            return embeddings.sum() * 0.0
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            unit = F.normalize(embeddings, p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                similarity = unit @ unit.t()
                similarity.fill_diagonal_(-1.0)
                neighbour = similarity.argmax(dim=1)
            distances = F.pairwise_distance(unit, unit[neighbour], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
