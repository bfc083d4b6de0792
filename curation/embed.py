"""Embed: L2-normalised embeddings of every manifest row, written as shards.

Each shard ``shard-XXXXX`` holds ``.npy`` (float32, n×d), ``.ids.npy`` (int64 row ids) and, for the
``pixels`` descriptor with crop views, ``.views.npy`` (n×V×d). The shard's ``._SUCCESS`` marker is
written last, so a re-run skips finished shards and recomputes a half-written one.

Where the shards run:

- one task of a multi-task job (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, else ``SLURM_PROCID``/
  ``SLURM_NTASKS``/``SLURM_LOCALID``): task r embeds shards r, r+N, r+2N, … in its own process, on
  ``cuda:LOCAL_RANK`` when the device is CUDA (one GPU per task). Rank 0 then polls the shard markers
  until every shard is finished and alone writes the stage result; the other ranks return a small dict
  with ``result_holder: false``. A killed job, re-run, redoes only the shards without a marker.
- a single task on a GPU: every shard in this process, on that GPU.
- a single task on CPU: shards in parallel on dask workers (``cluster``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from dinov2_core.data.image_io import ImageDecodeError, load_image
from dinov2_core.utils.atomic import atomic_write_json
from dinov2_core.utils.uri import exists, filesystem_for, join_uri, read_bytes

from curation.cluster import dask_client
from curation.config import EmbedConfig
from curation.descriptors import load_model, model_descriptors, pixel_descriptor, resolve_device
from curation.stage_io import fingerprint, finished_result, load_npy, mark_finished, read_parquet, save_npy

log = logging.getLogger(__name__)
#: how often rank 0 looks at the shard markers while it waits for the other tasks
MARKER_POLL_S = 1.0


def task_identity() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` of this process: torchrun-style variables first (the launcher
    exports them for every task), then Slurm's; ``(0, 1, 0)`` outside a multi-task job."""
    for names in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if names[0] in os.environ and names[1] in os.environ:
            rank, world = int(os.environ[names[0]]), int(os.environ[names[1]])
            local = int(os.environ.get(names[2], rank))
            if not 0 <= rank < world:
                raise RuntimeError(f"{names[0]}={rank} is outside [0, {names[1]}={world})")
            return rank, world, local
    return 0, 1, 0

def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _shard_fingerprint(cfg: EmbedConfig, manifest_uri: str, row_ids: np.ndarray) -> str:
    return fingerprint(cfg, manifest=manifest_uri, first=int(row_ids[0]), last=int(row_ids[-1]), n=len(row_ids))


def _shard_done(output_uri: str, index: int, shard_fp: str) -> dict | None:
    marker = join_uri(output_uri, shard_name(index) + "._SUCCESS")
    if not exists(marker):
        return None
    try:
        info = json.loads(read_bytes(marker))
    except ValueError:
        return None
    return info if info.get("fingerprint") == shard_fp else None


def embed_one_shard(cfg: EmbedConfig, manifest_uri: str, output_uri: str, index: int,
                    row_ids: np.ndarray, uris: list[str], device: str | None = None,
                    rank: int = 0) -> dict[str, Any]:
    """Embed one shard and commit it (files first, marker last); skipped when already finished.

    ``device`` overrides ``cfg.device`` (a task's own GPU); ``rank`` is recorded in the marker."""
    import torch

    shard_fp = _shard_fingerprint(cfg, manifest_uri, row_ids)
    done = _shard_done(output_uri, index, shard_fp)
    if done is not None:
        return {**done, "skipped": True}
    torch.set_num_threads(cfg.torch_threads)
    started = time.perf_counter()
    kept_ids: list[int] = []
    vectors: list[np.ndarray] = []
    views: list[np.ndarray] = []
    failed: dict[str, int] = {}
    if cfg.model == "pixels":
        device = "cpu"
    else:
        device = device or resolve_device(cfg.device)
    backbone = load_model(cfg.model, cfg.checkpoint, cfg.arch, device) if cfg.model != "pixels" else None
    pending_ids: list[int] = []
    pending_images: list = []

    def flush() -> None:
        if pending_images:
            vectors.extend(model_descriptors(pending_images, backbone, cfg.image_size, device))
            kept_ids.extend(pending_ids)
            pending_ids.clear()
            pending_images.clear()

    for row_id, uri in zip(row_ids.tolist(), uris):
        try:
            image = load_image(uri)
        except ImageDecodeError as err:  # e.g. a file removed or damaged since ingest
            failed[err.reason] = failed.get(err.reason, 0) + 1
            continue
        if backbone is None:
            full, crop_views = pixel_descriptor(image, cfg.pixels_size, cfg.crop_views, cfg.crop_side, cfg.crop_grid,
                                                 cfg.flip_view)
            vectors.append(full)
            kept_ids.append(row_id)
            if crop_views is not None:
                views.append(crop_views)
        else:
            pending_ids.append(row_id)
            pending_images.append(image)
            if len(pending_images) >= cfg.batch_size:
                flush()
    flush()
    name = shard_name(index)
    dim = vectors[0].shape[-1] if vectors else 0
    save_npy(np.asarray(vectors, dtype=np.float32).reshape(len(kept_ids), dim), join_uri(output_uri, name + ".npy"))
    save_npy(np.asarray(kept_ids, dtype=np.int64), join_uri(output_uri, name + ".ids.npy"))
    if views:
        save_npy(np.stack(views).astype(np.float32), join_uri(output_uri, name + ".views.npy"))
    info = {"fingerprint": shard_fp, "shard": index, "rows": len(kept_ids), "failed": failed, "dim": int(dim),
            "views": bool(views), "seconds": round(time.perf_counter() - started, 3), "rank": rank,
            "device": device, "finished_at": time.time()}
    atomic_write_json(join_uri(output_uri, name + "._SUCCESS"), info)
    log.info("embedded shard %d (%d rows) on rank %d, %s", index, len(kept_ids), rank, device)
    return {**info, "skipped": False}


