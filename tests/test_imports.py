"""Import isolation of the ``everest`` library.

* Importing every module of ``everest`` (in a fresh interpreter) loads nothing of the orchestration layer:
  no Prefect, Dask, distributed, dask-jobqueue, prefect-dask and nothing of ``flows``. The library runs in
  batch jobs and notebooks without them; only ``flows`` may import ``everest``, not the other way round.
* The ``everest`` modules import each other without a cycle, counting imports inside functions (a lazy import
  is still a dependency) but not those under ``if TYPE_CHECKING:`` (never executed).
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "everest"
ORCHESTRATION = ("prefect", "dask", "distributed", "dask_jobqueue", "prefect_dask", "flows")

IMPORT_ALL = f"""
import importlib, json, pkgutil, sys

banned = {ORCHESTRATION!r}
culprits, seen = {{}}, set()
def blame(what):
    new = {{m for m in sys.modules if m.partition(".")[0] in banned}} - seen
    if new:
        culprits[what] = sorted(new)
        seen.update(new)

import everest
blame("everest")
names = sorted(m.name for m in pkgutil.walk_packages(everest.__path__, "everest."))
blame("the subpackages pkgutil.walk_packages imports to list their modules")
for name in names:
    importlib.import_module(name)
    blame(name)
print(json.dumps({{"modules": names, "offenders": sorted(seen), "culprits": culprits}}))
"""


def test_importing_every_everest_module_loads_no_orchestration_package():
    r = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expected = {_module_name(p) for p in PACKAGE.rglob("*.py")} - {"everest"}
    assert set(out["modules"]) == expected, "pkgutil.walk_packages did not reach every module"
    offenders = out["offenders"]
    brought = {by: f"{mods[:5]}{' ...' if len(mods) > 5 else ''}" for by, mods in out["culprits"].items()}
    assert not offenders, (
        f"importing everest loaded {sorted({m.partition('.')[0] for m in offenders})}; first brought in by "
        f"{brought}; all {len(offenders)} offending modules: {offenders}")


# ---------------------------------------------------------------------------------------------------- cycles


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every ``everest`` module one file imports (anywhere in it except ``if TYPE_CHECKING:`` bodies)."""

    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.found: set[str] = set()

    def _add(self, name: str) -> None:
        while name and name not in self.modules:  # an attribute path: the module that defines it
            name = name.rpartition(".")[0]
        if name:
            self.found.add(name)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.partition(".")[0] == "everest":
                self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            base = ".".join([*base, node.module] if node.module else base)
        else:
            base = node.module or ""
        if base.partition(".")[0] != "everest":
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.modules else base)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``everest`` modules it imports."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        visitor = _Imports(module, path.name == "__init__.py", set(files))
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        graph[module] = visitor.found - {module}
    return graph


def test_the_import_graph_is_read():
    graph = import_graph()
    assert {"everest.training.loop", "everest.model.network", "everest.config"} <= graph["everest.training.train"]
    assert {"everest.training.fast", "everest.model.losses", "everest.model.network"} <= graph["everest.training.loop"]
    assert {"everest.model.batched", "everest.training.loop",
            "everest.training.train"} <= graph["everest.training.group"]
    assert "everest.cli" in graph["everest.__main__"]
    assert "everest.config" in graph["everest.model.losses"]


def test_relative_and_lazy_imports_resolve_and_type_checking_ones_do_not_count():
    modules = {"everest", "everest.scoring.metrics", "everest.analysis", "everest.analysis.stats",
               "everest.analysis.plots"}
    source = """
from typing import TYPE_CHECKING
from . import stats
from .stats import bootstrap
from ..scoring import metrics
from ..scoring.metrics import tss
if TYPE_CHECKING:
    from everest.data.samples import SampleSet
else:
    import everest.analysis
def later():
    from everest import __version__
"""
    plots = _Imports("everest.analysis.plots", False, modules)
    plots.visit(ast.parse(source))
    assert plots.found == {"everest.analysis.stats", "everest.scoring.metrics", "everest.analysis", "everest"}
    package = _Imports("everest.analysis", True, modules)
    package.visit(ast.parse("from . import stats\nfrom .plots import figure\nfrom .missing import x\n"))
    assert package.found == {"everest.analysis.stats", "everest.analysis.plots", "everest.analysis"}


def test_everest_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        cycle = err.args[1]
        raise AssertionError(f"import cycle among everest modules: {' -> '.join(reversed(cycle))}") from None
