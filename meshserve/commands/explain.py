"""`meshserve explain MODEL`: why a model is where it is, or why it is not loaded.

Reads only Redis: the model's copies (ms:placements), the placement leader's last decision for
it with every filter's and scorer's verdict (ms:decisions), load queues, exclusions after
failed loads, and recency. Works whichever placement instance leads, and after restarts.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from meshserve.store import keys
from meshserve.store.state import State
from meshserve.model import CopyState
from meshserve.commands import exits
from meshserve.commands.output import emit, is_data, output_option
from meshserve.commands.status import _run, _url


async def gather(url: str, name: str) -> dict[str, Any]:
    """Everything known about one model, as plain data."""
    state = State.from_url(url)
    try:
        model_id = await state.resolve(name)
        if model_id is None:
            return {"name": name, "found": False, "summary": f"no InferenceService or model is registered as '{name}'"}
        spec = await state.model(model_id)
        copies = await state.copies(model_id)
        r = state.r
        last_used = await r.zscore(keys.LAST_USED, model_id)
        raw_decision = await r.hget(keys.DECISIONS, model_id)
        excluded = {}
        now = time.time()
        for k, v in (await r.hgetall(keys.EXCLUDED)).items():
            m, _, pod = k.decode().rpartition("|")
            if m == model_id and float(v) > now:
                excluded[pod] = round(float(v) - now)
        queued = {}
        for pod in copies:
            score = await r.zscore(keys.loadq_key(pod), model_id)
            if score is not None:
                ahead = await r.zcount(keys.loadq_key(pod), "-inf", f"({score}")
                queued[pod] = {"ahead": ahead, "request_waiting": score < keys.BACKGROUND}
        pods = await state.r.hgetall(keys.PODS)
        leader = await r.get(keys.LEASE)
    finally:
        await state.close()
    decision = json.loads(raw_decision) if raw_decision else None
    doc: dict[str, Any] = {
        "name": name,
        "found": True,
        "model": model_id,
        "alias": spec.alias if spec else "",
        "spec": {
            "format": spec.format, "min_copies": spec.min_copies, "max_copies": spec.max_copies,
            "pinned": spec.pinned, "size_hint": spec.size_hint, "runtime": spec.runtime,
            "format_version": spec.format_version, "storage": spec.storage,
        } if spec else None,
        "copies": {p: c.to_dict() for p, c in sorted(copies.items())},
        "queued": queued,
        "excluded_pods": excluded,
        "last_used_seconds_ago": round(now - last_used, 1) if last_used else None,
        "pods_registered": len(pods),
        "leader": leader.decode() if leader else None,
        "last_decision": decision,
    }
    doc["summary"] = summarize(doc)
    return doc


def summarize(doc: dict[str, Any]) -> str:
    """One sentence: where the model is and why, or why it is not loaded."""
    copies: dict[str, dict[str, Any]] = doc["copies"]
    loaded = [p for p, c in copies.items() if c["state"] == CopyState.LOADED]
    loading = [p for p, c in copies.items() if c["state"] == CopyState.LOADING]
    failed = {p: c.get("reason", "") for p, c in copies.items() if c["state"] == CopyState.FAILED}
    d = doc.get("last_decision") or {}
    if loaded:
        why = f" (placed there because: {d.get('why') or 'a request'})" if d.get("pod") in loaded else ""
        return f"loaded on {', '.join(loaded)}{why}" + (f"; also loading on {', '.join(loading)}" if loading else "")
    if loading:
        q = doc["queued"]
        parts = [f"{p} (queued, {q[p]['ahead']} ahead)" if p in q else f"{p} (loading)" for p in loading]
        return "loading on " + ", ".join(parts)
    if "-" in failed:
        return f"not loaded: the last attempt could not be placed: {failed['-']}"
    if failed:
        return "not loaded: the last load failed: " + "; ".join(f"{p}: {r}" for p, r in failed.items())
    if doc["pods_registered"] == 0:
        return "not loaded: no runtime pods are registered"
    if d:
        return "not loaded: it was evicted or unloaded after its last placement (see last use and the decision below)"
    return "not loaded: nobody has requested it yet (models load on first request unless minCopies or pinned)"


def render(doc: dict[str, Any]) -> str:
    if not doc["found"]:
        return doc["summary"]
    out = [f"{doc['model']} (alias {doc['alias']})", f"  {doc['summary']}"]
    spec = doc.get("spec") or {}
    out.append(f"  spec: format={spec.get('format')} minCopies={spec.get('min_copies')} maxCopies={spec.get('max_copies') or 'unlimited'} pinned={spec.get('pinned')}")
    for pod, c in doc["copies"].items():
        extra = f" - {c['reason']}" if c.get("reason") else ""
        out.append(f"  copy on {pod}: {c['state']}, {c['size']} bytes{extra}")
    if doc["last_used_seconds_ago"] is not None:
        out.append(f"  last used {doc['last_used_seconds_ago']}s ago")
    for pod, secs in doc["excluded_pods"].items():
        out.append(f"  excluded from {pod} for {secs}s more (a load failed there)")
    d = doc.get("last_decision")
    if d:
        out += ["  " + line for line in decision_lines(d)]
    return "\n".join(out)


def decision_lines(d: dict[str, Any]) -> list[str]:
    """The placement leader's last decision for a model: each filter's and scorer's verdict (also `describe`'s)."""
    ago = time.time() - d.get("ts", 0)
    out = [f"last placement decision, {ago:.0f}s ago by {d.get('leader')}" + (f" ({d['why']})" if d.get("why") else "") + ":"]
    if d.get("considered"):
        out.append(f"  {d['considered']}")
    for s in d.get("trace", []):
        out.append(f"  {s['pod']}: {s['step']}: {s['result']}")
    if d.get("pod"):
        busy = f" (busy, evicted as a last resort: {', '.join(d['evict_busy'])})" if d.get("evict_busy") else ""
        base = (f", with its base {d['base']} (loaded first)" if d.get("with_base") else f", beside its base {d['base']}") if d.get("base") else ""
        out.append(f"  => {d['pod']}{base}" + (f", evicting {', '.join(d['evict'])}{busy}" if d.get("evict") else ""))
    else:
        out.append(f"  => not placed: {d.get('reason')}")
    return out


@click.command()
@click.argument("model")
@click.option("--redis-url", envvar="MESHSERVE_REDIS_URL", default="", help="Redis/Valkey URL (default: the embedded one of `meshserve up`).")
@output_option
def explain(model: str, redis_url: str, output: str) -> None:
    """Why MODEL (an InferenceService name or concrete model id) is where it is, or is not loaded.

    Exit status: 0 found; 1 not registered, or Redis unreachable."""
    url = _url(redis_url)
    doc = _run(gather(url, model), url)
    if is_data(output):
        emit(doc, output)
    else:  # wide: the same text, which already shows every filter's and scorer's verdict
        click.echo(render(doc))
    if not doc["found"]:
        exits.done(False)


COMMANDS = [explain]
