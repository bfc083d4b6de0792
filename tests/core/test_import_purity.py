"""dinov2_core must import with only torch, torchvision, numpy and pillow installed.

A subprocess imports every dinov2_core module with the orchestration and optional libraries made
unimportable, so an accidental top-level ``import prefect`` (or pyyaml, pyarrow, ...) fails here.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import dinov2_core

FORBIDDEN = ["prefect", "mlflow", "submitit", "faiss", "dask", "distributed", "s3fs", "yaml", "pyarrow",
             "pandas", "sklearn", "matplotlib", "curation", "tasks", "flows"]


def _all_modules() -> list[str]:
    root = Path(dinov2_core.__file__).parent
    return ["dinov2_core"] + [
        m.name for m in pkgutil.walk_packages([str(root)], prefix="dinov2_core.")
    ]


def test_dinov2_core_imports_without_optional_dependencies():
    script = (
        "import sys\n"
        f"for name in {FORBIDDEN!r}:\n"
        "    sys.modules[name] = None  # makes 'import name' raise ImportError\n"
        "import importlib\n"
        f"for module in {_all_modules()!r}:\n"
        "    importlib.import_module(module)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