def plan_shards(cfg: EmbedConfig, manifest_uri: str) -> list[tuple[int, np.ndarray, list[str]]]:
    """``(shard index, row ids, uris)`` for every shard of the manifest, in row order."""
    table = read_parquet(manifest_uri)
    row_ids = np.asarray(table.column("row_id").to_pylist(), dtype=np.int64)
    uris = table.column("uri").to_pylist()
    order = np.argsort(row_ids, kind="stable")
    row_ids = row_ids[order]
    uris = [uris[i] for i in order]
    return [(index, row_ids[start:start + cfg.shard_size], uris[start:start + cfg.shard_size])
            for index, start in enumerate(range(0, len(uris), cfg.shard_size))]


def embed_shards(cfg: EmbedConfig, manifest_uri: str, output_uri: str, shard_indices: list[int] | None = None,
                 device: str | None = None, rank: int = 0) -> list[dict]:
    """Embed the given shards (all when ``None``) sequentially in this process — one task's work."""
    plan = plan_shards(cfg, manifest_uri)
    wanted = set(shard_indices) if shard_indices is not None else None
    return [embed_one_shard(cfg, manifest_uri, output_uri, index, ids, uris, device=device, rank=rank)
            for index, ids, uris in plan if wanted is None or index in wanted]


def task_device(cfg: EmbedConfig, local_rank: int) -> str:
    """This task's device: its own GPU (``cuda:LOCAL_RANK``) when embedding on CUDA, else CPU."""
    if cfg.model == "pixels":
        return "cpu"
    device = resolve_device(cfg.device)
    return f"cuda:{local_rank}" if device == "cuda" else device


