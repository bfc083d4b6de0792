"""What a compute node imports to run a stage job: the pickled ``StageJob`` and its job module, and no
Prefect or MLflow (nodes need neither; importing Prefect on every Slurm task cost seconds and a config dir)."""

from __future__ import annotations

import subprocess
import sys

from tests.pipeline.conftest import REPO_ROOT


def test_unpickling_and_importing_jobs_imports_no_orchestration():
    code = (
        "import pickle, sys\n"
        "from tasks.stage_table import STAGE_TABLE\n"
        "from tasks.launch import StageJob\n"
        "import importlib\n"
        "for stage in STAGE_TABLE:\n"
        "    if stage.kind == 'report':\n"
        "        continue  # runs in the flow process, where Prefect and MLflow are loaded anyway\n"
        "    job = pickle.loads(pickle.dumps(StageJob(stage.job, {}, stage.distributed)))\n"
        "    importlib.import_module(job.target.split(':')[0])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_tasks_has_no_import_cycle():
    """``tasks/`` imports form a DAG (also function-level imports): the schema never imports the wiring."""
    import ast

    package = REPO_ROOT / "tasks"
    graph = {}
    for path in package.glob("*.py"):
        module = f"tasks.{path.stem}"
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tasks"):
                names.add(node.module if node.module != "tasks" else f"tasks.{node.names[0].name}")
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("tasks."))
        graph[module] = names - {module}

    def visit(module, stack):
        assert module not in stack, " -> ".join([*stack, module])
        for dependency in graph.get(module, ()):
            visit(dependency, [*stack, module])

    for module in graph:
        visit(module, [])
    assert graph["tasks.config"] <= {"tasks.stage_table"}
