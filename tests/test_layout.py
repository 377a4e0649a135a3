"""The package's shape, enforced: small modules and functions, one-way imports with no cycle, lazy imports
only for the heavy libraries named below, and printing (Rich) only in finetune.cli."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finetune"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# The deliberate lazy imports: heavy or optional libraries, imported inside the functions that use them so that
# `finetune --help` and every module import stay fast (and an optional extra is needed only when used).
LAZY = {"torch", "torchvision", "numpy", "PIL", "matplotlib", "safetensors", "onnx", "onnxscript", "onnxruntime",
        "pillow_heif", "fcntl", "cleanlab", "captum", "optuna", "sqlalchemy", "yaml", "tensorboard", "mlflow", "timm",
        "huggingface_hub", "openvino", "nncf", "fastapi", "starlette", "uvicorn", "swagger_ui_bundle"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


MODULES = _modules()
ENTRY_POINTS = {"finetune.__main__"}
# The layers, bottom up: a package or top-level module imports only those before it (and itself). The public API
# in finetune/__init__.py sits above them all. docs/architecture.md says what each holds.
LAYERS = ["_about", "errors", "config", "configfile", "_util", "data", "events", "tasks", "metrics", "models", "viz",
          "formats", "inference", "report", "training", "quality", "search", "serving", "api", "cli", "__main__"]
MAX_TOP_MODULES = 10
MAX_PACKAGE_MODULES = 20


def _imported(node) -> list[str]:
    """Modules an import statement imports (`from pkg import mod` imports pkg.mod; `from mod import name`, mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return sorted({f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names})
    return []


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_modules_and_functions_are_small():
    long_modules = {m: t.body[-1].end_lineno for m, t in MODULES.items() if t.body and t.body[-1].end_lineno
                    > MAX_MODULE_LINES}
    assert not long_modules
    long_functions = [f"{m}.{f.name} ({f.end_lineno - f.lineno + 1} lines)" for m, t in MODULES.items()
                      for f in _functions(t) if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_functions


def test_imports_inside_functions_are_only_the_named_lazy_ones():
    found = []
    for m, tree in MODULES.items():
        for f in _functions(tree):
            for node in ast.walk(f):
                for name in _imported(node):
                    if name.split(".")[0] not in LAZY:
                        found.append(f"{m}.{f.name}: import {name}")
    assert not found


def _module_level(body) -> list:
    """A module's top-level statements, with those inside `if TYPE_CHECKING:` blocks (annotation-only imports still
    tie the layers: a circle through them is a circle)."""
    out = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.extend(_module_level(node.body))
    return out


def _graph(root: bool = False) -> dict[str, set[str]]:
    """Who imports whom at module level; the package root only when root is True."""
    graph = {}
    for m, tree in MODULES.items():
        deps = set()
        for node in _module_level(tree.body):
            for name in _imported(node):
                while name and name not in MODULES:
                    name = name.rpartition(".")[0]
                if name and name != m and (root or name != "finetune"):
                    deps.add(name)
        graph[m] = deps
    return graph


def test_no_module_reaches_up_to_the_package_root():
    """The root (finetune/__init__.py) is the public face above every layer: the version and start time live in the
    leaf finetune._about, so nothing below needs the root."""
    assert {m for m, deps in _graph(root=True).items() if "finetune" in deps and m not in ENTRY_POINTS} == set()


def test_no_import_cycle():
    graph, state, cycles = _graph(root=True), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_every_module_sits_in_a_named_layer_and_the_top_stays_small():
    assert {_layer(m) for m in MODULES if m != "finetune"} <= set(LAYERS)
    top = [p.name for p in SRC.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, top
    crowded = {d.name: n for d in SRC.iterdir() if d.is_dir() and (n := len(list(d.glob("*.py")))) > MAX_PACKAGE_MODULES}
    assert not crowded


def test_layers_import_only_the_layers_below_them():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() if m != "finetune" for d in deps
                    if d != "finetune" and rank[_layer(d)] > rank[_layer(m)])
    assert not upward


def test_data_flows_one_way_the_library_never_imports_the_cli():
    library = {m: deps for m, deps in _graph().items() if not m.startswith("finetune.cli") and m not in ENTRY_POINTS}
    assert not {m: sorted(d for d in deps if d.startswith("finetune.cli")) for m, deps in library.items()
                if any(d.startswith("finetune.cli") for d in deps)}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("finetune.cli") and m not in
                                           ENTRY_POINTS))
def test_only_the_cli_prints(module):
    tree = MODULES[module]
    rich = [n for node in ast.walk(tree) for n in _imported(node) if n.split(".")[0] == "rich"]
    prints = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Name) and node.func.id == "print"]
    writes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr in
              ("stdout", "stderr") and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    assert (rich, prints, writes) == ([], [], [])


def test_option_tables_in_docs_are_those_of_help():
    from finetune.cli.reference import sync

    docs = SRC.parents[1] / "docs"
    assert sync(docs, check=True) == [], "run `python -m finetune.cli.reference` to regenerate them"
    blocks = sum(p.read_text(encoding="utf-8").count("<!-- options:") for p in docs.glob("*.md"))
    assert blocks == 9  # train, lr-find, tune, predict, evaluate, export, check, suggest, serve
