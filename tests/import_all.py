"""Import every module of the product packages, and every library name they import (also the
ones imported lazily inside functions), in the interpreter that runs this file. Run by
tests/test_install_lowest.py in throwaway environments; prints one line per failure.

  python import_all.py         every import must succeed (an install with every extra)
  python import_all.py --base  the base install: a module may fail only with MissingExtra,
                               which names the extra to install
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

PACKAGES = ("meshserve", "meshserve_xds", "meshserve_placement", "meshserve_loader", "meshserve_proto")
# Imported by product code but deliberately in no runtime extra, with why.
NOT_RUNTIME: dict[str, str] = {}


def main() -> int:
    base = "--base" in sys.argv
    from meshserve.extras import MissingExtra

    failed: list[str] = []
    names: list[str] = []
    for top in PACKAGES:
        pkg = importlib.import_module(top)
        names += [top] + [m.name for m in pkgutil.walk_packages(pkg.__path__, top + ".")]
    imported: set[tuple[str, str]] = set()
    missing_extra = 0
    for name in names:
        try:
            mod = importlib.import_module(name)
        except MissingExtra:
            if base:
                missing_extra += 1
                continue
            failed.append(f"{name}: {sys.exc_info()[1]}")
            continue
        except BaseException as e:  # noqa: BLE001 - report every kind, go on with the rest
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        for node in ast.walk(ast.parse(Path(mod.__file__).read_text())):
            if isinstance(node, ast.Import):
                imported.update((a.name, "") for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.update((node.module, a.name) for a in node.names)
    if not base:
        # The lazy imports too (a client's submodule, an exception class): a too-old minimum
        # often shows only there.
        for modname, attr in sorted(imported):
            if modname.split(".")[0] in NOT_RUNTIME:
                continue
            try:
                m = importlib.import_module(modname)
                if attr and attr != "*" and not hasattr(m, attr):
                    importlib.import_module(f"{modname}.{attr}")
            except BaseException as e:  # noqa: BLE001
                failed.append(f"import {modname}{f' ({attr})' if attr else ''}: {type(e).__name__}: {e}")
    print(f"{len(names)} modules, {len(imported)} imported names, {missing_extra} need an extra, {len(failed)} failed")
    for line in failed:
        print("FAILED", line)
    return 1 if failed or not names else 0


if __name__ == "__main__":
    sys.exit(main())
