"""Read and write backbone weights in the official DINOv2 hub format, strictly.

The official evaluation loader drops mismatching keys silently (``strict=False``); here every load
is strict and a mismatch raises :class:`CheckpointMismatchError` naming the missing, unexpected and
wrongly shaped keys. Formats handled:

- official hub files (``dinov2_vits14_pretrain.pth``, ``…_reg4_…``, ViT-g with packed SwiGLU): a flat
  backbone ``state_dict`` with ``blocks.<i>.*`` keys;
- chunked training keys ``blocks.<chunk>.<i>.*`` (``block_chunks > 0``), converted both ways;
- teacher snapshots ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}`` and
  ``module.``-prefixed (DDP) state dicts;
- our export directories: ``backbone.pth`` (hub format) + ``model.json`` (backbone spec).

Every file is read with ``weights_only=True`` (:func:`safe_torch_load`), and DCP checkpoint directories
through :func:`safe_dcp_load` / :func:`read_dcp_metadata` (DCP's ``.metadata`` is a pickle: a restricted
unpickler admits only DCP's metadata classes; DCP's non-tensor entries are read ``weights_only``). A file
a user points the project at is never unpickled into arbitrary objects.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
from typing import Any, Mapping

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import Tensor, nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # private, as DefaultLoadPlanner uses it
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from dinov2_core.models import backbone_spec, build_backbone_from_spec
from dinov2_core.models.vision_transformer import ARCH_NAMES, DinoVisionTransformer, arch_dims
from dinov2_core.utils.atomic import atomic_torch_save, atomic_write_json
from dinov2_core.utils.uri import exists, join_uri, read_bytes

BACKBONE_FILE = "backbone.pth"
SPEC_FILE = "model.json"
_CHUNKED_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
_PLAIN_KEY = re.compile(r"^blocks\.(\d+)\.")
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """A state dict does not match the model: lists missing, unexpected and wrongly shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], shape_mismatches: list[str]):
        self.missing, self.unexpected, self.shape_mismatches = missing, unexpected, shape_mismatches

        def listing(title: str, keys: list[str]) -> str:
            shown = ", ".join(keys[:_MAX_LISTED]) + (f", … (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")
            return f"{len(keys)} {title}: [{shown}]"

        parts = [listing(t, k) for t, k in (("missing keys", missing), ("unexpected keys", unexpected),
                                            ("shape mismatches", shape_mismatches)) if k]
        super().__init__("state dict does not match the model: " + "; ".join(parts))


