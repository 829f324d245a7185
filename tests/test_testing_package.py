"""The test servers and harnesses (testing/meshserve_testing) stay out of the product: no product
module imports them, and the wheel's package list can't pick them up. Kind: unit (reads source)."""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT = [REPO / "meshserve", REPO / "xds", REPO / "placement", REPO / "loader", REPO / "proto"]


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_no_product_module_imports_the_testing_package() -> None:
    bad = [f"{f.relative_to(REPO)}: {m}" for d in PRODUCT for f in d.rglob("*.py")
           for m in _imports(f) if m.split(".")[0] == "meshserve_testing"]
    assert not bad, bad


def test_the_wheel_does_not_ship_the_testing_package() -> None:
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "testing" not in find["where"]
    assert not any(fnmatch.fnmatch(name, pat) for pat in find["include"] for name in ("meshserve_testing", "meshserve_testing.devmesh"))
    assert not (REPO / "testing" / "__init__.py").exists(), "testing/ is a folder, never a package"
