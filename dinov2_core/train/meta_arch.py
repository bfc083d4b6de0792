"""The self-distillation meta-architecture: student, teacher (EMA or frozen), heads and losses.

One module holds everything that a checkpoint must restore: ``student`` and ``teacher``
(``ModuleDict`` of ``backbone``, ``dino_head`` and, with ``ibot.separate_head``, ``ibot_head``), the
loss modules (their centers are buffers) and, when distilling, ``model_ema`` (a spare EMA of the
student, the exported model of that phase).

Per step (recipe §3 and §5.1):

1. Teacher, no grad, on the 2B unmasked global crops: cls halves swapped to [view2; view1], masked
   patch tokens gathered into a zero-padded buffer of static length ``upperbound``, heads, then
   softmax centering (delayed EMA center) or Sinkhorn-Knopp.
2. Student, one backbone call over [global crops (masked; unmasked when distilling), local crops].
3. Losses: DINO local + global (/ (n_global_terms + n_local_terms)), KoLeo on the student global cls
   tokens per view, iBOT on the masked tokens.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from dinov2_core.losses.dino_clstoken import DINOLoss, dino_global_and_local_terms
from dinov2_core.losses.ibot_patch import iBOTPatchLoss
from dinov2_core.losses.koleo import KoLeoLoss
from dinov2_core.models import DINOHead, build_backbone
from dinov2_core.train.config import TrainConfig
from dinov2_core.train.parallelize import ema_update, initialise_parameters

LOSS_KEYS = ("dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss")
#: Logged next to the losses. ``dino_target_entropy`` is the mean entropy of the teacher's DINO targets
#: over ln K: near 1.0 the targets are uniform and the DINO terms teach nothing (uniform collapse).
DIAGNOSTIC_KEYS = ("dino_target_entropy",)


def normalized_entropy(probabilities: Tensor) -> Tensor:
    """Mean row entropy of ``(N, K)`` probabilities divided by ln K (0 = one-hot, 1 = uniform)."""
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1).mean()
    return entropy / math.log(probabilities.shape[-1])


def backbone_kwargs(cfg: TrainConfig, drop_path: bool) -> dict[str, Any]:
    """Official builder kwargs for the configured student (``img_size`` = global crop size)."""
    s = cfg.student
    return {
        "img_size": cfg.crops.global_crops_size,
        "patch_size": s.patch_size,
        "drop_path_rate": s.drop_path_rate if drop_path else 0.0,
        "drop_path_uniform": s.drop_path_uniform,
        "init_values": s.layerscale,
        "ffn_layer": s.ffn_layer,
        "block_chunks": s.block_chunks,
        "qkv_bias": s.qkv_bias,
        "proj_bias": s.proj_bias,
        "ffn_bias": s.ffn_bias,
        "num_register_tokens": s.num_register_tokens,
        "interpolate_antialias": s.interpolate_antialias,
        "interpolate_offset": s.interpolate_offset,
    }


def build_heads(cfg: TrainConfig, embed_dim: int) -> dict[str, nn.Module]:
    heads: dict[str, nn.Module] = {
        "dino_head": DINOHead(embed_dim, cfg.dino.head_n_prototypes, nlayers=cfg.dino.head_nlayers,
                              hidden_dim=cfg.dino.head_hidden_dim, bottleneck_dim=cfg.dino.head_bottleneck_dim)
    }
    if cfg.ibot.separate_head:
        heads["ibot_head"] = DINOHead(embed_dim, cfg.ibot.head_n_prototypes, nlayers=cfg.ibot.head_nlayers,
                                      hidden_dim=cfg.ibot.head_hidden_dim, bottleneck_dim=cfg.ibot.head_bottleneck_dim)
    return heads


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: TrainConfig, teacher: nn.ModuleDict | None = None, on_meta: bool = False) -> None:
        """``teacher`` given → distillation: it is frozen and the student keeps a spare EMA instead.

        ``on_meta``: build the networks (student, teacher, EMA) on the meta device, without memory or
        init; the trainer shards them, materialises them with ``to_empty`` and calls
        :meth:`initialise_weights`. The loss modules (small buffers) are always built for real.
        """
        super().__init__()
        self.cfg = cfg
        self.distilling = teacher is not None
        arch = cfg.student.arch
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            # Distilled students train without stochastic depth (recipe §5.7).
            student_backbone = build_backbone(arch, **backbone_kwargs(cfg, drop_path=not self.distilling))
            self.student = nn.ModuleDict({"backbone": student_backbone,
                                          **build_heads(cfg, student_backbone.embed_dim)})
            if teacher is None:
                teacher_backbone = build_backbone(arch, **backbone_kwargs(cfg, drop_path=False))
                teacher = nn.ModuleDict({"backbone": teacher_backbone, **build_heads(cfg, teacher_backbone.embed_dim)})
            self.teacher = teacher
            if self.distilling:
                self.model_ema = copy.deepcopy(self.student)
                self.model_ema.requires_grad_(False)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if not on_meta:
            self.copy_student_to_ema()
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        ibot_dim = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()

    def networks(self) -> list[nn.ModuleDict]:
        """The backbone + heads groups that are sharded and checkpointed: student, teacher (, student EMA)."""
        return [self.student, self.teacher] + ([self.model_ema] if self.distilling else [])

    @torch.no_grad()
    def initialise_weights(self) -> None:
        """Official init of the student (sharded or not, after ``to_empty``: the same weights at any world
        size for a given seed, see ``parallelize.initialise_parameters``); the EMA target
        (teacher, or ``model_ema`` when distilling) starts as its copy. A distillation teacher is loaded
        separately (``phases.initialise_phase_model``)."""
        for module in self.student.values():
            initialise_parameters(module)
        self.copy_student_to_ema()

    @torch.no_grad()
    def copy_student_to_ema(self) -> None:
        target = self.model_ema if self.distilling else self.teacher
        target.load_state_dict(self.student.state_dict())

    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never uses train-mode behaviour
        return self

    # ---------------------------------------------------------------- teacher
    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """(2B, K) DINO targets in swapped view order and (M, K) iBOT targets of the masked tokens."""
        cfg = self.cfg
        global_crops = batch["collated_global_crops"]
        mask_indices = batch["mask_indices_list"]
        n_masked = int(mask_indices.shape[0])
        upperbound = int(batch["upperbound"])
        out = self.teacher["backbone"](global_crops, is_training=True)
        cls_first, cls_second = out["x_norm_clstoken"].chunk(2)
        cls_tokens = torch.cat((cls_second, cls_first))
        patch_tokens = out["x_norm_patchtokens"].flatten(0, 1)
        n_cls = cls_tokens.shape[0]
        do_ibot = cfg.ibot.loss_weight > 0
        masked_after_head = None
        if do_ibot and not cfg.ibot.separate_head:
            buffer = patch_tokens.new_zeros(upperbound + n_cls, patch_tokens.shape[-1])
            buffer[:n_cls].copy_(cls_tokens)
            buffer[n_cls:n_cls + n_masked].copy_(torch.index_select(patch_tokens, 0, mask_indices))
            after_head = self.teacher["dino_head"](buffer).float()
            cls_after_head = after_head[:n_cls]
            masked_after_head = after_head[n_cls:n_cls + n_masked]
        else:
            cls_after_head = self.teacher["dino_head"](cls_tokens).float()
            if do_ibot:
                buffer = patch_tokens.new_zeros(upperbound, patch_tokens.shape[-1])
                buffer[:n_masked].copy_(torch.index_select(patch_tokens, 0, mask_indices))
                masked_after_head = self.teacher["ibot_head"](buffer).float()[:n_masked]

        if cfg.train.centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_after_head, teacher_temp)
            self.dino_loss.update_center(cls_after_head)
            ibot_targets = None
            if do_ibot:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(masked_after_head.unsqueeze(0), teacher_temp).squeeze(0)
                self.ibot_patch_loss.update_center(masked_after_head)
        else:
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp)
            ibot_targets = None
            if do_ibot:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    masked_after_head, teacher_temp, batch["n_masked_patches"].to(masked_after_head.device))
        return dino_targets, ibot_targets

    # ---------------------------------------------------------------- student
    def forward_losses(self, batch: dict[str, Any], teacher_temp: float) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss (to backpropagate) and the detached logged terms."""
        cfg = self.cfg
        dino_targets, ibot_targets = self.teacher_targets(batch, teacher_temp)
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch["collated_masks"]
        mask_indices = batch["mask_indices_list"]
        n_masked = int(mask_indices.shape[0])
        upperbound = int(batch["upperbound"])
        n_local = cfg.crops.local_crops_number
        do_ibot = cfg.ibot.loss_weight > 0
        student_masks = None if self.distilling else masks

        crops, crop_masks = [global_crops], [student_masks]
        if n_local > 0:
            crops.append(local_crops)
            crop_masks.append(None)
        outputs = self.student["backbone"](crops, masks=crop_masks, is_training=True)
        global_out = outputs[0]
        global_cls = global_out["x_norm_clstoken"]

        # One dino_head call over [local cls; global cls; masked-patch buffer when the head is shared].
        head_inputs = []
        if n_local > 0:
            head_inputs.append(outputs[1]["x_norm_clstoken"])
        head_inputs.append(global_cls)
        masked_after_head = None
        if do_ibot:
            patch_tokens = global_out["x_norm_patchtokens"].flatten(0, 1)
            buffer = patch_tokens.new_zeros(upperbound, patch_tokens.shape[-1])
            buffer[:n_masked] = torch.index_select(patch_tokens, 0, mask_indices)
            if cfg.ibot.separate_head:
                masked_after_head = self.student["ibot_head"](buffer)[:n_masked]
            else:
                head_inputs.append(buffer)
        head_out = self.student["dino_head"](torch.cat(head_inputs)).float()
        sizes = [t.shape[0] for t in head_inputs]
        pieces = list(head_out.split(sizes))
        local_after_head = pieces.pop(0) if n_local > 0 else None
        global_after_head = pieces.pop(0)
        if do_ibot and not cfg.ibot.separate_head:
            masked_after_head = pieces.pop(0)[:n_masked]

        zero = head_out.new_zeros(())
        logged: dict[str, Tensor] = {}
        total = zero
        if cfg.dino.loss_weight > 0:
            terms = dino_global_and_local_terms(self.dino_loss, global_after_head, local_after_head, dino_targets,
                                                teacher_order="swapped")
            total = total + cfg.dino.loss_weight * (terms.local_crops_loss + terms.global_crops_loss)
            logged["dino_local_crops_loss"] = terms.local_crops_loss
            logged["dino_global_crops_loss"] = terms.global_crops_loss
        if cfg.dino.koleo_loss_weight > 0:
            koleo = cfg.dino.koleo_loss_weight * sum(self.koleo_loss(view.float()) for view in global_cls.chunk(2))
            total = total + koleo
            logged["koleo_loss"] = koleo / 2  # logged per view, as the official code does
        if do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(masked_after_head.float(), ibot_targets, student_masks_flat=masks,
                                                       n_masked_patches=n_masked, masks_weight=batch["masks_weight"])
            total = total + cfg.ibot.loss_weight * ibot
            logged["ibot_loss"] = ibot / 2  # display convention of the official logs
        logged["total_loss"] = total
        if cfg.dino.loss_weight > 0:
            logged["dino_target_entropy"] = normalized_entropy(dino_targets.float())
        return total, {k: v.detach() for k, v in logged.items()}

    # -------------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher; when distilling, into ``model_ema`` (teacher stays frozen)."""
        target = self.model_ema if self.distilling else self.teacher
        ema_update(target, self.student, momentum)

    def exported_backbone(self) -> nn.Module:
        """The model a phase publishes: the EMA teacher, or the student's EMA when distilling."""
        return (self.model_ema if self.distilling else self.teacher)["backbone"]

    def exported_heads(self) -> nn.ModuleDict:
        source = self.model_ema if self.distilling else self.teacher
        return nn.ModuleDict({k: v for k, v in source.items() if k != "backbone"})
