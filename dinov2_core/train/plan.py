"""A plan of one training phase before anything is submitted: scale, schedule, memory, disk and time.

:func:`plan_training` answers, from the config and the launcher resources alone (no GPU, no data, no
weights: modules are built on the ``meta`` device, so ViT-g costs nothing), what ``--dry-run`` should
tell before a job waits in a queue for hours: world size, global batch, the peak lr the recipe derives
from it, iterations, parameter counts, memory per GPU (parameters, gradients, AdamW states, activations),
checkpoint size on disk and whether the time limit with its requeues covers the schedule.

The activation estimate counts what autograd keeps for backward, block by block, from the
architecture (tokens per crop, width, FFN kind, LayerScale, stochastic-depth batch subsets), the
multi-crop batch, the heads and the losses; ``tests/train/test_plan.py`` checks it against the bytes
of the tensors a real CPU step saves (:func:`saved_activation_bytes`). Transient buffers (FSDP
all-gathers, the block being recomputed or back-propagated) are listed separately.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from dinov2_core.train.config import TrainConfig
from dinov2_core.train.schedules import scaled_lr

GIB = 2**30
DEFAULT_GPU_MEMORY_GB = 80.0  # H100 80 GB
#: stochastic depth above this rate runs the branch on a batch subset (see models/layers/drop_path.py)
SUBSET_RESIDUAL_MIN_RATE = 0.1
FP32_BYTES = 4


@dataclass
class ParameterCounts:
    student_backbone: int
    student_heads: int
    teacher_backbone: int | None  # None: a distillation teacher whose size is unknown
    teacher_heads: int | None
    student_ema: int = 0  # distillation keeps a spare EMA of the student

    @property
    def student(self) -> int:
        return self.student_backbone + self.student_heads

    @property
    def teacher(self) -> int:
        return (self.teacher_backbone or 0) + (self.teacher_heads or 0)

    @property
    def total(self) -> int:
        return self.student + self.teacher + self.student_ema


@dataclass
class MemoryEstimate:
    """Bytes per GPU (per process on CPU)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    transient: int
    activation_parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.transient


@dataclass
class TimeCoverage:
    seconds_per_iter: float | None
    schedule_hours: float | None
    timeout_min: int | None
    max_requeues: int | None
    jobs_needed: int | None
    jobs_allowed: int | None
    covered: bool | None
    note: str


@dataclass
class TrainingPlan:
    phase: str
    arch: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    world_size: int
    device: str
    compute_dtype: str
    batch_size_per_gpu: int
    global_batch: int
    base_lr: float
    scaling_rule: str
    peak_lr: float
    iterations: int
    params: ParameterCounts
    memory: MemoryEstimate
    gpu_memory_gb: float
    checkpoint_bytes: int
    checkpoint_keep_last: int
    checkpoint_disk_bytes: int
    export_bytes: int
    time: TimeCoverage
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["params"].update(student=self.params.student, teacher=self.params.teacher, total=self.params.total)
        data["memory"]["total"] = self.memory.total
        return data

    def render(self) -> str:
        p, m, t = self.params, self.memory, self.time
        teacher = "unknown (give the teacher's model.json)" if p.teacher_backbone is None else _count(p.teacher)
        checkpointing = "on" if m.activations == m.activations_with_checkpointing else "off"
        lines = [
            f"plan: {self.phase} {self.arch} on {self.nodes} node(s) x {self.tasks_per_node} task(s)"
            f" ({self.gpus_per_node} GPU(s)/node) = world size {self.world_size}, {self.device}, {self.compute_dtype}",
            f"  batch: {self.batch_size_per_gpu}/GPU x {self.world_size} = global {self.global_batch}",
            f"  lr: base {self.base_lr:g} scaled {self.scaling_rule} -> peak {self.peak_lr:.4g}",
            f"  iterations: {self.iterations:,}",
            f"  parameters: student {_count(p.student)} (backbone {_count(p.student_backbone)}, heads "
            f"{_count(p.student_heads)}), teacher {teacher}"
            + (f", student EMA {_count(p.student_ema)}" if p.student_ema else ""),
            f"  memory/GPU: params {_gib(m.params)} + grads {_gib(m.grads)} + AdamW {_gib(m.optimizer)}"
            f" + activations {_gib(m.activations)} (checkpointing {checkpointing}; on: "
            f"{_gib(m.activations_with_checkpointing)}, off: {_gib(m.activations_without_checkpointing)})"
            f" + transient {_gib(m.transient)} = {_gib(m.total)} of {self.gpu_memory_gb:g} GB",
            f"  checkpoint: {_gib(self.checkpoint_bytes)} each (DCP, fp32 params + AdamW), keep_last "
            f"{self.checkpoint_keep_last} -> {_gib(self.checkpoint_disk_bytes)} on disk while saving; export "
            f"{_gib(self.export_bytes)}",
            f"  time: {t.note}",
        ]
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


