"""The library core sits below the tools: no import cycle, no way back up.

Counts every import of the package's modules, those only made for type checking
included, so a layer that needs another's types still depends on it.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "sae_lens_sampled"
TOOLS = ("sae_lens_sampled.distributed", "sae_lens_sampled.benchmark")
ENTRY_POINTS = {
    "sae_lens_sampled",
    "sae_lens_sampled.__main__",
    "sae_lens_sampled._plugin",
    "sae_lens_sampled.cli",
}


def module_imports(root: Path) -> dict[str, set[str]]:
    """Each module of the package under ``root`` and the package modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {m for m in imported if m.startswith("sae_lens_sampled.")}
    return graph


def core_modules(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        name
        for name in graph
        if name not in ENTRY_POINTS and not name.startswith(TOOLS)
    )


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_the_core_imports_nothing_from_the_tools():
    graph = module_imports(PACKAGE)
    upward = {
        name: sorted(m for m in graph[name] if m.startswith(TOOLS))
        for name in core_modules(graph)
    }
    assert {name: found for name, found in upward.items() if found} == {}
    assert "sae_lens_sampled.saes.base" in upward  # the walk found the core


def test_no_core_module_imports_itself_back():
    graph = module_imports(PACKAGE)
    assert [m for m in core_modules(graph) if m in reachable(graph, m)] == []


def test_no_module_of_the_tools_imports_itself_back():
    graph = module_imports(PACKAGE)
    tools = [name for name in graph if name.startswith(TOOLS)]
    assert "sae_lens_sampled.benchmark.compare" in tools  # the walk found the tools
    assert [m for m in tools if m in reachable(graph, m)] == []


# Lines (as `wc -l` counts them) each layer may hold: docs/architecture.md, "Size".
# A change that needs more raises its budget in the same commit and says why.
LINE_BUDGETS = {"core": 4_900, "tools": 7_700}
TOOL_FILES = ("cli.py", "calibration.py")


def layer_lines(root: Path) -> dict[str, int]:
    lines = dict.fromkeys(LINE_BUDGETS, 0)
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        is_tool = rel.parts[0] in ("benchmark", "distributed") or rel.name in TOOL_FILES
        lines["tools" if is_tool else "core"] += len(path.read_text().splitlines())
    return lines


def test_each_layer_stays_within_its_line_budget():
    lines = layer_lines(PACKAGE)
    assert lines["core"] > 1_000 and lines["tools"] > 1_000  # the walk found both
    over = {k: (n, LINE_BUDGETS[k]) for k, n in lines.items() if n > LINE_BUDGETS[k]}
    assert over == {}, f"layer: (lines, budget) over budget: {over}"
