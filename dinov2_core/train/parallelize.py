"""FSDP2 sharding, mixed precision, activation checkpointing and ``torch.compile`` for the SSL model.

With more than one rank every transformer block is its own ``fully_shard`` unit (the dinov3 layout),
and each of the backbone and heads is a root over them, on CPU (gloo) and GPU (nccl, bf16 parameters
with fp32 gradient reduction). With one rank there is nothing to shard and FSDP2's hooks cost
1.2-1.9x per step on CPU (bench/bench_fsdp_overhead.py), so the modules stay plain and mixed precision
comes from ``torch.autocast`` around each backbone and head; checkpoints are keyed by parameter name
either way (DCP), so a one-rank checkpoint loads sharded and back. Parameters stay fp32 in the optimizer.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def compute_dtype(device: torch.device, preference: str) -> torch.dtype:
    if preference == "bf16" or (preference == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def shards_parameters(world_size: int) -> bool:
    """Whether the model is wrapped with FSDP2: only when there is more than one rank to shard over."""
    return world_size > 1


def apply_autocast(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Run ``module``'s forward under autocast to ``dtype`` (the unsharded stand-in for FSDP2's policy).

    Only the networks' forwards are wrapped, not the whole step, so the losses stay in fp32 as in the
    sharded path; a no-op for fp32.
    """
    if dtype == torch.float32:
        return
    module.forward = functools.partial(_autocast_forward, module.forward, device.type, dtype)


def _autocast_forward(forward, device_type: str, dtype: torch.dtype, *args, **kwargs):
    with torch.autocast(device_type, dtype=dtype):
        return forward(*args, **kwargs)


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
    """target ← m·target + (1−m)·source on local shards: no communication, same sharding on both sides.

    ``_foreach_lerp_`` does it in one pass over memory (1.4x faster than a multiply then an add).
    """
    target_params = local_tensors([p.data for p in target.parameters()])
    source_params = local_tensors([p.data for p in source.parameters()])
    torch._foreach_lerp_(target_params, source_params, 1.0 - momentum)


def clip_grad_norms(modules: list[nn.Module], max_norm: float) -> None:
    """Clip each module's gradient norm separately (backbone and each head, as the official code);
    ``max_norm`` 0 disables clipping. ``clip_grad_norm_`` reduces DTensor norms across ranks itself."""
    if max_norm <= 0:
        return
    for module in modules:
        params = [p for p in module.parameters() if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def build_adamw(param_groups: list[dict], betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with the fused kernel (about 4x faster than ``foreach`` per ViT-S step on CPU), or the
    ``foreach`` one where this build has no fused kernel for the parameters' device."""
    try:
        return torch.optim.AdamW(param_groups, betas=betas, lr=0.0, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(param_groups, betas=betas, lr=0.0, foreach=True)


@torch.no_grad()
def initialise_parameters(module: nn.Module) -> None:
    """Run ``module.parameter_inits()`` on its (possibly sharded) parameters, world-size independently.

    A sharded parameter is drawn full-size on its device, one at a time (peak: the largest parameter,
    not the model), and each rank keeps its shard: every rank draws the same numbers in the same order,
    so the weights equal those of an unsharded init with the same seed, at any world size.
    """
    for name, init in module.parameter_inits():
        param = module.get_parameter(name)
        if isinstance(param, DTensor):
            full = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
            init(full)
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
        else:
            init(param)
