"""Stage identity and the completion record: the one answer to "is this stage done?".

**Identity.** A stage result is identified by a hash of everything it depends on (:meth:`StageSpec.parts`):
the stage name and its ``version`` from the stage table, its resolved config, the world size for
distributed stages (it sets the global batch), the content identity of each external input (source
listing, eval sets, checkpoints named in the config: sizes plus modification stamps or ETags, see
``curation.sources.listing_digest``) and, for each upstream stage, that stage's identity *and* the
content identity of the outputs it recorded. The git commit is recorded but does not enter the identity:
a code change that alters what a stage produces bumps the stage's ``version`` in the stage table.

**Layout.** Each identity has its own directory ``<work_dir>/<stage>/<identity[:16]>/`` (and, for curation
stages with ``data_dir``, ``<data_dir>/<stage>/<identity[:16]>/``): checkpoints, job logs and outputs of
one identity never mix with another's, so a training stage resumes only from checkpoints of the same
identity, a job is re-attached only when it was submitted for the same identity, and the previous result
stays readable after a retraining.

**Record.** ``_SUCCESS.json`` in that directory, written atomically and last: identity, its parts, the
outputs and their content identity. A stage is done iff the record exists, its identity equals the
current one and every recorded output still exists with the recorded content identity.
``<work_dir>/<stage>/_current.json`` points at the identity that finished last (for ``status``, the
``init: previous`` warm start and the explanation of what changed). ``_state.json`` in the identity
directory says what is happening now (running / failed, the job).

Nothing here imports Prefect: job code on compute nodes reads and writes these files too.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dinov2_core.utils.atomic import atomic_write_json
from dinov2_core.utils.config import flatten

from tasks.stage_table import STAGE_DEFS

RECORD_FILE = "_SUCCESS.json"
STATE_FILE = "_state.json"
CURRENT_FILE = "_current.json"
IDENTITY_DIR_CHARS = 16
Outcome = Literal["reused", "recomputed"]


def hash_json(obj: Any) -> str:
    """A stable hash of a JSON-able object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_digest(uri: str) -> str | None:
    """The content identity of a file, directory or object (sizes and stamps of everything below it),
    or ``None`` when nothing exists there."""
    from curation.sources import listing_digest

    try:
        return listing_digest(uri)
    except (FileNotFoundError, NotADirectoryError):
        return None


