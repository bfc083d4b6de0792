"""No file a user can point the project at is unpickled into arbitrary objects.

Each test plants a pickle that would create a marker file when unpickled (``os.system`` / ``eval``), in
one of the files the loaders read: an export's ``backbone.pth``, an official hub ``.pth``, ``heads.pth``,
a checkpoint's RNG state, DCP's ``.metadata`` and a DCP non-tensor entry. Each is refused with a clear
error and the marker never appears. A control shows the plant does run under plain unpickling.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_core.models import build_backbone
from dinov2_core.models.checkpoint_io import UnsafeCheckpointError, export_backbone_dir, load_backbone, safe_torch_load
from dinov2_core.models.checkpoint_io import read_dcp_metadata
from dinov2_core.train.checkpointing import CheckpointManager


class ShellPlant:
    """Unpickling runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class EvalPlant:
    """Unpickling runs ``eval`` of code that creates ``<marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


def plant(path: Path, marker: Path, kind=ShellPlant) -> None:
    """Overwrite ``path`` with a state-dict-looking file carrying a payload."""
    torch.save({"cls_token": torch.zeros(1, 1, 8), "payload": kind(marker)}, path)


@pytest.fixture(autouse=True)
def quiet_dcp():
    with warnings.catch_warnings():  # DCP warns that it saves without a process group
        warnings.simplefilter("ignore", UserWarning)
        yield


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted pickle ran"


def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone("vit_test", patch_size=8, img_size=16).eval()


def test_the_plant_runs_under_plain_unpickling(tmp_path):
    control = tmp_path / "control"
    path = tmp_path / "evil.pth"
    for kind in (ShellPlant, EvalPlant):
        plant(path, control, kind)
        torch.load(path, weights_only=False)
        assert control.exists()
        control.unlink()


@pytest.mark.parametrize("kind", [ShellPlant, EvalPlant])
def test_export_backbone_pth_is_refused(tmp_path, marker, kind):
    export = Path(export_backbone_dir(tiny_backbone(), tmp_path / "export"))
    assert load_backbone(export) is not None  # the genuine export loads
    plant(export / "backbone.pth", marker, kind)
    with pytest.raises(UnsafeCheckpointError, match=r"backbone\.pth: refused to load"):
        load_backbone(export)


def test_official_hub_pth_is_refused(tmp_path, marker):
    hub = tmp_path / "dinov2_vits14_pretrain.pth"
    plant(hub, marker)
    with pytest.raises(UnsafeCheckpointError, match="dinov2_vits14_pretrain.pth: refused to load"):
        load_backbone(hub)


def test_heads_pth_is_refused(tmp_path, marker):
    export = Path(export_backbone_dir(tiny_backbone(), tmp_path / "export"))
    plant(export / "heads.pth", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"heads\.pth: refused to load: .*GLOBAL posix\.system"):
        safe_torch_load(export / "heads.pth")


def _checkpoint(tmp_path: Path, trainer_state: dict | None = None) -> tuple[CheckpointManager, Path, torch.nn.Module,
                                                                           torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    path = manager.save(5, model, optimizer, trainer_state or {"iteration": 5, "sampler_position": 640})
    return manager, path, model, optimizer


def test_genuine_checkpoint_round_trips_weights_trainer_state_and_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    manager, path, model, optimizer = _checkpoint(tmp_path)
    expected = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = manager.load(path, model, optimizer)
    assert state == {"iteration": 5, "sampler_position": 640}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # the torch state is captured after the training step inside _checkpoint, so re-draw in the same order
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == expected
    assert set(read_dcp_metadata(path).state_dict_metadata) >= {"trainer.iteration", "model.0.weight"}


def test_planted_rng_state_is_refused(tmp_path, marker):
    manager, path, model, optimizer = _checkpoint(tmp_path)
    plant(path / "rng_rank00000.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"rng_rank00000\.pt: refused to load"):
        manager.load(path, model, optimizer)


@pytest.mark.parametrize("kind", [ShellPlant, EvalPlant])
def test_planted_dcp_metadata_is_refused(tmp_path, marker, kind):
    manager, path, model, optimizer = _checkpoint(tmp_path)
    with open(path / ".metadata", "wb") as handle:
        pickle.dump(kind(marker), handle)
    expected = "refused to unpickle posix.system" if kind is ShellPlant else "refused to unpickle builtins.eval"
    with pytest.raises(UnsafeCheckpointError, match=expected):
        manager.load(path, model, optimizer)
    with pytest.raises(UnsafeCheckpointError):
        read_dcp_metadata(path)


def test_dcp_metadata_that_is_not_metadata_is_refused(tmp_path):
    manager, path, model, optimizer = _checkpoint(tmp_path)
    with open(path / ".metadata", "wb") as handle:
        pickle.dump({"state_dict_metadata": {}}, handle)
    with pytest.raises(UnsafeCheckpointError, match="not DCP metadata"):
        manager.load(path, model, optimizer)


def test_planted_non_tensor_dcp_entry_is_refused(tmp_path, marker):
    # DCP stores non-tensor values as pickled bytes and its default planner unpickles them unrestricted
    manager, path, model, optimizer = _checkpoint(tmp_path, {"iteration": 5, "note": ShellPlant(marker)})
    with pytest.raises(UnsafeCheckpointError, match="checkpoint entry 'trainer.note': refused to unpickle"):
        manager.load(path, model, optimizer)


def test_old_pickled_rng_state_is_refused_not_executed(tmp_path):
    manager, path, model, optimizer = _checkpoint(tmp_path)
    torch.save((np.random.get_state(), random.getstate()), path / "rng_rank00000.pt")  # the old format
    with pytest.raises(UnsafeCheckpointError):
        manager.load(path, model, optimizer)
