"""DINO / iBOT projection head with the official structure and state-dict keys.

``mlp`` (Linear → GELU → … → Linear to the bottleneck) → L2 normalisation → ``last_layer``, a
weight-normalised Linear without bias whose magnitude ``weight_g`` starts at 1 and stays trainable.

``last_layer`` is :class:`WeightNormLinear`, which holds ``weight_g``/``weight_v`` as ordinary
parameters and forms ``g·v/‖v‖`` in ``forward``. The two library variants do not fit: the classic
``torch.nn.utils.weight_norm`` caches a non-leaf ``weight`` tensor so ``copy.deepcopy`` (teacher =
copy of student) raises, and the parametrization variant names its parameters
``parametrizations.weight.original0/1``, so FSDP2 / ``torch.distributed.checkpoint`` keys would differ
from the official ``last_layer.weight_g``/``weight_v`` keys.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.init import trunc_normal_


#: Fills a tensor in place from its shape alone (and the global RNG), e.g. ``partial(trunc_normal_, std=0.02)``.
ParameterInit = Callable[[Tensor], Any]


def conv_default_inits(prefix: str, conv: nn.Conv2d) -> list[tuple[str, ParameterInit]]:
    """``nn.Conv2d.reset_parameters`` as per-parameter inits (the bias bound comes from the weight's fan-in)."""
    fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    inits: list[tuple[str, ParameterInit]] = [(f"{prefix}.weight", partial(nn.init.kaiming_uniform_, a=5**0.5))]
    if conv.bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
        inits.append((f"{prefix}.bias", partial(nn.init.uniform_, a=-bound, b=bound)))
    return inits


class WeightNormLinear(nn.Module):
    """``y = x · (g · v / ‖v‖_row)ᵀ`` with ``weight_g`` (out, 1) and ``weight_v`` (out, in); no bias."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # v starts like nn.Linear's default weight; g = 1 (not ‖v‖) as in the official DINO head
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)
        self.weight_g.fill_(1.0)

    @property
    def weight(self) -> Tensor:
        norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(width, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        width = hidden_dim
    layers.append(nn.Linear(width, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ):
        """``out_dim`` = number of prototypes K; keys ``mlp.0/2/4.*`` (nlayers=3, no BN), ``last_layer.weight_g/_v``."""
        super().__init__()
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for name, init in self.parameter_inits():
            init(self.get_parameter(name))
        for module in self.mlp.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()

    def parameter_inits(self) -> list[tuple[str, ParameterInit]]:
        """``(parameter name, in-place init)`` in init order; each depends only on the parameter's full shape
        (see ``DinoVisionTransformer.parameter_inits``). BatchNorm running statistics are buffers, reset
        by :meth:`init_weights` only."""
        inits: list[tuple[str, ParameterInit]] = []
        for prefix, module in self.mlp.named_modules(prefix="mlp"):
            if isinstance(module, nn.Linear):
                inits.append((f"{prefix}.weight", partial(trunc_normal_, std=0.02)))
                if module.bias is not None:
                    inits.append((f"{prefix}.bias", nn.init.zeros_))
            elif isinstance(module, nn.BatchNorm1d):
                inits += [(f"{prefix}.weight", nn.init.ones_), (f"{prefix}.bias", nn.init.zeros_)]
        # v starts like nn.Linear's default weight; g = 1 (not ‖v‖) as in the official DINO head
        inits += [("last_layer.weight_v", partial(nn.init.kaiming_uniform_, a=5**0.5)),
                  ("last_layer.weight_g", nn.init.ones_)]
        return inits

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
