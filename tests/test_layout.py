"""The layout the imports draw: layers that import only downward, no circles, no private name crossing a
module, and bench/ as an ordinary client of the package (docs/design.md, "Layers").

Layers, top to bottom (a module may import its own layer and the layers below it):

    entry       asectl.cli, asectl.__main__, asectl.testing (test material: nothing in the package imports it)
    commands    asectl.commands.*                 one module per subcommand or group, thin over the stages
    stages      asectl.stages.*                   run_* library functions, settings, the modality glue
    libraries   asectl.backends.*, asectl.models.*, asectl.bundle, asectl.report, asectl.metrics
    domain      asectl.domain (card, dataset, synth: the card format, datasets, the generator)
    base        asectl.cache, asectl.executors, asectl.ray_executor, asectl.workers, asectl.registry,
                asectl.imageio, asectl.ui, asectl.environment, asectl.settings, asectl.errors, asectl (the version)

Every import counts, also those inside functions (the package imports heavy libraries lazily).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "asectl"
BENCH = ROOT / "bench"

LAYERS = (
    ("entry", ("asectl.cli", "asectl.__main__", "asectl.testing")),
    ("commands", ("asectl.commands",)),
    ("stages", ("asectl.stages",)),
    (
        "libraries",
        ("asectl.backends", "asectl.models", "asectl.bundle", "asectl.export", "asectl.report", "asectl.metrics"),
    ),
    ("domain", ("asectl.domain",)),
    (
        "base",
        (
            "asectl.cache",
            "asectl.executors",
            "asectl.ray_executor",
            "asectl.workers",
            "asectl.registry",
            "asectl.imageio",
            "asectl.ui",
            "asectl.environment",
            "asectl.settings",
            "asectl.errors",
            "asectl",
        ),
    ),
)
# No known exception: executors are found through asectl.registry.EXECUTORS (the local/ray circle is gone).
KNOWN_CIRCLES: set[frozenset[str]] = set()
# bench's results limit (bench/_common.py SUMMARY_LIMIT): summaries only, per-card output under bench/out.
SUMMARY_LIMIT = 200_000


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p, ROOT): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import statement of a file. ``from M
    import x`` where M.x is a module of the package counts as importing that module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
    return out


def layer_of(module: str) -> int:
    best = max(
        (
            (len(prefix), i)
            for i, (_, prefixes) in enumerate(LAYERS)
            for prefix in prefixes
            if module == prefix or module.startswith(prefix + ".")
        ),
        default=None,
    )
    assert best is not None, f"{module} is in no layer: add it to LAYERS here and to docs/design.md"
    return best[1]


def package_graph() -> dict[str, set[str]]:
    return {
        name: {m for m, _, _ in imports(path, name) if m in MODULES and m != name} for name, path in MODULES.items()
    }


def test_every_module_has_a_layer_and_imports_only_downward():
    wrong = []
    for name, targets in package_graph().items():
        for target in targets:
            if layer_of(target) < layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports that run upward:\n" + "\n".join(sorted(wrong))


def test_no_circles_between_modules():
    graph = package_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(frozenset(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert set(circles) <= KNOWN_CIRCLES, f"modules that import each other: {[sorted(c) for c in circles]}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _crossings(path: Path, name: str) -> list[str]:
    """Private names ``path`` takes from another module: ``from M import _x``, ``M._x`` on an imported
    module M, or a private module outside its own package."""
    found = []
    own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    modules_bound = {}
    ours = {"asectl"} | ({p.stem for p in BENCH.glob("*.py")} if name.startswith("bench.") else set())
    for module, imported, line in imports(path, name):
        if module.split(".")[0] not in ours:  # a third-party library's private parts are its business
            continue
        if imported is not None and _private(imported):
            found.append(f"{path.relative_to(ROOT)}:{line} imports {imported} from {module}")
        parts = module.split(".")
        for i, part in enumerate(parts):
            if _private(part) and not own_package.startswith(".".join(parts[:i])):
                found.append(f"{path.relative_to(ROOT)}:{line} imports the private module {module}")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asectl"):
            modules_bound.update(
                {
                    a.asname or a.name: f"{node.module}.{a.name}"
                    for a in node.names
                    if f"{node.module}.{a.name}" in MODULES
                }
            )
        elif isinstance(node, ast.Import):
            modules_bound.update({a.asname: a.name for a in node.names if a.asname and a.name in MODULES})
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules_bound
            and _private(node.attr)
        ):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {modules_bound[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    found = [c for name, path in MODULES.items() for c in _crossings(path, name)]
    # bench/ is one folder of scripts: its own _common is shared among them, asectl's private names are not.
    found += [c for path in BENCH.glob("*.py") for c in _crossings(path, "bench." + path.stem)]
    assert not found, "\n".join(found)


def test_bench_is_an_ordinary_client_of_the_package():
    """No sys.path edits, nothing from tests/; the package imports neither bench/ nor tests/."""
    for path in [*BENCH.glob("*.py"), *BENCH.glob("*.sh")]:
        assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"
    for path in BENCH.glob("*.py"):
        for module, _, line in imports(path, "bench." + path.stem):
            assert module.split(".")[0] != "tests", f"{path.relative_to(ROOT)}:{line} imports {module}"
    for name, path in MODULES.items():
        for module, _, line in imports(path, name):
            assert module.split(".")[0] not in ("tests", "bench"), f"{name}:{line} imports {module}"


def test_bench_results_are_small_summaries_that_load():
    """Committed results are summaries (per-card output goes to bench/out, ignored), each small, and each
    loads through bench/_common.py as the scripts' render modes read it."""
    files = sorted((BENCH / "results").glob("*"))
    assert files
    big = [f"{p.name}: {p.stat().st_size} bytes" for p in files if p.stat().st_size >= SUMMARY_LIMIT]
    assert not big, f"over {SUMMARY_LIMIT} bytes: {big}"
    # Run as the scripts run (from bench/); packing what load() gives is the file again.
    code = (
        "import json, sys, _common\n"
        "for name in sys.argv[1:]:\n"
        "    saved = json.loads((_common.RESULTS / (name + '.json')).read_text())\n"
        "    assert _common.pack_labels(_common.load(name)) == saved, name\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *(p.stem for p in files if p.suffix == ".json")],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (BENCH / "results").glob("quality*.json")))
def test_quality_summaries_keep_every_test_card(name):
    # The render mode's intervals and paired tests need each card's true and predicted class.
    data = json.loads((BENCH / "results" / name).read_text())
    for seed in data["per_seed"]:
        rows = [v for v in seed.values() if isinstance(v, dict)]
        assert rows and all(len(r["y_true"]["codes"]) == len(r["y_pred"]["codes"]) > 0 for r in rows)
