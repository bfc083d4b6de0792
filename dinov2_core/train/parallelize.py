"""FSDP2 sharding, mixed precision, activation checkpointing and ``torch.compile`` for the SSL model.

Every transformer block is its own ``fully_shard`` unit (the dinov3 layout), and each of the
backbone and heads is a root over them; this runs the same on 1 or N ranks, on CPU (gloo, fp32) and
GPU (nccl, bf16 parameters with fp32 gradient reduction). Parameters stay fp32 in the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def compute_dtype(device: torch.device, preference: str) -> torch.dtype:
    if preference == "bf16" or (preference == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The real blocks of a backbone, whether it keeps them flat or in ``BlockChunk`` units."""
    blocks: list[nn.Module] = []
    for module in backbone.blocks:
        if isinstance(module, nn.ModuleList):
            blocks.extend(block for block in module if not isinstance(block, nn.Identity))
        else:
            blocks.append(module)
    return blocks


def apply_activation_checkpointing(backbone: nn.Module) -> None:
    """Recompute each block's activations in backward (composable API, compatible with FSDP2)."""
    from torch.distributed._composable import checkpoint

    for block in transformer_blocks(backbone):
        checkpoint(block)


def apply_compile(backbone: nn.Module) -> None:
    """Compile each block separately: shapes repeat across blocks, so one graph serves all."""
    for block in transformer_blocks(backbone):
        block.compile()


def shard_model(module: nn.Module, param_dtype: torch.dtype, reshard_after_forward: bool = True,
                is_backbone: bool = False) -> nn.Module:
    """``fully_shard`` the blocks of a backbone, then the module itself as root."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if is_backbone:
        for block in transformer_blocks(module):
            fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return module


def local_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The local shards of DTensor parameters (plain tensors pass through)."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in params]


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target ← m·target + (1−m)·source on local shards: no communication, same sharding on both sides."""
    target_params = local_tensors([p.data for p in target.parameters()])
    source_params = local_tensors([p.data for p in source.parameters()])
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, source_params, alpha=1.0 - momentum)
