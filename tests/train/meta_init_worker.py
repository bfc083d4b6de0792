"""Run under ``torch.distributed.run`` by test_meta_init.py: build a phase's model sharded from the meta
device and write what the test checks (shard sizes, full weights of some parameters) to ``--out``."""

from __future__ import annotations

import argparse
import json

import torch
from torch.distributed.tensor import DTensor

from dinov2_core.train import load_train_config
from dinov2_core.train.distributed import init_distributed, shutdown
from dinov2_core.train.trainer import build_model

CHECKED = ("student.backbone.blocks.0.attn.qkv.weight", "student.backbone.pos_embed",
           "teacher.backbone.blocks.1.mlp.fc2.weight", "teacher.dino_head.last_layer.weight_v",
           "student.dino_head.mlp.0.weight", "student.backbone.blocks.0.ls1.gamma")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_train_config(args.config, args.overrides)
    context = init_distributed("cpu")
    try:
        meta, _ = build_model(cfg, context)
        params = dict(meta.named_parameters())
        report = {
            "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
            "local_numel": sum(p.to_local().numel() for p in params.values()),
            "global_numel": sum(p.numel() for p in params.values()),
            "full": {name: params[name].full_tensor().tolist() for name in CHECKED if name in params},
        }
        if context.rank == 0:
            with open(args.out, "w") as handle:
                json.dump(report, handle)
    finally:
        shutdown(context)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