@dataclass
class StageResult:
    """What a finished stage hands downstream and to the user (typed; no nested-dict digging)."""

    stage: str
    identity: str
    outputs: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outcome: Outcome = "recomputed"
    reason: str = ""
    output_digests: dict[str, str | None] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def output(self, key: str) -> Any:
        """An output URI by name; a clear error naming what the stage does have."""
        if key not in self.outputs:
            raise KeyError(f"{self.stage} has no output {key!r}; it has {sorted(self.outputs)}")
        return self.outputs[key]

    def reference(self) -> dict[str, Any]:
        """How this result enters the identity of the stages that read it."""
        return {"identity": self.identity, "outputs": self.output_digests}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class StageSpec:
    """Everything a stage needs, built by ``tasks.wiring`` and never patched afterwards.

    ``inputs`` are handed to the job as they are. ``external`` names the inputs that come from outside
    the pipeline (their content enters the identity); inputs derived from upstream outputs are covered by
    ``upstream`` (identity and output digests of each upstream result). ``run`` holds per-run facts the
    job needs but that must not change the identity (the MLflow parent run of the report).
    """

    stage: str
    config: dict[str, Any]
    stage_root: str
    data_root: str
    inputs: dict[str, Any] = field(default_factory=dict)
    external: tuple[str, ...] = ()
    upstream: dict[str, dict[str, Any]] = field(default_factory=dict)
    launcher: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    run: dict[str, Any] = field(default_factory=dict)
    _parts: dict[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def definition(self):
        return STAGE_DEFS[self.stage]

    def parts(self) -> dict[str, str]:
        """The named components of the identity (computed once: content listings cost a round trip)."""
        if self._parts is None:
            parts = {"stage": f"{self.stage}@v{self.definition.version}", "config": hash_json(self.config)}
            if self.definition.distributed:
                parts["world_size"] = str(self.world_size)
            for name in self.external:
                value = self.inputs.get(name)
                digest = content_digest(value) if isinstance(value, str) and value else None
                parts[f"input:{name}"] = hash_json({"uri": value, "content": digest})
            for name, reference in sorted(self.upstream.items()):
                parts[f"upstream:{name}"] = hash_json(reference)
            self._parts = parts
        return self._parts

    @property
    def identity(self) -> str:
        return hash_json(self.parts())

    @property
    def stage_dir(self) -> str:
        """This identity's directory under the run directory (checkpoints, job logs, records)."""
        return os.path.join(self.stage_root, self.identity[:IDENTITY_DIR_CHARS])

    @property
    def output_uri(self) -> str:
        """Where the stage writes its outputs: the identity directory for training and evaluation (the
        trainer's checkpoints live there); for curation stages, whose outputs are directories whose content
        identity is recorded, a ``data`` folder apart from the bookkeeping, or the identity's folder under
        ``data_dir``."""
        from dinov2_core.utils.uri import join_uri

        if self.definition.kind != "curation":
            return self.stage_dir
        if self.data_root == self.stage_root:
            return os.path.join(self.stage_dir, "data")
        return join_uri(self.data_root, self.identity[:IDENTITY_DIR_CHARS])

    def job_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the stage's job function: every URI it needs, nothing to look up."""
        return {"config": self.config, "inputs": self.inputs, "output_uri": self.output_uri,
                "stage_dir": self.stage_dir, "run": self.run}


def code_version() -> str:
    """The git commit of the checkout the code runs from (``+dirty`` if modified), else the package version.
    Recorded with each result; not part of the identity (see the module docstring)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return "dinov2-pipeline==" + version("dinov2-pipeline")
        except PackageNotFoundError:
            return "unknown"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_record(stage_dir: str) -> dict[str, Any] | None:
    return read_json(os.path.join(stage_dir, RECORD_FILE))


def output_digests(outputs: dict[str, Any]) -> dict[str, str]:
    """Content identity of every output that names an existing file, directory or object (``dir``
    excluded: a training stage's bookkeeping lives there; words such as a source kind are not outputs)."""
    digests = {}
    for key, value in sorted(outputs.items()):
        if key != "dir" and isinstance(value, str) and ("/" in value or "://" in value):
            digest = content_digest(value)
            if digest is not None:
                digests[key] = digest
    return digests


def finished(spec: StageSpec) -> tuple[StageResult | None, str]:
    """``(result, "")`` when ``spec``'s identity finished and its outputs are intact, else ``(None, why not)``."""
    record = read_record(spec.stage_dir)
    if record is None:
        return None, "no finished result for these inputs"
    if record.get("identity") != spec.identity:
        return None, "the record in its directory belongs to other inputs"
    result = StageResult.from_dict(record["result"])
    if result.extra.get("complete") is False:
        return None, "the last result lost reads to storage outages"
    for key, recorded in result.output_digests.items():
        current = content_digest(result.outputs[key])
        if current is None:
            return None, f"output {key} ({result.outputs[key]}) is missing"
        if current != recorded:
            return None, f"output {key} ({result.outputs[key]}) was modified after the stage finished"
    return result, ""


def write_record(spec: StageSpec, result: StageResult) -> StageResult:
    """Publish the completion record (last, atomically) and point ``_current.json`` at it."""
    result.output_digests = output_digests(result.outputs)
    record = {
        "stage": spec.stage,
        "identity": spec.identity,
        "parts": spec.parts(),
        "config": spec.config,
        "inputs": spec.inputs,
        "code_version": code_version(),
        "finished_at": now(),
        "result": result.to_dict(),
    }
    atomic_write_json(os.path.join(spec.stage_dir, RECORD_FILE), record)
    atomic_write_json(os.path.join(spec.stage_root, CURRENT_FILE),
                      {"identity": spec.identity, "dir": spec.stage_dir, "finished_at": record["finished_at"]})
    write_state(spec.stage_dir, status="done")
    return result


def current_dir(stage_root: str) -> str | None:
    """The directory of the identity that finished last under ``<work_dir>/<stage>``."""
    pointer = read_json(os.path.join(stage_root, CURRENT_FILE))
    return pointer.get("dir") if pointer else None


def current_record(stage_root: str) -> dict[str, Any] | None:
    """The record of the identity that finished last under ``<work_dir>/<stage>``."""
    directory = current_dir(stage_root)
    return read_record(directory) if directory else None


def explain_change(spec: StageSpec, previous: dict[str, Any] | None) -> str:
    """Why ``spec`` must be computed, in words: which part of its identity differs from the last result."""
    if previous is None:
        return "first run of this stage"
    old = previous.get("parts") or {}
    reasons = []
    for name, value in spec.parts().items():
        if old.get(name) == value:
            continue
        if name == "config":
            changed = _changed_keys(previous.get("config") or {}, spec.config)
            reasons.append("config changed" + (f" ({', '.join(changed)})" if changed else ""))
        elif name.startswith("input:"):
            reasons.append(f"input {name[6:]} changed")
        elif name.startswith("upstream:"):
            reasons.append(f"upstream {name[9:]} changed")
        elif name == "stage":
            reasons.append(f"stage code version changed ({old.get(name)} -> {value})")
        else:
            reasons.append(f"{name} changed ({old.get(name)} -> {value})")
    reasons += [f"upstream {name[9:]} no longer used" for name in old if name not in spec.parts()]
    return "; ".join(reasons) or "outputs of the last result are missing or were modified"


def _changed_keys(old: dict[str, Any], new: dict[str, Any], limit: int = 5) -> list[str]:
    flat_old, flat_new = flatten(old), flatten(new)
    keys = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
    return keys[:limit] + ([f"+{len(keys) - limit} more"] if len(keys) > limit else [])


def read_state(stage_dir: str) -> dict[str, Any]:
    return read_json(os.path.join(stage_dir, STATE_FILE)) or {}


def write_state(stage_dir: str, **updates: Any) -> dict[str, Any]:
    """Merge ``updates`` into the stage's ``_state.json`` (atomically)."""
    state = read_state(stage_dir)
    state.update(updates)
    state["updated_at"] = now()
    atomic_write_json(os.path.join(stage_dir, STATE_FILE), state)
    return state


def identity_dirs(stage_root: str) -> list[str]:
    """Every identity directory of a stage (for cancelling jobs of outdated identities)."""
    if not os.path.isdir(stage_root):
        return []
    return sorted(os.path.join(stage_root, name) for name in os.listdir(stage_root)
                  if os.path.isdir(os.path.join(stage_root, name)) and len(name) == IDENTITY_DIR_CHARS)
def split_summary(summary: dict[str, Any], output_uri: str) -> dict[str, Any]:
    """What a job returns, from a curation stage function's summary → ``{"outputs": URIs, "metrics": numbers, "artifacts": local files}``.

    Strings are outputs, numbers (also nested, e.g. per-reason reject counts) are metrics; local
    ``.png``/``.md``/``.json`` outputs are also logged as MLflow artifacts.
    """
    outputs: dict[str, Any] = {"dir": output_uri}
    metrics: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, bool):
            metrics[key] = int(value)
        elif isinstance(value, (int, float)):
            metrics[key] = value
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            metrics[key] = dict(value)
        elif isinstance(value, (str, list, dict)):
            outputs[key] = value
    artifacts = [
        v for v in outputs.values()
        if isinstance(v, str) and v.endswith((".png", ".md", ".json")) and os.path.exists(v)
    ]
    return {"outputs": outputs, "metrics": metrics, "artifacts": artifacts}