# ------------------------------------------------------------------ key mapping
def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` from every key that starts with it (others are kept as they are)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def unchunk_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``blocks.<chunk>.<i>.*`` → ``blocks.<i>.*`` (keys are already globally indexed)."""
    return {_CHUNKED_KEY.sub(r"blocks.\2.", k): v for k, v in state_dict.items()}


def chunk_state_dict(state_dict: Mapping[str, Tensor], depth: int, block_chunks: int) -> dict[str, Tensor]:
    """``blocks.<i>.*`` → ``blocks.<i // (depth/block_chunks)>.<i>.*``; a no-op for ``block_chunks=0``."""
    plain = unchunk_state_dict(state_dict)
    if block_chunks <= 0:
        return plain
    size = depth // block_chunks
    return {_PLAIN_KEY.sub(lambda m: f"blocks.{int(m.group(1)) // size}.{m.group(1)}.", k): v for k, v in plain.items()}


def extract_backbone_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The plain backbone state dict from a hub file, a teacher snapshot or a ``module.``-prefixed dict."""
    state = checkpoint
    for wrapper in ("teacher", "model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    state = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    state = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in state.items()}
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if non_tensors:
        raise ValueError(f"checkpoint entries are not tensors (not a state dict?): {non_tensors[:_MAX_LISTED]}")
    return unchunk_state_dict(state)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wrapper


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load ``state_dict`` into ``model``; raise :class:`CheckpointMismatchError` on any mismatch.

    For backbones, chunked and plain block keys are accepted on both sides and reported in hub naming.
    """
    model = _unwrap(model)
    expected = model.state_dict()
    is_backbone = isinstance(model, DinoVisionTransformer)
    if is_backbone:  # compare (and report) in hub naming, whatever the chunking on either side
        expected, state_dict = unchunk_state_dict(expected), unchunk_state_dict(state_dict)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(missing, unexpected, shapes)
    if is_backbone:
        state_dict = chunk_state_dict(state_dict, model.n_blocks, len(model.blocks) if model.chunked_blocks else 0)
    model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------- export
def to_official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Hub-format state dict of a backbone: plain ``blocks.<i>`` keys, detached contiguous CPU tensors."""
    state = _unwrap(model).state_dict()
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in unchunk_state_dict(state).items()}


def export_backbone(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the backbone in official hub format to ``path`` (atomically)."""
    atomic_torch_save(to_official_state_dict(model), path)


def export_backbone_dir(model: DinoVisionTransformer, directory: str | os.PathLike, spec: dict | None = None) -> str:
    """Write ``backbone.pth`` and ``model.json`` (the spec, ``block_chunks`` set to 0 as the file is flat) into ``directory``.

    ``spec`` defaults to ``backbone_spec(model)``. Each file is written atomically; ``model.json`` last.
    """
    directory = os.fspath(directory)
    spec = dict(spec or backbone_spec(_unwrap(model)))
    spec["kwargs"] = {**spec.get("kwargs", {}), "block_chunks": 0}
    export_backbone(model, join_uri(directory, BACKBONE_FILE))
    atomic_write_json(join_uri(directory, SPEC_FILE), spec)
    return directory


# ----------------------------------------------------------------------- infer
def infer_backbone_spec(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Backbone spec of a hub-format (or chunked / teacher) state dict, from tensor shapes alone."""
    state = extract_backbone_state_dict(state_dict)
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise ValueError(f"not a DINOv2 backbone state dict: missing {absent}")
    embed_dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _PLAIN_KEY.match(k)))
    matches = [a for a in ARCH_NAMES if (arch_dims(a)["embed_dim"], arch_dims(a)["depth"]) == (embed_dim, depth)]
    if not matches:
        known = {a: (arch_dims(a)["embed_dim"], arch_dims(a)["depth"]) for a in ARCH_NAMES}
        raise ValueError(f"no arch with embed_dim={embed_dim} and depth={depth}; known (embed_dim, depth): {known}")
    patch_size = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if "blocks.0.mlp.w12.weight" in state:
        ffn_layer = "swiglufused"
    elif "blocks.0.mlp.fc1.weight" in state:
        ffn_layer = "mlp"
    else:
        ffn_layer = "identity"
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    kwargs: dict[str, Any] = {
        "patch_size": patch_size,
        "img_size": grid * patch_size,
        "init_values": 1.0 if "blocks.0.ls1.gamma" in state else None,
        "block_chunks": 0,
        "ffn_layer": ffn_layer,
        "num_register_tokens": registers,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "proj_bias": "blocks.0.attn.proj.bias" in state,
        "ffn_bias": any(k in state for k in ("blocks.0.mlp.fc1.bias", "blocks.0.mlp.w12.bias")),
    }
    if registers:  # the _reg4 family resizes pos_embed with size= + antialias (recipe §1.4)
        kwargs.update(interpolate_antialias=True, interpolate_offset=0.0)
    return {"arch": matches[0], "kwargs": kwargs}


# ------------------------------------------------------------------------ load
class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds Python objects that loading would have to execute; it was refused."""


def safe_torch_load(uri: str | os.PathLike) -> Any:
    """``torch.load`` of a local path or URI with ``weights_only=True``: tensors, numbers, strings and
    containers only, never arbitrary pickled objects (a planted ``.pth`` could run code when unpickled).

    Raises :class:`UnsafeCheckpointError` naming the file when it holds anything else.
    """
    uri = os.fspath(uri)
    try:
        return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{uri}: refused to load: it holds pickled Python objects besides tensors and plain data "
            f"({refusal_reason(err)}). Only weights-only checkpoints are loaded; re-save the state dict with "
            "torch.save in a trusted environment") from None


def refusal_reason(err: BaseException) -> str:
    """The informative line of torch's weights-only refusal (which global it would have had to load)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")


# -------------------------------------------------------------- DCP directories
#: Globals a DCP ``.metadata`` pickle may name besides the classes of ``torch.distributed.checkpoint.metadata``
#: and torch dtypes: plain value types, nothing that runs code of the file's choosing.
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a torch.layout up by name
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: any other global (``os.system``, ``builtins.eval``, …) is refused."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__:
            candidate = getattr(dcp_metadata, name, None)
            if isinstance(candidate, type) and candidate.__module__ == module:
                return candidate
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        elif (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refused to unpickle {module}.{name}: DCP metadata may only hold "
            "torch.distributed.checkpoint metadata classes, torch.Size, dtypes and plain containers; "
            "the file was not written by torch.distributed.checkpoint or was tampered with")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with ``.metadata`` read through a restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # same steps as FileSystemReader.read_metadata, except the unpickler
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as metadata_file:
            metadata = _MetadataUnpickler(metadata_file, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP metadata (got {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor entries (numbers, strings, optimizer hyper-parameters)
    with ``weights_only=True`` instead of unrestricted unpickling."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"checkpoint entry {fqn!r}: refused to unpickle a non-tensor value "
                                        f"({refusal_reason(err)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def read_dcp_metadata(path: str | os.PathLike) -> Metadata:
    """The metadata of DCP directory ``path``, read safely."""
    return SafeFileSystemReader(str(path)).read_metadata()


def safe_dcp_load(state: dict[str, Any], path: str | os.PathLike, allow_partial_load: bool = False) -> None:
    """``dcp.load`` of directory ``path`` into ``state`` (in place) without unrestricted unpickling."""
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)),
                 planner=SafeLoadPlanner(allow_partial_load=allow_partial_load))
    except CheckpointException as err:  # DCP wraps each rank's error; surface a refusal as itself
        for failure in err.failures.values():
            cause = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(cause, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{path}: {cause}") from None
        raise


def load_backbone(path_or_dir: str | os.PathLike, spec: dict[str, Any] | None = None) -> DinoVisionTransformer:
    """Load a backbone strictly, in eval mode.

    ``path_or_dir`` is an export directory (``backbone.pth`` + ``model.json``), or a ``.pth`` file: a hub
    checkpoint, a flat or chunked state dict, or a teacher snapshot. Without ``spec`` a file's spec is
    inferred from its tensor shapes (:func:`infer_backbone_spec`).
    """
    path = os.fspath(path_or_dir)
    weights = path
    if exists(join_uri(path, SPEC_FILE)):
        weights = join_uri(path, BACKBONE_FILE)
        if spec is None:
            spec = json.loads(read_bytes(join_uri(path, SPEC_FILE)))
    elif os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a directory without {SPEC_FILE}; expected an export dir "
                                f"({BACKBONE_FILE} + {SPEC_FILE}) or a .pth file")
    state = extract_backbone_state_dict(safe_torch_load(weights))
    if spec is None:
        spec = infer_backbone_spec(state)
    model = build_backbone_from_spec(spec)
    load_state_dict_strict(model, state)
    return model.eval()
