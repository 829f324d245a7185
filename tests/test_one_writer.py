"""Kind: static (the source tree, read with the standard library's ast). Placements and orders
have one writer, the placement leader (issue 15): the store spells the writes once
(meshserve/store/ops.py), and only the placement package calls those builders. Rollout, the CLI
and the gateway's repository API ask the leader through its request stream instead."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = [REPO / "meshserve", REPO / "placement", REPO / "loader", REPO / "xds"]
STORE = REPO / "meshserve" / "store"
PLACEMENT = REPO / "placement" / "meshserve_placement"
WRITES = {"HSET", "HDEL", "HMSET", "DEL"}
# meshserve/store/ops.py: "The placement leader's writes: only its module may call these".
LEADER_BUILDERS = {"set_copies", "order", "enqueue", "dequeue", "exclude", "set_decision", "withdraw_pod", "forget_withdrawn", "pin", "unpin"}


def _raw_writes_in(path: Path) -> list[str]:
    """Command lists that write ms:placements or a pod's orders, spelled out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.List, ast.Tuple)) or len(node.elts) < 2:
            continue
        head, key = node.elts[0], node.elts[1]
        verb = head.value if isinstance(head, ast.Constant) else None
        if verb in WRITES and isinstance(key, ast.Attribute) and key.attr == "PLACEMENTS":
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {verb} ms:placements")
        if verb == "XADD" and isinstance(key, ast.Call) and getattr(key.func, "attr", getattr(key.func, "id", "")) == "orders_key":
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: XADD to a pod's orders")
    return found


def _builder_calls_in(path: Path) -> list[str]:
    """Calls of the leader's write builders, through any name the store's ops module is imported as."""
    tree = ast.parse(path.read_text())
    aliases, direct = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "meshserve.store":
            aliases |= {a.asname or a.name for a in node.names if a.name == "ops"}
        elif isinstance(node, ast.ImportFrom) and node.module == "meshserve.store.ops":
            direct |= {a.asname or a.name for a in node.names if a.name in LEADER_BUILDERS}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "meshserve.store.ops" and a.asname}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in LEADER_BUILDERS and isinstance(f.value, ast.Name) and f.value.id in aliases:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: ops.{f.attr}")
        elif isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{path.relative_to(REPO)}:{node.lineno}: {f.id}")
    return found


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def test_only_the_store_spells_the_writes_of_placements_and_orders() -> None:
    offenders = [w for root in PRODUCT for p in _files(root) if STORE not in p.parents for w in _raw_writes_in(p)]
    assert not offenders, "\n".join(offenders)


def test_only_the_leader_calls_the_writes_of_placements_and_orders() -> None:
    offenders = [w for root in PRODUCT for p in _files(root) if PLACEMENT not in p.parents for w in _builder_calls_in(p)]
    assert not offenders, "\n".join(offenders)


def test_the_checks_see_the_writes() -> None:
    assert any("ms:placements" in w for w in _raw_writes_in(STORE / "ops.py")) and any("orders" in w for w in _raw_writes_in(STORE / "ops.py"))
    calls = [w for p in _files(PLACEMENT) for w in _builder_calls_in(p)]
    assert any("ops.set_copies" in w for w in calls) and any("ops.order" in w for w in calls)
