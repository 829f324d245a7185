"""Kind: static (the source tree, read with the standard library's ast). Placements and orders
have one writer, the placement leader: no other module of the product spells a write of
ms:placements or an XADD to a pod's order stream (issue 15). Rollout, the CLI and the gateway's
repository API ask the leader through its request stream instead."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = [REPO / "meshserve", REPO / "placement", REPO / "loader", REPO / "xds"]
LEADER = REPO / "placement" / "meshserve_placement" / "scheduler.py"
WRITES = {"HSET", "HDEL", "HMSET", "DEL"}


def _writes_in(path: Path) -> list[str]:
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


def test_only_the_leader_writes_placements_and_orders() -> None:
    offenders = [w for root in PRODUCT for p in sorted(root.rglob("*.py")) if p != LEADER for w in _writes_in(p)]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_the_leaders_own_writes() -> None:
    assert any("ms:placements" in w for w in _writes_in(LEADER)) and any("orders" in w for w in _writes_in(LEADER))
