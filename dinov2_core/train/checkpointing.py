"""Resumable, reshardable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout under ``<output_dir>/checkpoints``::

    00000100/            one DCP directory per saved iteration (the last finished iteration)
        .metadata, __0_0.distcp, …   student, teacher, loss centers, optimizer, trainer state
        rng_rank00000.pt             torch / numpy / python (/ CUDA) RNG states of each rank, as tensors
        .complete                    written last: only then is the checkpoint usable

A checkpoint is written into ``.tmp-<iteration>`` and renamed when every rank has finished, then the
marker is written; the ``keep_last`` newest are kept. Directories without a marker (a job killed while
saving) are ignored and removed at the next start. DCP state dicts are keyed by parameter names, not
by rank, so a checkpoint saved at one world size loads at any other.

Nothing in a checkpoint is unpickled into arbitrary objects: RNG states are stored as tensors and
numbers and read with ``weights_only=True``; DCP directories are read with
``dinov2_core.models.checkpoint_io.safe_dcp_load`` / ``read_dcp_metadata`` (restricted unpickling of
``.metadata``, ``weights_only`` for non-tensor entries).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dinov2_core.models.checkpoint_io import read_dcp_metadata, safe_dcp_load, safe_torch_load
from dinov2_core.utils.atomic import atomic_rename_dir, atomic_write_text

COMPLETE_MARKER = ".complete"
_NAME = re.compile(r"^\d{8}$")


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Save, find and load training checkpoints for one phase run."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int, rank: int = 0, world_size: int = 1) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda p: int(p.name))

    def latest(self) -> Path | None:
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def clean_incomplete(self) -> list[str]:
        """Remove temp and unmarked directories (rank 0); returns what was removed."""
        removed: list[str] = []
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and (path.name.startswith(".tmp-") or (_NAME.match(path.name) and not (path / COMPLETE_MARKER).exists())):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
        _barrier()
        return removed

    def save(self, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank must call it with the same iteration."""
        final = self.root / f"{iteration:08d}"
        tmp = self.root / f".tmp-{iteration:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists():  # re-saving the same iteration after a restore: replace it
                shutil.rmtree(final)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state, "trainer": dict(trainer_state)}, checkpoint_id=str(tmp))
        torch.save(capture_rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
        _barrier()
        if self.rank == 0:
            atomic_rename_dir(tmp, final)
            atomic_write_text(final / COMPLETE_MARKER, f"{iteration}\n")
            for old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             restore_rng: bool = True) -> dict[str, Any]:
        """Load into the (already sharded) model and optimizer; returns the saved trainer state."""
        path = Path(path)
        if optimizer is not None:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state, "trainer": {}}
        else:
            model_state = get_model_state_dict(model)
            state = {"model": model_state, "trainer": {}}
        metadata = read_dcp_metadata(path)
        saved = set(metadata.state_dict_metadata)
        state["trainer"] = {key.split(".", 1)[1]: 0 for key in saved if key.startswith("trainer.")}
        # Parameters that never received a gradient (e.g. the mask token when distilling) have no AdamW
        # state in the checkpoint; a missing model entry is a real mismatch.
        missing = sorted(key for key in _flat_keys({"model": state["model"]}) if key not in saved)
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {len(missing)} entries this model needs, e.g. {missing[:5]}; "
                               "was it written by a run with a different model or head configuration?")
        safe_dcp_load(state, path, allow_partial_load=True)
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_model_state_dict(model, state["model"])
        rng_file = path / f"rng_rank{self.rank:05d}.pt"
        if restore_rng and rng_file.exists():
            restore_rng_state(safe_torch_load(rng_file))
        return dict(state["trainer"])


def _flat_keys(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys as DCP flattens nested dicts of tensors."""
    keys: list[str] = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, name + "."))
        else:
            keys.append(name)
    return keys
