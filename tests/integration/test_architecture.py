"""The layers of ``storydiff`` (ARCHITECTURE.md §1), enforced from the source: no import cycle (imports inside
functions included; ``TYPE_CHECKING`` imports excepted), no import from a lower layer into a higher one, model
families named only by the families package, tiny builders off the runtime import path, and every module
described in ARCHITECTURE.md."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "storydiff"

# bottom to top: a module imports only from its own layer or the layers below it
LAYERS = [
    ("support",),
    ("consistency",),
    ("families",),
    ("models",),
    ("pages",),
    ("runs",),
    ("pipeline", "config"),  # the facade, and the old home of ConsistencyConfig (an alias)
    ("evaluation", "motion", "benchmark"),
    ("cli",),
]


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(child) for child in ast.walk(node))
    return ids


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The storydiff modules an import statement loads (a name imported from a package may be a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [
            f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
            for alias in node.names
        ]
    found = []
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rpartition(".")[0]
        if name in MODULES and name != module and name != "storydiff" and name.startswith("storydiff"):
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                graph[module].update(_targets(module, node))
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS: place it (and describe it in ARCHITECTURE.md)")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in list(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_cycles_are_seen_through_imports_inside_functions() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(defaultdict(set, graph)) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .hosts import x\n")
    assert any(isinstance(node, ast.ImportFrom) for node in ast.walk(tree))  # walked, not just the body


def test_imports_point_down() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def _diffusers_model_classes() -> set[str]:
    """The names of diffusers' pipeline and denoiser classes (from its lazy namespace: nothing imported)."""
    import diffusers

    names = set(dir(diffusers))
    pipelines = {
        n for n in names if n.endswith("Pipeline") and n != "DiffusionPipeline"
    }  # the base is generic
    denoisers = {n for n in names if re.search(r"(Transformer\dDModel|UNet\w*Model)$", n)}
    return pipelines | denoisers


def test_only_the_families_package_names_diffusers_pipelines_and_denoisers() -> None:
    classes = _diffusers_model_classes()
    assert {"FluxPipeline", "UNet2DConditionModel", "WanTransformer3DModel"} <= classes
    offenders = defaultdict(set)
    for module, path in MODULES.items():
        if module.startswith("storydiff.families."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.alias):
                name = node.name.rpartition(".")[2]
            elif isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value
            else:
                continue
            if name in classes:
                offenders[module].add(name)
    assert dict(offenders) == {}


@pytest.mark.parametrize("module", ["storydiff", "storydiff.pipeline", "storydiff.models.loading"])
def test_tiny_builders_are_not_imported_at_runtime(module: str) -> None:
    code = f"import sys, {module}; print('storydiff.families.tiny_models' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_architecture_md_describes_every_module() -> None:
    """Each module's file name appears as a word in ARCHITECTURE.md (§1 lists them, package by package)."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    files = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"]
    files += [p for p in (ROOT / "csa_kernels").glob("*.py") if p.name != "__init__.py"]
    missing = [
        str(path.relative_to(ROOT))
        for path in files
        if not re.search(rf"(?<![\w/]){re.escape(path.name)}\b", text)
        and str(path.relative_to(PACKAGE)) not in text
    ]
    assert sorted(missing) == []


def test_imports_from_before_the_layers_keep_working() -> None:
    """The public names, and the README's imports before 0.6 (storydiff.config, storydiff.pipeline)."""
    import storydiff
    from storydiff.config import ConsistencyConfig
    from storydiff.consistency.config import ConsistencyConfig as Core
    from storydiff.pipeline import StoryDiffusionPipeline

    assert ConsistencyConfig is Core is storydiff.ConsistencyConfig
    assert StoryDiffusionPipeline is storydiff.StoryDiffusionPipeline
    for name in storydiff.__all__:
        assert getattr(storydiff, name) is not None


def test_run_layer_functions_take_at_most_twelve_parameters() -> None:
    """Runs take a plan (runs/plan.py), not long parameter lists."""
    long = []
    for path in (PACKAGE / "runs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                count = len([n for n in names if n not in ("self", "cls")])
                if count > 12:
                    long.append(f"{path.name}:{node.name} ({count})")
    assert long == []
