"""Short probes of the CIFAR-10 recipe: one variant per call, compared at a fixed iteration count.

Each call pretrains ``configs/train/cifar_vit_test.yaml`` (plus the given ``KEY=VALUE`` overrides)
for ``--iterations`` steps on the pretraining split of ``bench_knn_cifar`` and scores the exported
teacher with kNN (k=20) on a seeded subset of the kNN-train split and of the held-out split, without
baselines, so a probe takes minutes. One JSON line per probe is appended to
``bench/results/cifar_recipe_sweep.jsonl`` with the command, machine, load, training time, the last
losses and ``dino_target_entropy``. The probes rank variants; the benchmark number is
``bench_knn_cifar``'s (full splits, time budget, baselines).

    python -m bench.sweep_cifar_recipe --name patch8 --iterations 1000 student.patch_size=8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_knn_cifar import EVAL_CONFIG, TRAIN_RECIPE, prepare_data
from bench.cifar_data import DEFAULT_ROOT
from bench.common import RESULTS_DIR, command_line, machine
from dinov2_core.data.manifest import read_manifest, write_manifest

SWEEP_LOG = RESULTS_DIR / "cifar_recipe_sweep.jsonl"


def test_subset(test_manifest: str, count: int, workdir: Path) -> str:
    """``count`` held-out images drawn with a fixed seed (the same subset for every probe)."""
    records = read_manifest(test_manifest)
    random.Random(0).shuffle(records)
    subset = str(workdir / f"test-{count}.jsonl")
    write_manifest([{"uri": r.uri, "label": r.label} for r in records[:count]], subset)
    return subset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--recipe", default=str(TRAIN_RECIPE))
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_knn_cifar"))
    parser.add_argument("--data-root", default=DEFAULT_ROOT)
    parser.add_argument("--knn-train-images", type=int, default=15000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()

    from dinov2_core.eval import run_evaluation
    from dinov2_core.eval.config import EvalConfig
    from dinov2_core.train import load_train_config, run_training
    from dinov2_core.utils.config import load_config

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train_manifest, test_manifest = prepare_data(Path(args.data_root), workdir, 500, 0)
    epochs, epoch_length = 10, max(2, args.iterations // 10)
    cfg = load_train_config(args.recipe, [
        f"train.dataset={train_manifest}", f"train.official_epoch_length={epoch_length}", f"optim.epochs={epochs}",
        f"checkpoint.period={epochs * epoch_length}", *args.overrides,
    ])
    run_dir = workdir / f"sweep-{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    rows: list[dict] = []
    started = time.perf_counter()
    summary = run_training(cfg, str(run_dir), rows.append)
    train_minutes = (time.perf_counter() - started) / 60
    eval_cfg = load_config(EvalConfig, str(EVAL_CONFIG), [
        f"backbone={summary['export_dir']}", f"train={train_manifest}",
        f"test={test_subset(test_manifest, args.test_images, workdir)}", "evals=[knn]", "knn.ks=[20]",
        f"max_train_images={args.knn_train_images}", "baselines.random_init=false", "baselines.pixels=false",
    ])
    metrics = run_evaluation(eval_cfg, str(run_dir / "eval"))["metrics"]
    last = rows[-1]
    probe = {
        "name": args.name,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "machine": machine(),
        "load_avg_1min_after": round(os.getloadavg()[0], 1),
        "knn_top1_k20": round(100 * metrics["knn.top1.k20"], 2),
        "knn_train_images": int(metrics["data.train.images"]),
        "test_images": int(metrics["data.test.images"]),
        "iterations": len(rows),
        "images_seen": len(rows) * cfg.train.batch_size_per_gpu,
        "train_minutes": round(train_minutes, 2),
        "seconds_per_step": round(statistics.median(r["step_time_s"] for r in rows), 3),
        "dino_global_crops_loss_last": round(last["dino_global_crops_loss"], 3),
        "dino_target_entropy_last": round(last["dino_target_entropy"], 3),
        "overrides": args.overrides,
    }
    with SWEEP_LOG.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(probe) + "\n")
    print(json.dumps(probe, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
