"""
Rules of the package's shape, checked on its source: which modules may import
llm-compressor, no import cycles, short functions, family facts only in the
architecture table, and a light ``import ream_modifiers.check``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ream_modifiers"
HEAVY = ("llmcompressor", "compressed_tensors")
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or (
        getattr(test, "attr", None) == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Modules imported when ``module`` executes (not in functions or
    ``TYPE_CHECKING`` blocks)."""
    found: set[str] = set()
    nodes = list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and not _is_type_checking(node):
            nodes += node.body + node.orelse
        elif isinstance(node, ast.Try):
            nodes += node.body + node.orelse + node.finalbody
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from package import module` imports the submodule
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        tree = ast.parse(path.read_text())
        graph[name] = _top_level_imports(tree, name, path.name == "__init__.py")
    return graph


GRAPH = _graph()


def _closure(start: str) -> set[str]:
    """Our modules ``start`` imports, directly or not (package ``__init__``
    side effects aside: the packages on the way are lazy)."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        for imported in GRAPH.get(module, ()):
            if imported in GRAPH and imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def _imports_heavy(module: str) -> bool:
    return any(i.split(".")[0] in HEAVY for i in GRAPH[module])


def _pure_math_modules() -> list[str]:
    engines = [m for m in GRAPH if m.startswith("ream_modifiers.engines.")]
    own_math = [
        m
        for m in GRAPH
        if m.startswith("ream_modifiers.modifiers.")
        and m.count(".") == 3
        and not m.endswith(".modifier")
    ]
    return sorted(engines + own_math)


def test_the_pure_math_never_imports_llm_compressor():
    modules = _pure_math_modules()
    assert "ream_modifiers.engines.align" in modules
    assert "ream_modifiers.modifiers.dern.recombine" in modules
    for module in modules:
        reached = {module, *_closure(module)}
        heavy = sorted(m for m in reached if _imports_heavy(m))
        assert not heavy, f"{module} reaches llm-compressor through {heavy}"


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for imported in sorted(GRAPH[module]):
            if imported not in GRAPH or imported.endswith("__init__"):
                continue
            if state.get(imported) == 1:
                return stack[stack.index(imported) :] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    assert _cycle() is None, " -> ".join(_cycle() or [])


def _long_functions() -> list[str]:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines -= first.end_lineno - first.lineno + 1  # the docstring
            if lines > MAX_FUNCTION_LINES:
                long.append(f"{_module_name(path)}.{node.name}: {lines} lines")
    return long


def test_functions_are_short():
    assert _long_functions() == []


def test_family_facts_live_in_the_architecture_table():
    """No branch on a family name outside ``moe/architectures.py`` (and the
    tiny-model builder, whose per-family configs are test data)."""
    allowed = {"ream_modifiers.moe.architectures", "ream_modifiers.tiny"}
    branches = []
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path) in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            names = [node.left, *node.comparators]
            on_family = any(
                getattr(n, "attr", getattr(n, "id", None)) == "model_type"
                for n in names
            )
            if on_family:
                branches.append(f"{_module_name(path)}:{node.lineno}")
    assert branches == []


def _fresh(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]  # after any library log lines


def test_the_checker_imports_neither_torch_nor_llm_compressor(tiny_model_dir):
    """``ream-compress check`` reads headers: it runs where only the package's
    light dependencies are installed."""
    model = tiny_model_dir("qwen3_moe")
    loaded = _fresh(
        "import sys\n"
        "from ream_modifiers.cli import main\n"
        f"code = main(['check', {str(model)!r}])\n"
        "heavy = ('torch', 'transformers', 'llmcompressor', 'compressed_tensors')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules))"
    )
    assert loaded == "0 []"


@pytest.mark.parametrize(
    "imports",
    [
        "import ream_modifiers, llmcompressor",
        "import llmcompressor, ream_modifiers",
        # our own module is what first imports llm-compressor: registration waits
        # for the factory's first use, when that module is whole
        "import ream_modifiers; from ream_modifiers.moe import load_moe_model",
    ],
)
def test_import_registers_whichever_comes_first(imports):
    """``import ream_modifiers`` registers the modifiers with llm-compressor and
    installs the causal calibration patch, in whatever order things load."""
    registered = _fresh(
        f"{imports}\n"
        "from llmcompressor.modifiers.factory import ModifierFactory as F\n"
        "from llmcompressor.recipe import Recipe\n"
        "from llmcompressor.pipelines.sequential.helpers import SequentialTracer\n"
        "recipe = Recipe.create_instance('s_stage:\\n  s_modifiers:\\n"
        "    DERNModifier: {sparsity: 0.5}\\n')\n"
        "from ream_modifiers.registry import methods\n"
        "print(type(recipe.modifiers[0]).__name__,"
        " all(F._registered_registry[m.class_name] is m.modifier for m in methods()),"
        " len(methods()),"
        " hasattr(SequentialTracer.create_arg, '_ream_causal_calibration'))"
    )
    assert registered == "DERNModifier True 9 True"
