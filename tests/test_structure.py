"""The package's import graph: no cycle between modules and no arrow up the layers.

Layers, lowest first (a module may import its own package and any package of a lower layer, never a higher one):
``io`` (shards, the job directory layout, manifests, atomic writes) and ``logs`` know nothing of models; ``model``
(open_clip wrappers, losses, checkpoints) and ``grads`` (per-sample gradient features) are pure torch; ``scores``
(the math of every method) and ``config`` (the job schema, which names the score columns); ``jobfiles`` (reading
a job directory); ``scorer`` (the
orchestrator, no Ray); ``explain`` (reading a finished job's features) below ``select`` (ranking, policies,
manifests' selection), which policies build on; ``deletion``; the Ray layer ``distributed``; the job entry
``jobs``, ``rescore``, ``report``, ``train`` and ``demo`` library modules; ``cli`` on top (the commands: argparse
lives there and nowhere else).

Every import counts, at module level or inside a function (a lazy import is still a dependency), except those under
``if TYPE_CHECKING:`` (annotations only, never executed) and under ``if __name__ == "__main__":`` (run only when the
module is the program, as ``python -m pruner.jobs.prune`` is: a command entrypoint, not a dependency of the library).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pruner

ROOT = Path(pruner.__file__).resolve().parent
LAYERS = [{"io", "logs"}, {"model"}, {"grads"}, {"scores"}, {"config"}, {"jobfiles"}, {"scorer"}, {"explain"},
          {"select"}, {"deletion"}, {"distributed"}, {"jobs"}, {"rescore"}, {"report", "train", "demo"}, {"cli"}]
LEVEL = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> list[str]:
    """The pruner modules a module imports when it runs as a library (``if TYPE_CHECKING:`` and
    ``if __name__ == "__main__":`` blocks skipped)."""
    found = []

    def visit(node):
        if isinstance(node, ast.If) and ("TYPE_CHECKING" in ast.unparse(node.test)
                                         or ast.unparse(node.test) == "__name__ == '__main__'"):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pruner":
            found.extend(f"{node.module}.{a.name}" for a in node.names)
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.split(".")[0] == "pruner")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in paths.items():
        for target in runtime_imports(ast.parse(path.read_text())):
            # "from pruner.a import b" names module pruner.a.b when it exists, else an attribute of pruner.a
            module = target if target in paths else target.rpartition(".")[0] if target.rpartition(".")[0] in paths \
                else None
            if module and module != name and not name.startswith(module + "."):  # a package's own __init__: not a dep
                graph[name].add(module)
    return {name: graph.get(name, set()) for name in paths}


def package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    packages = {package(m) for m in import_graph()} - {None, "__main__"}
    assert packages <= set(LEVEL), f"packages without a layer in this test: {sorted(packages - set(LEVEL))}"


def test_no_import_points_up_the_layers():
    graph = import_graph()
    up = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                if package(a) in LEVEL and package(b) in LEVEL and LEVEL[package(b)] > LEVEL[package(a)])
    assert not up, "imports up the layers:\n" + "\n".join(up)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The parser finds lazy imports and skips TYPE_CHECKING ones (so the tests above could fail)."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pruner.cli import main\n"
                     "def f():\n    from pruner.select.rank import Selection\n    import pruner.io.shards\n"
                     "if __name__ == '__main__':\n    from pruner.cli.prune import main\n")
    assert runtime_imports(tree) == ["pruner.select.rank.Selection", "pruner.select.rank", "pruner.io.shards"]
    graph = import_graph()
    assert "pruner.scores.combine" in graph["pruner.config"]  # a real edge, found


def test_argparse_only_in_the_commands():
    """Library modules take arguments, not command lines: argparse is imported only under pruner/cli."""
    users = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts
                   and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in
                           ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module])
                           for n in ast.walk(ast.parse(p.read_text()))))
    assert not users, f"argparse outside pruner/cli: {users}"
