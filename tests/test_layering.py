"""Kind: static (the source tree, read with the standard library's ast; no extra tool). The
layering of issue 15:

- no import cycles among the modules of a package (module-level imports; an import inside a
  function still makes a cycle, so those count too);
- the kernel (`meshserve`) imports no component; its composition root (`meshserve.cli`,
  `meshserve.commands`, `meshserve.up`) wires the components together and may;
- no package imports another's private (`_x`) names;
- no product package imports the testing package (`meshserve_testing`), which the wheel does
  not ship.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = "meshserve"
TESTING = "meshserve_testing"
COMPOSITION_ROOT = ("meshserve.cli", "meshserve.commands", "meshserve.up")
# Known cycles, each broken by the change named (then the test fails until it is taken off).
KNOWN_CYCLES: set[frozenset[str]] = set()


def packages() -> dict[str, Path]:
    """Top-level package name -> its folder: the kernel and every component folder's package."""
    found = {KERNEL: REPO / KERNEL}
    for p in REPO.glob("*/meshserve_*/__init__.py"):
        found[p.parent.name] = p.parent
    return found


def modules() -> dict[str, Path]:
    out = {}
    for name, root in packages().items():
        for f in root.rglob("*.py"):
            parts = [name, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(mod: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for each import statement in a module."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target, [a.name for a in node.names]))
    return out


def _resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads (a `from pkg import mod` loads pkg.mod)."""
    got = [target] if target in known else []
    got += [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    if not got:  # `import a.b.c` of a name inside a module: its nearest module
        parts = target.split(".")
        while parts and ".".join(parts) not in known:
            parts.pop()
        if parts:
            got.append(".".join(parts))
    return got


def graph() -> dict[str, set[str]]:
    known = modules()
    g: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        pkg = mod.split(".")[0]
        for _, target, names in imports(mod, path):
            for dep in _resolve(target, names, known):
                # a module importing its own package (the __init__) is no cycle of substance
                if dep.split(".")[0] == pkg and dep != mod and not mod.startswith(dep + "."):
                    g[mod].add(dep)
    return g


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components larger than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_within_a_package() -> None:
    found = [c for c in cycles(graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in found)


def test_known_cycles_still_exist() -> None:
    current = {frozenset(c) for c in cycles(graph())}
    stale = [sorted(c) for c in KNOWN_CYCLES if not any(c <= cur for cur in current)]
    assert not stale, f"broken already: take these off KNOWN_CYCLES: {stale}"


def test_the_kernel_imports_no_component() -> None:
    components = set(packages()) - {KERNEL}
    offenders = []
    for mod, path in modules().items():
        if mod.split(".")[0] != KERNEL or any(mod == r or mod.startswith(r + ".") for r in COMPOSITION_ROOT):
            continue
        for line, target, _ in imports(mod, path):
            if target.split(".")[0] in components | {TESTING}:
                offenders.append(f"{path.relative_to(REPO)}:{line}: imports {target}")
    assert not offenders, "\n".join(offenders)


def test_no_package_imports_anothers_private_names() -> None:
    known = modules()
    offenders = []
    for mod, path in known.items():
        pkg = mod.split(".")[0]
        if pkg == TESTING:
            continue  # test harnesses may reach into what they test; the product never imports them
        for line, target, names in imports(mod, path):
            if target.split(".")[0] == pkg or target.split(".")[0] not in packages():
                continue
            private = [n for n in [*target.split(".")[1:], *names] if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {target} {private}")
        # `other_pkg.module._name` reached through an attribute
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                chain = []
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in packages() and base.id != pkg:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {base.id}...{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_product_packages_do_not_import_the_testing_package() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line}" for mod, path in modules().items() if mod.split(".")[0] != TESTING
                 for line, target, _ in imports(mod, path) if target.split(".")[0] == TESTING]
    assert not offenders, "\n".join(offenders)


def test_the_checks_see_what_they_check() -> None:
    g = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(g) == [{"p.a", "p.b", "p.c"}]
    assert graph()["meshserve.store.ops"] >= {"meshserve.store.keys", "meshserve.store.messages", "meshserve.store.state"}


def test_the_routing_headers_are_defined_once() -> None:
    """Issue 15: `mm-model-id` was defined in four places; the product spells ModelMesh's two
    routing headers only in meshserve/headers.py (docstrings and Lua text aside)."""
    spelled = []
    for mod, path in modules().items():
        if mod.split(".")[0] == TESTING or mod == "meshserve.headers":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in ("mm-model-id", "mm-vmodel-id") and id(node) not in docs:
                spelled.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not spelled, f"import MODEL_ID_HEADER / VMODEL_ID_HEADER from meshserve.headers instead: {spelled}"
