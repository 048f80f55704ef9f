"""The package's layers, read from the source: what may import what, and where config stops.

cli/sweep -> tasks/ -> training/ -> data/, models/, inference/, config_checks, runtime
-> errors, files, viz. Only tasks/ (and cli, sweep) read the composed config; the libraries
below take explicit arguments. The layer table is the design's (../shared/design/LAYERS.md),
written here by hand, not read from the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seg_train"

# Higher numbers sit higher; a module may import only its own level or lower ones.
LEVELS = {
    "seg_train.cli": 5,
    "seg_train.sweep": 5,
    "seg_train.__main__": 5,
    "seg_train.tasks": 4,
    "seg_train.training": 3,
    "seg_train.data": 2,
    "seg_train.models": 2,
    "seg_train.inference": 2,
    "seg_train.config_checks": 2,
    "seg_train.runtime": 2,
    "seg_train.errors": 1,
    "seg_train.files": 1,
    "seg_train.viz": 1,
    "seg_train": 0,  # the package's __init__: a docstring
}
LIBRARIES = ("training", "inference", "data", "models")
CONFIG_PACKAGES = ("omegaconf", "hydra")
CONFIG_TYPES = ("DictConfig", "ListConfig")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[str]:
    """Every seg_train module a file imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append(child if child in MODULES else node.module)
    return [name for name in found if name.split(".")[0] in ("seg_train", *CONFIG_PACKAGES)]


GRAPH = {name: sorted(set(_imports(path)) - {name}) for name, path in MODULES.items()}


def _level(module: str) -> int:
    prefix = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[prefix]


def test_every_module_has_a_layer():
    assert all(_level(name) >= 0 for name in MODULES)
    assert len(MODULES) > 60  # the walk found the package


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_up_a_layer(module):
    upward = [
        target
        for target in GRAPH[module]
        if target.startswith("seg_train") and _level(target) > _level(module)
    ]
    assert upward == [], f"{module} (level {_level(module)}) imports {upward}"


def test_the_import_graph_has_no_cycles():
    seg = {m: [t for t in GRAPH[m] if t in MODULES and t != "seg_train"] for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in seg[node]:
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for module in seg:
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] in LIBRARIES)
)
def test_libraries_neither_import_nor_receive_the_config(module):
    config_imports = [t for t in GRAPH[module] if t.split(".")[0] in CONFIG_PACKAGES]
    assert config_imports == [], f"{module} imports {config_imports}"
    # No parameter annotated as a config node, and no `cfg` parameter under any annotation.
    tree = ast.parse(MODULES[module].read_text())
    offenders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            for arg in args:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                if arg.arg == "cfg" or any(t in annotation for t in CONFIG_TYPES):
                    offenders.append(f"{node.name}({arg.arg}: {annotation})")
    assert offenders == [], f"{module}: {offenders}"


def test_the_top_level_is_small():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(top) <= 8, top