# ----------------------------------------------------------------------------- parameters
def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _largest_unit(backbone: torch.nn.Module, heads: list[torch.nn.Module]) -> int:
    """Parameters of the largest FSDP unit: a block, a head, or the backbone root's own parameters."""
    from dinov2_core.train.parallelize import transformer_blocks

    blocks = transformer_blocks(backbone)
    in_blocks = sum(_n_params(b) for b in blocks)
    return max([_n_params(b) for b in blocks] + [_n_params(h) for h in heads] + [_n_params(backbone) - in_blocks])


def _teacher_spec(cfg: TrainConfig, teacher_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    if teacher_spec is not None or cfg.phase != "distill" or not cfg.distill.teacher_path:
        return teacher_spec
    for candidate in (Path(cfg.distill.teacher_path), Path(cfg.distill.teacher_path) / "export"):
        if (candidate / "model.json").is_file():
            return json.loads((candidate / "model.json").read_text())
    return None


def count_parameters(cfg: TrainConfig, teacher_spec: dict[str, Any] | None = None) -> tuple[ParameterCounts, int]:
    """Parameter counts of the phase's modules, built on the meta device; also the largest FSDP unit."""
    from dinov2_core.models import build_backbone
    from dinov2_core.train.meta_arch import backbone_kwargs, build_heads

    with torch.device("meta"):
        backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, drop_path=False))
        heads = list(build_heads(cfg, backbone.embed_dim).values())
        student_backbone, student_heads = _n_params(backbone), sum(_n_params(h) for h in heads)
        largest = _largest_unit(backbone, heads)
        if cfg.phase != "distill":
            counts = ParameterCounts(student_backbone, student_heads, student_backbone, student_heads)
        elif teacher_spec is None:
            counts = ParameterCounts(student_backbone, student_heads, None, None,
                                     student_ema=student_backbone + student_heads)
        else:
            from dinov2_core.models import build_backbone_from_spec

            teacher = build_backbone_from_spec(teacher_spec)
            teacher_heads = list(build_heads(cfg, teacher.embed_dim).values())
            counts = ParameterCounts(student_backbone, student_heads, _n_params(teacher),
                                     sum(_n_params(h) for h in teacher_heads),
                                     student_ema=student_backbone + student_heads)
            largest = max(largest, _largest_unit(teacher, teacher_heads))
    return counts, largest


# ---------------------------------------------------------------------------- activations
def ibot_upperbound(cfg: TrainConfig) -> int:
    """The static masked-token buffer length of a batch (same float32 bins as the collate function)."""
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    n_global = 2 * cfg.train.batch_size_per_gpu
    n_masked_crops = int(n_global * cfg.ibot.mask_sample_probability)
    bins = torch.linspace(*cfg.ibot.mask_ratio_min_max, n_masked_crops + 1)
    return sum(int(grid * grid * high) for high in bins[1:])


def _drop_rates(cfg: TrainConfig, depth: int) -> list[float]:
    rate = 0.0 if cfg.phase == "distill" else cfg.student.drop_path_rate
    if cfg.student.drop_path_uniform or depth == 1:
        return [rate] * depth
    return [rate * i / (depth - 1) for i in range(depth)]


