"""`meshserve apply`, `meshserve get rules`, `meshserve promote` and `meshserve rollback`:
traffic rules and InferenceService version moves (docs/design/traffic.md).

apply, promote and rollback are control actions: each is one `control.<action>` span (exported
when OTEL_EXPORTER_OTLP_ENDPOINT is set, flushed before the command exits)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
from opentelemetry import trace

from meshserve import state as st
from meshserve import tracing
from meshserve.commands.status import _url
from meshserve.settings import redact_url
from meshserve.yamlfile import ConfigError

redis_option = click.option(
    "--redis-url", envvar="MESHSERVE_REDIS_URL", default="", help="Redis/Valkey URL (default: the embedded one of `meshserve up`)."
)


def _run(url: str, fn: Any, action: str = "", attrs: dict[str, Any] | None = None) -> Any:
    """Run `fn(state)`; a control action (`action` set) runs inside a `control.<action>` span."""

    async def go() -> Any:
        state = st.State.from_url(url)
        try:
            if not action:
                return await fn(state)
            with tracing.tracer(__name__).start_as_current_span(f"control.{action}", attributes=attrs or {}):
                return await fn(state)
        finally:
            await state.close()

    provider = tracing.setup("meshserve-cli") if action else None
    try:
        return asyncio.run(go())
    except ConfigError as e:
        click.echo(f"error: {e}\nnothing was changed.", err=True)
        sys.exit(1)
    except LookupError as e:
        click.echo(f"error: {e.args[0]}", err=True)
        sys.exit(1)
    except Exception as e:
        if isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith("redis"):
            click.echo(f"cannot reach the mesh's Redis at {redact_url(url)}: {e}. Is `meshserve up` running? Or pass --redis-url.", err=True)
            sys.exit(2)
        raise
    finally:
        if provider is not None:
            provider.force_flush(5000)  # a CLI exits at once: send its span now (bounded)


@click.command()
@click.option("-f", "--filename", "paths", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A YAML file or a directory of them (InferenceService, Predictor, TrafficRule; ServingRuntime, "
                   "the storage-config Secret and the model-serving-config ConfigMap are checked and noted). Repeatable.")
@redis_option
def apply(paths: tuple[Path, ...], redis_url: str) -> None:
    """Validate and apply InferenceServices, Predictors and TrafficRules. Nothing changes unless all
    of it is valid; a kind meshserve does not handle is an error naming it."""
    from meshserve.rules.config import apply_paths

    async def go(state: st.State) -> Any:
        res = await apply_paths(state, paths)
        trace.get_current_span().set_attributes(tracing.applied(res.specs, res.rules))
        return res

    res = _run(_url(redis_url), go, "apply", {"meshserve.files": [str(p) for p in paths]})
    for spec in res.specs:
        click.echo(f"{res.kinds.get(spec.alias, 'InferenceService').lower()}/{spec.alias} -> {spec.id}")
    for r in res.rules:
        click.echo(f"trafficrule/{r.name} applied (model {r.model})")
    for n in res.notes:
        click.echo(f"  {n}")


@click.group()
def get() -> None:
    """Show mesh resources."""


def _weights(plan: Any) -> str:
    if plan is None:
        return "100% own model"
    parts = []
    for b in plan.branches:
        split = " ".join(f"{m.split('__')[0]}={w}%" for m, w in b.targets)  # alias of __isvc- and __ksp- ids (aliases never hold '__')
        cond = ",".join(f"{h.name}:{h.kind}={h.value}" for h in b.headers)
        parts.append(f"[{cond}] {split}" if cond else split)
    if plan.mirror:
        parts.append(f"mirror {plan.mirror[0]}={plan.mirror[1]:g}%")
    return "; ".join(parts)


@get.command("rules")
@redis_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def get_rules(redis_url: str, as_json: bool) -> None:
    """Traffic rules and InferenceService version moves, with their live state."""
    from meshserve.rules import plan as pl
    from meshserve.rules import store

    async def read(state: st.State) -> Any:
        rules, statuses, transitions = await store.read_all(state)
        snap = await state.snapshot()
        return rules, statuses, transitions, snap

    rules, statuses, transitions, snap = _run(_url(redis_url), read)
    rows = []
    for name, spec in sorted(rules.items()):
        status = statuses.get(name, {})
        plan = pl.plan_for_rule(spec, status, snap.aliases, set(snap.models), name)
        kind = "canary" if spec.get("canary") else ("mirror" if spec.get("mirror") and not spec.get("routes") else "routes")
        step = f" step {int(status.get('step', 0)) + 1}/{len(spec['canary']['steps'])}" if spec.get("canary") else ""
        rows.append({"kind": "trafficrule", "name": name, "model": spec["model"], "type": kind,
                     "phase": status.get("phase", "") + step, "traffic": _weights(plan), "reason": status.get("reason", "")})
    for alias, t in sorted(transitions.items()):
        plan = pl.plan_for_transition(t)
        target = t.new if t.phase in (pl.T_DRAINING, "Unloading", pl.T_DONE) else t.old
        rows.append({"kind": "inferenceservice", "name": alias, "model": f"{t.old} -> {t.new}", "type": "version move",
                     "phase": t.phase, "traffic": _weights(plan) if plan else f"{target}=100%", "reason": t.reason})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no traffic rules and no version moves. Apply one: meshserve apply -f mesh-config/examples/<file>.yaml")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("KIND", "NAME", "MODEL", "TYPE", "PHASE", "TRAFFIC", "REASON")
    for r in rows:
        table.add_row(*(str(r[k]) for k in ("kind", "name", "model", "type", "phase", "traffic", "reason")))
    Console().print(table)


async def _find(state: st.State, name: str) -> tuple[str, Any, Any]:
    from meshserve.rules import store

    rules, statuses, transitions = await store.read_all(state)
    if name in rules:
        return "rule", rules[name], statuses.get(name, {})
    if name in transitions:
        return "isvc", transitions[name], None
    known = ", ".join(sorted(rules) + sorted(transitions)) or "none"
    raise LookupError(f"no traffic rule or version move named {name!r} (known: {known}); see `meshserve get rules`")


def _describe(kind: str, obj: Any) -> None:
    """What a promote or rollback acts on, on its control span."""
    span = trace.get_current_span()
    if kind == "rule":
        span.set_attributes({"meshserve.kind": "trafficrule", tracing.ATTR_MODEL: str(obj.get("model", ""))})
    else:
        span.set_attributes({"meshserve.kind": "inferenceservice", tracing.ATTR_MODEL: obj.new, "meshserve.old_model": obj.old})


@click.command()
@click.argument("name")
@redis_option
def promote(name: str, redis_url: str) -> None:
    """Advance a progressive canary one step, or finish an InferenceService canary (100% to the new version)."""
    from meshserve import rollout
    from meshserve.rules import plan as pl
    from meshserve.rules import store

    async def go(state: st.State) -> str:
        kind, obj, status = await _find(state, name)
        _describe(kind, obj)
        now = time.time()
        if kind == "rule":
            if not obj.get("canary"):
                raise LookupError(f"rule {name!r} has no canary to promote; edit its weights and apply it")
            if status.get("phase") not in (pl.PROGRESSING, pl.PAUSED):
                raise LookupError(f"rule {name!r} is {status.get('phase')}: only a progressing or paused canary can be promoted (re-apply the rule to restart it)")
            new = rollout.advance(obj, status, now)
            await store.set_status(state, name, new)
            return f"trafficrule/{name}: {new['phase']}, canary at {pl.canary_weight(obj, new)}%"
        t = obj
        if t.phase != pl.T_CANARY:
            raise LookupError(f"inferenceservice {name!r} is {t.phase}: only a canary can be promoted")
        t.percent = None  # the controller moves the alias, drains and unloads the old version
        await store.set_transition(state, t)
        return f"inferenceservice/{name}: promoting {t.new} to 100%"

    click.echo(_run(_url(redis_url), go, "promote", {"meshserve.name": name}))


@click.command()
@click.argument("name")
@redis_option
def rollback(name: str, redis_url: str) -> None:
    """Send 100% of NAME's traffic back to its stable model at once."""
    from meshserve import rollout
    from meshserve.rules import plan as pl
    from meshserve.rules import store

    async def go(state: st.State) -> str:
        kind, obj, status = await _find(state, name)
        _describe(kind, obj)
        now = time.time()
        if kind == "rule":
            await store.set_status(state, name, {**status, "phase": pl.ROLLED_BACK, "since": now, "reason": "rolled back by the operator"})
            return f"trafficrule/{name}: rolled back, 100% to {obj['model']}"
        t = obj
        ops: list[list[Any]] = []
        changes: list[tuple[str, str]] = []
        if t.phase in (pl.T_DRAINING, "Unloading", pl.T_DONE):
            # The move finished: point the alias back at the previous version (it reloads if unloaded).
            ops.append(["HSET", st.ALIASES, t.alias, t.old])
            changes.append((st.KIND_ALIAS, t.alias))
        if t.phase in (pl.T_LOADING, pl.T_CANARY):
            ops += rollout.restore_spec_ops(await state.r.hget(st.MODELS, t.new), t)
        t.phase, t.since, t.reason = pl.T_ROLLED_BACK, now, "rolled back by the operator"
        await store.set_transition(state, t, ops, changes)
        return f"inferenceservice/{name}: rolled back, 100% to {t.old}"

    click.echo(_run(_url(redis_url), go, "rollback", {"meshserve.name": name}))


@click.group()
def delete() -> None:
    """Remove mesh resources."""


@delete.command("rule")
@click.argument("name")
@redis_option
def delete_rule(name: str, redis_url: str) -> None:
    """Remove traffic rule NAME: its model's traffic goes back to the model itself at once."""
    from meshserve.rules import store

    async def go(state: st.State) -> str:
        docs = await store.rule_docs(state)
        if name not in docs:
            known = ", ".join(sorted(docs)) or "none"
            raise LookupError(f"no traffic rule named {name!r} (known: {known})")
        await store.delete_rule(state, name)
        return f"trafficrule/{name} deleted; {docs[name]['spec']['model']} serves its own traffic again"

    click.echo(_run(_url(redis_url), go))


COMMANDS = [apply, get, promote, rollback, delete]
