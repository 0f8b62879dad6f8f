"""The core distribution itself: its declared dependencies and what `import kiln` sets up."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# imported by core/ but installed by a declared dependency, or optional (imported where needed)
PROVIDED_BY = {"starlette": "fastapi", "tvm_ffi": "apache-tvm", "tvm": "apache-tvm", "importlib_metadata": "importlib-metadata"}
OPTIONAL = {"torch"}  # only for pytorch_model.bin checkpoints, with a clear error when missing


def _declared() -> set[str]:
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}


def test_every_third_party_module_the_core_imports_is_a_declared_dependency():
    imported: dict[str, str] = {}
    for path in (ROOT / "core").rglob("*.py"):
        if "testing" in path.relative_to(ROOT / "core").parts:  # the pytest plugin: the [test] extra
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "kiln" and top not in OPTIONAL:
                    imported.setdefault(top, str(path.relative_to(ROOT)))
    declared = _declared()
    missing = {m: where for m, where in imported.items() if PROVIDED_BY.get(m, m).lower() not in declared}
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"


def _kiln_threads(env: dict, cpus: set[int] | None = None) -> str:
    code = "import os, kiln; print(os.environ['TVM_NUM_THREADS'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    return res.stdout.strip()


def test_import_kiln_sets_tvm_threads_to_the_cores_unless_the_user_did():
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    assert _kiln_threads(env) == str(len(os.sched_getaffinity(0)))
    one = {min(os.sched_getaffinity(0))}
    assert _kiln_threads(env, one) == "1"  # the cores this process may run on, not the machine's
    assert _kiln_threads({**env, "TVM_NUM_THREADS": "3"}) == "3"