def activation_bytes(cfg: TrainConfig, compute_bytes: int) -> dict[str, int]:
    """Bytes autograd saves for backward in one student step, by part (``blocks`` without checkpointing,
    ``blocks_checkpointed`` with), from the architecture and the multi-crop batch."""
    from dinov2_core.models.layers.swiglu_ffn import swiglu_hidden_features
    from dinov2_core.models.vision_transformer import arch_dims

    dims = arch_dims(cfg.student.arch)
    width, depth, heads = dims["embed_dim"], dims["depth"], dims["num_heads"]
    s, patch, batch = cfg.student, cfg.student.patch_size, cfg.train.batch_size_per_gpu
    n_local = cfg.crops.local_crops_number
    extra_tokens = 1 + s.num_register_tokens
    # (crops in the group, tokens per crop)
    groups = [(2 * batch, (cfg.crops.global_crops_size // patch) ** 2 + extra_tokens)]
    if n_local:
        groups.append((n_local * batch, (cfg.crops.local_crops_size // patch) ** 2 + extra_tokens))
    layerscale = 1 if s.layerscale else 0
    hidden = 4 * width
    ffn_saved = {"mlp": 2 * hidden, "swiglu": 4 * swiglu_hidden_features(hidden),
                 "swiglufused": 4 * swiglu_hidden_features(hidden), "identity": 0}[s.ffn_layer]
    # per token: norm1 in, qkv in, qkv out (3), attention out, proj in (+ LayerScale in); fp32 norm stats, lse
    attn_per_token = (7 + layerscale) * width * compute_bytes + (2 + heads) * FP32_BYTES
    # per token: norm2 in, fc1 in, FFN hidden (+ LayerScale in); fp32 norm stats
    ffn_per_token = (2 + layerscale) * width * compute_bytes + ffn_saved * compute_bytes + 2 * FP32_BYTES
    all_tokens = sum(crops * tokens for crops, tokens in groups)

    blocks = 0
    largest_block = 0
    for rate in _drop_rates(cfg, depth):
        if rate > SUBSET_RESIDUAL_MIN_RATE:
            tokens = sum(max(int(crops * (1.0 - rate)), 1) * per for crops, per in groups)
        else:
            tokens = all_tokens
        block = tokens * (attn_per_token + ffn_per_token)
        blocks += block
        largest_block = max(largest_block, block)

    images = 3 * (2 * batch * cfg.crops.global_crops_size ** 2 + n_local * batch * cfg.crops.local_crops_size ** 2)
    final_norm = all_tokens * (width * compute_bytes + 2 * FP32_BYTES)

    upperbound = ibot_upperbound(cfg) if cfg.ibot.loss_weight > 0 else 0
    cls_rows = (n_local + 2) * batch

    def head(rows: int, section: Any) -> int:
        mlp = width + 2 * (section.head_nlayers - 1) * section.head_hidden_dim
        per_row = (mlp + 2 * section.head_bottleneck_dim) * compute_bytes + FP32_BYTES
        return rows * per_row + section.head_n_prototypes * section.head_bottleneck_dim * compute_bytes

    dino_rows = cls_rows + (upperbound if not cfg.ibot.separate_head else 0)
    heads_bytes = head(dino_rows, cfg.dino)
    if cfg.ibot.separate_head and upperbound:
        heads_bytes += head(upperbound, cfg.ibot)
    ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
    # log-softmax outputs and their companions, always float32 (heads' outputs are cast before the losses)
    losses = 2 * FP32_BYTES * (cls_rows * cfg.dino.head_n_prototypes + upperbound * ibot_k)
    return {
        "blocks": blocks,
        "blocks_checkpointed": depth * all_tokens * width * compute_bytes,
        "largest_block": largest_block,
        "images": images * compute_bytes,
        "final_norm": final_norm,
        "heads": heads_bytes,
        "losses": losses,
    }


@contextlib.contextmanager
def saved_activation_bytes(exclude: list[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Count the distinct storages autograd saves for backward inside the block (``counter["bytes"]``);
    tensors sharing a storage with ``exclude`` (parameters) are not activations and are skipped."""
    skipped = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    counter = {"bytes": 0, "tensors": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in skipped and pointer not in seen:
            seen.add(pointer)
            counter["bytes"] += storage.nbytes()
            counter["tensors"] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


# --------------------------------------------------------------------------------- memory
def estimate_memory(cfg: TrainConfig, params: ParameterCounts, largest_unit: int, world_size: int,
                    compute_bytes: int) -> MemoryEstimate:
    """Per-GPU bytes under FSDP2: fp32 parameters, gradients and AdamW states sharded over the world."""
    resident_params = params.student + (params.teacher or 0) + params.student_ema
    shard = max(world_size, 1)
    parts = activation_bytes(cfg, compute_bytes)
    common = parts["images"] + parts["final_norm"] + parts["heads"] + parts["losses"]
    without = parts["blocks"] + common
    with_checkpointing = parts["blocks_checkpointed"] + common
    checkpointing = cfg.parallel.activation_checkpointing
    # all-gathered unit + prefetched next unit (compute dtype) and one unit's unsharded fp32 gradient;
    # the block being recomputed (checkpointing) or back-propagated (its activation gradients)
    transient = largest_unit * (2 * compute_bytes + FP32_BYTES) + parts["largest_block"]
    if not cfg.parallel.reshard_after_forward:
        transient += (params.student + params.teacher) * compute_bytes
    return MemoryEstimate(
        params=math.ceil(resident_params * FP32_BYTES / shard),
        grads=math.ceil(params.student * FP32_BYTES / shard),
        optimizer=math.ceil(2 * params.student * FP32_BYTES / shard),
        activations=with_checkpointing if checkpointing else without,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_checkpointing,
        transient=transient,
        activation_parts={k: v for k, v in parts.items() if k != "largest_block"},
    )


# ----------------------------------------------------------------------------------- time
def _time_coverage(iterations: int, period: int, timeout_min: int | None, max_requeues: int | None,
                   seconds_per_iter: float | None) -> tuple[TimeCoverage, list[str]]:
    warnings: list[str] = []
    jobs_allowed = None if max_requeues is None else 1 + max_requeues
    if seconds_per_iter is None:
        note = "unknown: pass --seconds-per-iter"
        return TimeCoverage(None, None, timeout_min, max_requeues, None, jobs_allowed, None, note), warnings
    total_s = iterations * seconds_per_iter
    hours = total_s / 3600
    if timeout_min is None:
        note = f"schedule {hours:,.1f} h at {seconds_per_iter:g} s/iter; no time limit given (--timeout-min)"
        return TimeCoverage(seconds_per_iter, hours, None, max_requeues, None, jobs_allowed, None, note), warnings
    # a job stopped at its limit loses the iterations since its last checkpoint
    usable_s = timeout_min * 60 - period * seconds_per_iter
    if usable_s <= 0:
        warnings.append(f"checkpoint.period={period} iterations take {period * seconds_per_iter / 60:,.1f} min, "
                        f"longer than the {timeout_min} min time limit: no job would ever save a checkpoint")
        note = f"schedule {hours:,.1f} h; a job never reaches a checkpoint"
        return TimeCoverage(seconds_per_iter, hours, timeout_min, max_requeues, None, jobs_allowed, False,
                            note), warnings
    jobs_needed = max(1, math.ceil((total_s - timeout_min * 60) / usable_s) + 1) if total_s > timeout_min * 60 else 1
    covered = None if jobs_allowed is None else jobs_needed <= jobs_allowed
    allowed = "?" if jobs_allowed is None else str(jobs_allowed)
    note = (f"schedule {hours:,.1f} h at {seconds_per_iter:g} s/iter needs {jobs_needed} job(s) of {timeout_min} min; "
            f"time limit x (1 + max_requeues) allows {allowed}")
    if covered is False:
        warnings.append(f"the schedule needs {jobs_needed} jobs of {timeout_min} min but only {jobs_allowed} are "
                        f"allowed (1 + max_requeues={max_requeues}); raise --max-requeues to >= {jobs_needed - 1} "
                        "or the time limit")
    return TimeCoverage(seconds_per_iter, hours, timeout_min, max_requeues, jobs_needed, jobs_allowed, covered,
                        note), warnings


# ----------------------------------------------------------------------------------- plan
def plan_training(cfg: TrainConfig, nodes: int = 1, tasks_per_node: int = 1, gpus_per_node: int = 1,
                  timeout_min: int | None = None, max_requeues: int | None = None,
                  partition_max_time_min: int | None = None, seconds_per_iter: float | None = None,
                  gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
                  teacher_spec: dict[str, Any] | None = None) -> TrainingPlan:
    """The plan of one training phase on ``nodes`` × ``tasks_per_node`` processes (one GPU each when
    ``gpus_per_node`` > 0). ``teacher_spec`` (a backbone spec, ``{"arch": ..., "kwargs": ...}``) sizes a
    distillation teacher that does not exist yet; otherwise ``distill.teacher_path``'s ``model.json`` is read."""
    for name, value in (("nodes", nodes), ("tasks_per_node", tasks_per_node)):
        if value < 1:
            raise ValueError(f"{name}: {value} must be >= 1")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node: {gpus_per_node} must be >= 0")
    warnings: list[str] = []
    world_size = nodes * tasks_per_node
    on_gpu = gpus_per_node > 0 and cfg.parallel.device != "cpu"
    if cfg.parallel.device == "cuda" and gpus_per_node == 0:
        warnings.append("parallel.device is 'cuda' but the launcher requests no GPUs (gpus_per_node=0)")
    if on_gpu and tasks_per_node != gpus_per_node:
        warnings.append(f"tasks_per_node={tasks_per_node} but gpus_per_node={gpus_per_node}: the trainer runs one "
                        "task per GPU; allowed: tasks_per_node == gpus_per_node")
    bf16 = cfg.parallel.mixed_precision == "bf16" or (cfg.parallel.mixed_precision == "auto" and on_gpu)
    compute_bytes = 2 if bf16 else FP32_BYTES

    global_batch = cfg.train.batch_size_per_gpu * world_size
    peak_lr = scaled_lr(cfg.optim.base_lr, global_batch, cfg.optim.scaling_rule)
    masked_crops = 2 * cfg.train.batch_size_per_gpu * cfg.ibot.mask_sample_probability
    if cfg.ibot.loss_weight > 0 and masked_crops != int(masked_crops):
        warnings.append(f"2 x train.batch_size_per_gpu x ibot.mask_sample_probability = {masked_crops:g} is not "
                        f"an integer: {int(masked_crops)} global crops per GPU get iBOT masks")
    if cfg.dino.koleo_loss_weight > 0 and cfg.train.batch_size_per_gpu < 2:
        warnings.append("KoLeo needs batch_size_per_gpu >= 2")
    iterations = cfg.max_iter + 1  # the loop runs 0 … max_iter inclusive

    counts, largest_unit = count_parameters(cfg, _teacher_spec(cfg, teacher_spec))
    if counts.teacher_backbone is None:
        warnings.append("distillation teacher size unknown (distill.teacher_path has no model.json yet): teacher "
                        "parameters, memory and checkpoint size are left out; pass teacher_spec")
    memory = estimate_memory(cfg, counts, largest_unit, world_size, compute_bytes)
    if on_gpu and memory.total > gpu_memory_gb * 1e9:
        warnings.append(f"estimated {_gib(memory.total)} per GPU exceeds the {gpu_memory_gb:g} GB GPU"
                        + ("" if cfg.parallel.activation_checkpointing else
                           f"; parallel.activation_checkpointing=true would need "
                           f"{_gib(memory.total - memory.activations + memory.activations_with_checkpointing)}")
                        + "; or lower train.batch_size_per_gpu / add GPUs (shards params and AdamW)")

    fp32_state = (counts.student + counts.teacher + counts.student_ema) * FP32_BYTES
    checkpoint_bytes = fp32_state + 2 * counts.student * FP32_BYTES
    keep = cfg.checkpoint.keep_last
    export_bytes = counts.teacher * FP32_BYTES if cfg.phase != "distill" else counts.student * FP32_BYTES

    coverage, time_warnings = _time_coverage(iterations, cfg.checkpoint.period, timeout_min, max_requeues,
                                             seconds_per_iter)
    warnings += time_warnings
    if timeout_min is not None and partition_max_time_min is not None and timeout_min > partition_max_time_min:
        warnings.append(f"timeout_min={timeout_min} exceeds the partition's MaxTime of {partition_max_time_min} min: "
                        "Slurm will reject or cap the job")
    return TrainingPlan(
        phase=cfg.phase, arch=cfg.student.arch, nodes=nodes, tasks_per_node=tasks_per_node,
        gpus_per_node=gpus_per_node, world_size=world_size, device="cuda" if on_gpu else "cpu",
        compute_dtype="bf16" if bf16 else "fp32", batch_size_per_gpu=cfg.train.batch_size_per_gpu,
        global_batch=global_batch, base_lr=cfg.optim.base_lr, scaling_rule=cfg.optim.scaling_rule, peak_lr=peak_lr,
        iterations=iterations, params=counts, memory=memory, gpu_memory_gb=gpu_memory_gb,
        checkpoint_bytes=checkpoint_bytes, checkpoint_keep_last=keep,
        checkpoint_disk_bytes=checkpoint_bytes * (keep + 1), export_bytes=export_bytes, time=coverage,
        warnings=warnings,
    )
