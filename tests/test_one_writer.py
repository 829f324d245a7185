"""Kind: static (the source tree, read with the standard library's ast). Placements and orders
have one writer, the placement leader (issue 15):

- in the store (meshserve/store/), only the leader's command builders spell a write of
  ms:placements or an XADD to a pod's order stream;
- outside it, no module spells one, and only the leader's modules call those builders.
Rollout, the CLI and the gateway's repository API ask the leader through its request stream."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = [REPO / "meshserve", REPO / "placement", REPO / "loader", REPO / "xds"] + sorted(REPO.glob("*/meshserve_*"))
STORE_OPS = REPO / "meshserve" / "store" / "ops.py"
# The builders of the leader's writes (meshserve/store/ops.py), and the modules that may call them.
LEADER_BUILDERS = {"set_copies", "order"}
# The leader's modules (docs/design/placement.md): the shell and the parts that commit.
LEADER = {REPO / "placement" / "meshserve_placement" / f"{m}.py"
          for m in ("leader", "decisions", "dispatch", "events", "pods", "maintain", "leader_requests")}
WRITES = {"HSET", "HDEL", "HMSET", "DEL"}


def _key_name(key: ast.AST) -> str:
    if isinstance(key, ast.Attribute):
        return key.attr
    if isinstance(key, ast.Call):
        return getattr(key.func, "attr", getattr(key.func, "id", ""))
    return ""


def _writes_in(path: Path) -> list[tuple[int, str]]:
    """(line, what) of each spelled write of placements or orders."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.List, ast.Tuple)) or len(node.elts) < 2:
            continue
        head, key = node.elts[0], node.elts[1]
        verb = head.value if isinstance(head, ast.Constant) else None
        if verb in WRITES and _key_name(key) == "PLACEMENTS":
            found.append((node.lineno, f"{verb} ms:placements"))
        if verb == "XADD" and _key_name(key) == "orders_key":
            found.append((node.lineno, "XADD to a pod's orders"))
    return found


def _functions_spelling_writes() -> set[str]:
    tree = ast.parse(STORE_OPS.read_text())
    lines = {ln for ln, _ in _writes_in(STORE_OPS)}
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
            if any(f.lineno <= ln <= (f.end_lineno or f.lineno) for ln in lines)}


def _ops_names(tree: ast.AST) -> set[str]:
    """The names the store's ops module goes by in a module (`from meshserve.store import ops as cmd`)."""
    names = {"ops"}
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module == "meshserve.store":
            names |= {a.asname or a.name for a in n.names if a.name == "ops"}
        elif isinstance(n, ast.Import):
            names |= {a.asname for a in n.names if a.name == "meshserve.store.ops" and a.asname}
    return names


def _leader_builder_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    names = _ops_names(tree)
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr in LEADER_BUILDERS
            and isinstance(n.func.value, ast.Name) and (n.func.value.id in names or "ops" in n.func.value.id)]


def _files() -> list[Path]:
    return sorted({p for root in PRODUCT if root.exists() for p in root.rglob("*.py")})


def test_only_the_leaders_builders_spell_its_writes() -> None:
    assert _functions_spelling_writes() == LEADER_BUILDERS


def test_no_module_but_the_store_spells_a_write_of_placements_or_orders() -> None:
    offenders = [f"{p.relative_to(REPO)}:{ln}: {what}" for p in _files() if p != STORE_OPS and p not in LEADER for ln, what in _writes_in(p)]
    assert not offenders, "\n".join(offenders)


def test_only_the_leader_calls_the_builders_of_its_writes() -> None:
    offenders = [f"{p.relative_to(REPO)}:{ln}" for p in _files() if p not in LEADER and p.parent != STORE_OPS.parent
                 for ln in _leader_builder_calls(p)]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_the_leaders_own_writes() -> None:
    leader = [w for p in LEADER for w in _writes_in(p)] + [ln for p in LEADER for ln in _leader_builder_calls(p)]
    assert leader, "the leader writes placements and orders somewhere: the check must see it"
