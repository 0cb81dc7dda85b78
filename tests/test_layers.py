"""The package's layers: no module imports from a layer above its own, and the parts do not
import each other in a cycle. Imports inside functions count too (a lazy import is still a
dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "raydsnas"

# Bottom to top. A part is a subpackage (`raydsnas.strategies`) or a top-level module.
LAYERS = [
    {"raydsnas", "raydsnas.checks", "raydsnas.local_ray", "raydsnas.evaluation",
     "raydsnas.space"},
    {"raydsnas.data"},
    {"raydsnas.export", "raydsnas.strategies"},
    {"raydsnas.config"},
    {"raydsnas.preflight", "raydsnas.train"},
    {"raydsnas.search", "raydsnas.tune", "raydsnas.report", "raydsnas.analysis",
     "raydsnas.reference"},
]


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def imports() -> dict[str, set[str]]:
    """module -> the raydsnas modules it imports."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        found = out.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            found.update(n for n in names if n == "raydsnas" or n.startswith("raydsnas."))
    return out


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part(name) in layer:
            return i
    raise AssertionError(f"{part(name)} is in no layer of tests/test_layers.py: add it")


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{module} (layer {layer_of(module)}) imports {target} (layer "
                    f"{layer_of(target)})"
                    for module, targets in imports().items() for target in targets
                    if layer_of(target) > layer_of(module))
    assert not upward, "\n".join(upward)


def test_the_parts_import_each_other_without_a_cycle():
    graph: dict[str, set[str]] = {}
    for module, targets in imports().items():
        graph.setdefault(part(module), set()).update(
            part(t) for t in targets if part(t) != part(module) and t != "raydsnas")
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):]
                                                                 + [node]))
        if node in done:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, [*stack, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_the_layer_check_sees_an_upward_import():
    """The check itself: strategies importing train would be caught."""
    assert layer_of("raydsnas.train.loop") > layer_of("raydsnas.strategies.dsnas")
    assert "raydsnas.strategies.collective" in imports()["raydsnas.strategies.base"]
