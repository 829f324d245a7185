"""Kind: static (the source tree, read with the standard library's ast). The store
(meshserve/store/) is the one owner of the Redis protocol (issue 15): no other module of the
product spells a Redis command list (`["HSET", ...]`, `execute_command("XADD", ...)`) or a
`ms:` key. They call the store's operations and command builders, and import its keys."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "meshserve" / "store"
# Every product package: the kernel and each component (`<dir>/meshserve_<name>/`).
PRODUCT = [REPO / "meshserve", *sorted(p for p in REPO.glob("*/meshserve_*") if p.is_dir() and p.name != "meshserve_testing")]

# Not converted yet: each goes when its change moves it onto the store.
ALLOWED = {
    # the deprecated meshserve.state import path, gone once the three above have converted
    "meshserve/state.py",
}

# Redis commands a command list starts with (the ones meshserve uses, and their kin).
COMMANDS = {
    "APPEND", "DEL", "EVAL", "EVALSHA", "EXPIRE", "GET", "HDEL", "HGET", "HGETALL", "HINCRBY", "HMGET", "HMSET", "HSET",
    "HSETNX", "INCR", "INCRBY", "LPUSH", "MGET", "MSET", "PEXPIRE", "PUBLISH", "RPUSH", "SADD", "SET", "SREM", "UNLINK",
    "XACK", "XADD", "XDEL", "XGROUP", "XRANGE", "XREAD", "XREADGROUP", "XREVRANGE", "XTRIM", "ZADD", "ZINCRBY", "ZREM",
    "ZREMRANGEBYSCORE",
}

# A stream's fields are the store's (meshserve/store/messages.py): reading or writing one
# outside it would spell them again.
STREAM_CALLS = {"xadd", "xread", "xreadgroup", "xrange", "xrevrange", "xack", "xdel", "xgroup_create", "xtrim", "xautoclaim", "xclaim"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def violations(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            head = node.elts[0]
            if isinstance(head, ast.Constant) and head.value in COMMANDS:
                found.append((node.lineno, f"command list {head.value}"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "execute_command":
            found.append((node.lineno, "execute_command"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ms:") and id(node) not in docs:
            found.append((node.lineno, f"key literal {node.value!r}"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in STREAM_CALLS:
            found.append((node.lineno, f"stream call {node.func.attr}"))  # type: ignore[attr-defined]
        elif isinstance(node, ast.Name) and node.id == "PREFIX" or isinstance(node, ast.Attribute) and node.attr == "PREFIX":
            found.append((node.lineno, "key built from PREFIX"))
    return found


def _files() -> list[Path]:
    return sorted(p for root in PRODUCT if root.exists() for p in root.rglob("*.py") if STORE not in p.parents)


def test_no_module_outside_the_store_spells_the_protocol() -> None:
    offenders = [f"{rel}:{ln}: {what}" for p in _files() if (rel := str(p.relative_to(REPO))) not in ALLOWED
                 for ln, what in violations(p.read_text())]
    assert not offenders, "spell these through meshserve/store/ (ops, keys):\n" + "\n".join(offenders)


def test_the_allowlist_only_names_files_that_still_need_it() -> None:
    stale = [rel for rel in sorted(ALLOWED) if not (REPO / rel).exists() or not violations((REPO / rel).read_text())]
    assert not stale, f"converted (or gone): take these off ALLOWED: {stale}"


def test_the_check_sees_each_kind_of_spelling() -> None:
    src = 'x = ["HSET", k, "a", 1]\ny = ("XADD", k)\nr.execute_command("XADD", k)\nz = "ms:foo"\nw = f"ms:{a}"\nr.xadd(k, {})\nq = PREFIX + "x"\n'
    assert sorted(what.split()[0] for _, what in violations(src)) == ["command", "command", "execute_command", "key", "key", "key", "stream"]
    assert not violations('"""ms:placements is documented here"""\nx = ["a", "b"]\n')