def wait_for_shards(cfg: EmbedConfig, manifest_uri: str, output_uri: str,
                    plan: list[tuple[int, np.ndarray, list[str]]], timeout_s: float) -> list[dict]:
    """The markers of every shard of ``plan``, polling until the other tasks have written theirs;
    ``TimeoutError`` naming the missing shards after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    fingerprints = {index: _shard_fingerprint(cfg, manifest_uri, ids) for index, ids, _ in plan}
    found: dict[int, dict] = {}
    while True:
        for index, shard_fp in fingerprints.items():
            if index not in found:
                info = _shard_done(output_uri, index, shard_fp)
                if info is not None:
                    found[index] = info
        missing = sorted(set(fingerprints) - set(found))
        if not missing:
            return [found[index] for index in sorted(found)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"embed: {len(missing)} shard(s) still unfinished after {timeout_s:g} s "
                               f"(e.g. {[shard_name(i) for i in missing[:5]]}): another task failed or is slow; "
                               "re-run the job: finished shards are kept")
        time.sleep(MARKER_POLL_S)


def remove_stale_shards(output_uri: str, num_shards: int) -> list[str]:
    """Delete shards numbered ``>= num_shards`` (left by an earlier, larger manifest or a smaller
    ``shard_size``), which :func:`load_embeddings` would otherwise read. Markers go first, so a
    deletion interrupted half-way leaves no shard that looks finished."""
    fs, root = filesystem_for(output_uri)
    stale = []
    for path in sorted(fs.ls(root, detail=False)):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith("._SUCCESS") and int(name[6:11]) >= num_shards:
            stale.append(name[: -len("._SUCCESS")])
    for stem in stale:
        fs.rm(f"{root}/{stem}._SUCCESS")
        for suffix in (".npy", ".ids.npy", ".views.npy"):
            if fs.exists(f"{root}/{stem}{suffix}"):
                fs.rm(f"{root}/{stem}{suffix}")
    return stale


def run_embed(cfg: EmbedConfig, manifest_uri: str, output_uri: str,
              wait_timeout_s: float = 24 * 3600.0) -> dict[str, Any]:
    """Embed every row of ``manifest_uri`` into shards under ``output_uri`` (see the module docstring).

    Returns the stage summary on the result holder (rank 0, or the only task); on the other ranks of a
    multi-task job ``{"result_holder": False, "rank": r, "world_size": n, "shards_embedded": [...],
    "shards_skipped": [...]}``. Rank 0 waits up to ``wait_timeout_s`` for the other tasks' shards."""
    rank, world_size, local_rank = task_identity()
    stage_fp = fingerprint(cfg, manifest=manifest_uri)
    done = finished_result(output_uri, stage_fp)
    if done is not None:
        return done if rank == 0 else _not_result_holder(rank, world_size, [])
    plan = plan_shards(cfg, manifest_uri)
    started = time.perf_counter()
    started_wall = time.time()
    device = task_device(cfg, local_rank)
    if world_size > 1 or device.startswith("cuda"):
        mine = plan[rank::world_size]
        own = [embed_one_shard(cfg, manifest_uri, output_uri, index, ids, uris, device=device, rank=rank)
               for index, ids, uris in mine]
        if rank != 0:
            return _not_result_holder(rank, world_size, own)
        shard_infos = wait_for_shards(cfg, manifest_uri, output_uri, plan, wait_timeout_s)
        # a shard is "skipped" when its marker predates this run (clocks of one cluster agree to ~1 s)
        for info in shard_infos:
            info["skipped"] = info.get("finished_at", 0.0) < started_wall - 1.0
    else:
        with dask_client(cfg.cluster) as client:
            futures = [client.submit(embed_one_shard, cfg, manifest_uri, output_uri, index, ids, uris, pure=False)
                       for index, ids, uris in plan]
            shard_infos = client.gather(futures)
    remove_stale_shards(output_uri, len(plan))
    seconds = time.perf_counter() - started
    failed: dict[str, int] = {}
    for info in shard_infos:
        for reason, count in info["failed"].items():
            failed[reason] = failed.get(reason, 0) + count
    rows = sum(info["rows"] for info in shard_infos)
    result = {
        "embeddings": output_uri,
        "num_shards": len(plan),
        "num_embedded": rows,
        "num_failed": sum(failed.values()),
        "failed_by_reason": failed,
        "dim": max((info["dim"] for info in shard_infos), default=0),
        "model": cfg.model,
        "shards_skipped": sum(1 for info in shard_infos if info["skipped"]),
        "images_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "tasks": world_size,
    }
    return mark_finished(output_uri, stage_fp, result)


def _not_result_holder(rank: int, world_size: int, own: list[dict]) -> dict[str, Any]:
    return {"result_holder": False, "rank": rank, "world_size": world_size,
            "shards_embedded": [info["shard"] for info in own if not info["skipped"]],
            "shards_skipped": [info["shard"] for info in own if info["skipped"]]}


def load_embeddings(embeddings_uri: str, with_views: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(row_ids, embeddings, views or None)`` of every finished shard under ``embeddings_uri``.

    Views are returned only when every shard has them and ``with_views`` is set."""
    fs, root = filesystem_for(embeddings_uri)
    markers = sorted(p for p in fs.ls(root, detail=False) if p.endswith("._SUCCESS"))
    if not markers:
        raise FileNotFoundError(f"no finished embedding shards (shard-XXXXX._SUCCESS) under {embeddings_uri}")
    ids, vectors, views = [], [], []
    for marker in markers:
        stem = marker.rsplit("/", 1)[-1][: -len("._SUCCESS")]
        ids.append(load_npy(join_uri(embeddings_uri, stem + ".ids.npy")))
        vectors.append(load_npy(join_uri(embeddings_uri, stem + ".npy")))
        view_uri = join_uri(embeddings_uri, stem + ".views.npy")
        if with_views and views is not None and exists(view_uri):
            views.append(load_npy(view_uri))
        else:
            views = None
    dims = {v.shape[1] for v in vectors if len(v)}
    dim = dims.pop() if dims else 0
    all_vectors = np.concatenate([v.reshape(-1, dim) for v in vectors]).astype(np.float32, copy=False)
    all_views = np.concatenate(views).astype(np.float32, copy=False) if views else None
    return np.concatenate(ids), all_vectors, all_views
