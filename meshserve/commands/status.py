"""`meshserve status` and `meshserve models`: what the mesh holds, for people and scripts."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import click

from meshserve.store import keys, ops
from meshserve.store.state import State
from meshserve.commands import exits
from meshserve.commands.output import WIDE, emit, is_data, output_option
from meshserve.model import CopyState
from meshserve.settings import Settings

redis_option = click.option(
    "--redis-url", envvar="MESHSERVE_REDIS_URL", default="", help="Redis/Valkey URL (default: the embedded one of `meshserve up`)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _url(redis_url: str) -> str:
    return Settings.from_env().cli_redis_url(redis_url)


async def gather(url: str) -> dict[str, Any]:
    """One consistent read of everything `status` shows."""
    state = State.from_url(url)
    try:
        snap = await state.snapshot()
        hb = dict((k.decode(), v) for k, v in await state.r.zrange(keys.HEARTBEATS, 0, -1, withscores=True))
        lu = dict((k.decode(), v) for k, v in await state.r.zrange(keys.LAST_USED, 0, -1, withscores=True))
        # In-flight loads: the loading copies, with what their loaders publish (none yet: queued).
        pairs = sorted((m, p) for m, cs in snap.placements.items() for p, c in cs.items() if c.state == CopyState.LOADING)
        progress = await state.progress(pairs)
        withdrawn = {k.decode(): json.loads(v) for k, v in (await state.r.hgetall(keys.WITHDRAWN)).items()}
        paused = set(await ops.read_paused(state.r))
    finally:
        await state.close()
    now = time.time()
    used: dict[str, int] = {p: 0 for p in snap.pods}
    models = []
    failures = []
    for mid, spec in sorted(snap.models.items()):
        copies = snap.placements.get(mid, {})
        for pod, c in copies.items():
            if c.state != CopyState.FAILED and pod in used:
                used[pod] += c.size
            if c.state == CopyState.FAILED:
                failures.append({"model": mid, "pod": pod, "reason": c.reason, "since": c.since})
        models.append(
            {
                "id": mid,
                "alias": spec.alias,
                "current": snap.aliases.get(spec.alias) == mid,
                "format": spec.format,
                "runtime": spec.runtime,
                "min_copies": spec.min_copies,
                "max_copies": spec.max_copies,
                "copies": {p: c.state for p, c in sorted(copies.items())},
                "size": max((c.size for c in copies.values()), default=0),
                "last_used": lu.get(mid, 0.0),
            }
        )
    s = Settings.from_env()
    limit = s.heartbeat_seconds * s.heartbeat_misses
    pods = [
        {
            **asdict(p), "used_bytes": used.get(p.id, 0), "heartbeat_age_s": round(now - hb.get(p.id, 0), 1),
            # Placement keeps a pod whose loader went silent while its runtime answers or is
            # paused (stalled), for a grace; it marks the paused ones (keys.PAUSED).
            "condition": "draining" if p.draining else (
                "paused: kept for now, its copies' traffic sent to other copies" if p.id in paused
                else "ok" if now - hb.get(p.id, 0) <= limit else "heartbeat late: kept for now, nothing new placed"),
        }
        for p in sorted(snap.pods.values(), key=lambda p: p.id)
    ]
    missing = [
        {"id": pid, "last_heartbeat": w.get("last_heartbeat", 0.0), "withdrawn_at": w.get("withdrawn_at", 0.0), "reason": w.get("reason", "")}
        for pid, w in sorted(withdrawn.items()) if pid not in snap.pods
    ]
    failures.sort(key=lambda f: -f["since"])
    loading = [{"model": m, "pod": p, "phase": "queued", "done_bytes": 0, "total_bytes": 0, **progress.get((m, p), {})} for m, p in pairs]
    return {"revision": snap.rev, "pods": pods, "missing_pods": missing, "models": models, "loading": loading, "failures": failures[:20]}


def _clock(ts: float) -> str:
    if not ts:
        return "never"
    return f"{time.strftime('%H:%M:%S', time.localtime(ts))} ({time.time() - ts:.0f}s ago)"


def _bar(used: int, cap: int, width: int = 20) -> str:
    frac = min(1.0, used / cap) if cap else 0.0
    n = int(round(frac * width))
    return "█" * n + "░" * (width - n) + f" {frac:5.1%}"


def _mb(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


@click.command()
@redis_option
@output_option
def status(redis_url: str, output: str) -> None:
    """Pods with capacity bars, models with copies and state, and recent failures."""
    url = _url(redis_url)
    data = _run(gather(url), url)
    if is_data(output):
        emit(data, output)
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"Runtime pods (state revision {data['revision']})")
    wide = output == WIDE
    for col in ("pod", "address", "capacity", "used", "heartbeat", "condition") + (("runtime", "formats", "max loading") if wide else ()):
        t.add_column(col)
    for p in data["pods"]:
        extra = (p["runtime"], ",".join(p["formats"]) or "-", str(p["max_loading"])) if wide else ()
        t.add_row(
            p["id"], f"{p['host']}:{p['rest_port']}", _mb(p["capacity_bytes"]), _bar(p["used_bytes"], p["capacity_bytes"]),
            f"{p['heartbeat_age_s']}s ago", p["condition"], *extra,
        )
    con.print(t)
    if data["missing_pods"]:
        mt = Table(title="Missing pods (withdrawn by placement; a pod registers again by itself when it can)")
        for col in ("pod", "last heartbeat", "withdrawn", "reason"):
            mt.add_column(col)
        for x in data["missing_pods"]:
            mt.add_row(x["id"], _clock(x["last_heartbeat"]), _clock(x["withdrawn_at"]), x["reason"])
        con.print(mt)
    _models_table(con, data["models"], wide)
    if data["loading"]:
        lt = Table(title="Loading now")
        for col in ("model", "pod", "phase", "pulled", "for"):
            lt.add_column(col)
        for x in data["loading"]:
            pulled = f"{_mb(x['done_bytes'])} of {_mb(x['total_bytes'])}" if x["total_bytes"] else (_mb(x["done_bytes"]) if x["done_bytes"] else "-")
            lt.add_row(x["model"], x["pod"], x["phase"], pulled, f"{time.time() - x['started']:.0f}s" if x.get("started") else "-")
        con.print(lt)
    if data["failures"]:
        f = Table(title="Recent failures")
        for col in ("model", "pod", "reason"):
            f.add_column(col)
        for x in data["failures"]:
            f.add_row(x["model"], x["pod"], x["reason"])
        con.print(f)


def _models_table(con: Any, models: list[dict[str, Any]], wide: bool = False) -> None:
    from rich.table import Table

    t = Table(title=f"Models ({len(models)})")
    for col in ("alias", "model id", "format", "copies", "size", "last used") + (("runtime", "min copies", "max copies") if wide else ()):
        t.add_column(col)
    now = time.time()
    for m in models:
        copies = ", ".join(f"{p}:{s}" for p, s in m["copies"].items()) or "-"
        ago = f"{now - m['last_used']:.0f}s ago" if m["last_used"] else "never"
        # An empty runtime means placement picks one by format (KServe autoSelect).
        extra = (m["runtime"] or "(by format)", str(m["min_copies"]), str(m["max_copies"] or "unlimited")) if wide else ()
        t.add_row(m["alias"] + ("" if m["current"] else " (old)"), m["id"], m["format"], copies, _mb(m["size"]) if m["size"] else "-", ago, *extra)
    con.print(t)


@click.command()
@redis_option
@output_option
@click.option("--state", "state_filter", type=click.Choice(["loaded", "loading", "failed", "unloaded"]), default=None, help="Only models in this state.")
@click.option("--name", "name_filter", default="", help="Only models whose alias or id contains this text.")
def models(redis_url: str, output: str, state_filter: str | None, name_filter: str) -> None:
    """List models, filterable by state and name."""
    url = _url(redis_url)
    data = _run(gather(url), url)
    rows = []
    for m in data["models"]:
        states = set(m["copies"].values())
        if state_filter == "unloaded" and states - {CopyState.FAILED}:
            continue
        if state_filter and state_filter != "unloaded" and state_filter not in states:
            continue
        if name_filter and name_filter not in m["alias"] and name_filter not in m["id"]:
            continue
        rows.append(m)
    if is_data(output):
        emit(rows, output)
        return
    from rich.console import Console

    _models_table(Console(), rows, output == WIDE)


def _run(coro: Any, url: str) -> Any:
    """Run a read of the mesh at `url`; Redis unreachable exits 1 (exits.py) saying what to do."""
    return exits.run(url, coro)


COMMANDS = [status, models]
