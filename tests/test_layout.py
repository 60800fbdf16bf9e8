"""The package's layout, held against its imports: one way down, no cycle, no huge module.

README.md's "Layout" section lists the package's modules and folders bottom-up: each may
import only those listed before it (entries on one line are one layer), and the entry
modules (`main.py`, `benchmark.py`, every `__main__.py`, and the package's `__init__.py`,
the public API's facade) stand on top and may import anything. These tests read that list
from the README itself and every import statement of the package (also those inside
functions), so neither can drift from the other.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "ddpm_jax")
MAX_LINES = 500
# Siblings over the experiment layer: training imports neither way of using a model.
SIBLING_RULES = {"train": ("inference", "evaluation")}


def _layout_layers() -> list[list[str]]:
    """The README's layout, as layers of entries ("diffusion.py", "models/", ...)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Layout\n", 1)[1]
    block = section.split("```", 2)[1]
    lines = block.splitlines()
    start = lines.index("ddpm_jax/") + 1
    layers = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        if line.startswith("   "):  # the continuation of a description
            continue
        names = re.match(r"\s+([\w./, ]+?)(\s{2,}|$)", line).group(1)
        layers.append([n.strip() for n in names.split(",")])
    return layers


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    found = {}
    for root, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


MODULES = _modules()


def _imports(path: str, module: str) -> set[str]:
    """The package modules `path` imports (module level and inside functions)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ddpm_jax")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("ddpm_jax"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m in MODULES}


def _is_entry(module: str) -> bool:
    return module in ("ddpm_jax", "ddpm_jax.main", "ddpm_jax.benchmark") or module.endswith(
        ".__main__"
    )


def _entry_of(module: str) -> str:
    """The README entry a module belongs to: "schedules.py" or "models/"."""
    parts = module.split(".")
    if len(parts) == 2 and not MODULES[module].endswith("__init__.py"):
        return f"{parts[1]}.py"
    return f"{parts[1]}/"


def _ranks() -> dict[str, int]:
    return {entry: i for i, layer in enumerate(_layout_layers()) for entry in layer}


def test_the_readme_layout_lists_every_module_and_folder():
    ranks = _ranks()
    listed = set(ranks)
    present = {_entry_of(m) for m in MODULES if m != "ddpm_jax" and not _is_entry(m)}
    assert present <= listed, f"not in README.md's Layout: {sorted(present - listed)}"
    stale = {e for e in listed if not os.path.exists(os.path.join(PACKAGE, e.rstrip("/")))}
    assert not stale, f"README.md's Layout lists what does not exist: {sorted(stale)}"


def test_every_import_goes_down_the_readme_layout():
    ranks = _ranks()
    bad = []
    for module, path in sorted(MODULES.items()):
        if _is_entry(module):
            continue
        mine = _entry_of(module)
        for imported in sorted(_imports(path, module)):
            if imported == "ddpm_jax" or _is_entry(imported):
                bad.append(f"{module} imports {imported}, an entry module")
                continue
            theirs = _entry_of(imported)
            if (
                theirs != mine
                and ranks[theirs] >= ranks[mine]
                and not (ranks[theirs] == ranks[mine] and theirs.endswith(".py"))
            ):
                bad.append(f"{module} ({mine}) imports {imported} ({theirs}), listed after it")
            for folder, forbidden in SIBLING_RULES.items():
                if mine == f"{folder}/" and theirs.rstrip("/") in forbidden:
                    bad.append(f"{module} imports {imported}: {folder}/ uses neither {forbidden}")
    assert not bad, "\n".join(bad)


def test_the_mathematics_imports_only_the_mathematics():
    """The maths is what the README lists before errors.py: no Flax, no config, no machinery."""
    ranks = _ranks()
    maths_top = ranks["errors.py"] - 1
    for module, path in MODULES.items():
        if _is_entry(module):
            continue
        entry = _entry_of(module)
        if ranks.get(entry, 99) <= maths_top:
            for imported in _imports(path, module):
                assert ranks[_entry_of(imported)] <= maths_top, (module, imported)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            assert not re.search(r"^\s*(import|from) (flax|ml_collections|optax)", text, re.M)


def test_no_import_cycle():
    graph = {m: _imports(p, m) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_is_past_500_lines():
    long = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long[module] = n
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"
