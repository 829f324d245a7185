"""`meshserve apply`, `meshserve get rules`, `meshserve promote` and `meshserve rollback`:
traffic rules and InferenceService version moves (docs/design/traffic.md).

apply, promote and rollback are control actions: each is one `control.<action>` span (exported
when OTEL_EXPORTER_OTLP_ENDPOINT is set, flushed before the command exits)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click
from opentelemetry import trace

from meshserve.store import keys
from meshserve.store import ops as store_ops
from meshserve.store import messages
from meshserve.store.state import State
from meshserve import tracing
from meshserve.commands import exits
from meshserve.commands.output import WIDE, emit, is_data, output_option
from meshserve.commands.status import _url
from meshserve.k8s.cliapply import CLUSTER, Target, cluster_options
from meshserve.yamlfile import ConfigError

redis_option = click.option(
    "--redis-url", envvar="MESHSERVE_REDIS_URL", default="", help="Redis/Valkey URL (default: the embedded one of `meshserve up`)."
)


def _run(url: str, fn: Any, action: str = "", attrs: dict[str, Any] | None = None, failed: int = exits.FAILED) -> Any:
    """Run `fn(state)`; a control action (`action` set) runs inside a `control.<action>` span.
    Bad input, an unknown name or Redis unreachable exit `failed` (1; `diff`'s own is 3)."""

    async def go() -> Any:
        state = State.from_url(url)
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
        exits.fail(f"error: {e}\nnothing was changed.", failed)
    except LookupError as e:
        exits.fail(f"error: {e.args[0]}", failed)
    except Exception as e:
        if exits.is_unreachable(e):
            exits.unreachable(url, e, failed)
        raise
    finally:
        if provider is not None:
            provider.force_flush(5000)  # a CLI exits at once: send its span now (bounded)


def _in_cluster(target: Target, fn: Any, action: str) -> Any:
    """Run `fn(cluster)` against the Kubernetes API (cluster mode), exiting 1 with what to do
    when the files are invalid or the API server can't be reached or refuses."""
    from meshserve.k8s import cliapply

    try:
        api, ns = cliapply.connect(target)
    except LookupError as e:
        exits.fail(f"error: {e.args[0]}")
    host = api.configuration.host
    provider = tracing.setup("meshserve-cli")
    try:
        with tracing.tracer(__name__).start_as_current_span(f"control.{action}", attributes={"meshserve.mode": "cluster", "meshserve.namespace": ns}):
            return fn(cliapply.Cluster(api, ns))
    except ConfigError as e:
        exits.fail(f"error: {e}\nnothing was changed.")
    except LookupError as e:
        exits.fail(f"error: {e.args[0]}")
    except Exception as e:
        msg = cliapply.explain_api_error(e, host)
        if msg is None:
            raise
        exits.fail(f"error: {msg}")
    finally:
        api.close()
        provider.force_flush(5000)


def _cluster_apply(cluster: Any, paths: tuple[Path, ...], stdin: str | None, dry_run: bool) -> list[str]:
    from meshserve.k8s import cliapply

    return cliapply.apply(cluster, paths, stdin, dry_run)


filename_option = click.option(
    "-f", "--filename", "paths", multiple=True, required=True, type=click.Path(path_type=Path, allow_dash=True),
    help="A YAML file, a directory of them, or - for standard input (InferenceService, Predictor, TrafficRule; "
         "ServingRuntime, the storage-config Secret and the model-serving-config ConfigMap are checked and noted). Repeatable.")


def _stdin(paths: tuple[Path, ...]) -> str | None:
    """Standard input's text when a path is `-` (read once, however often `-` is given)."""
    from meshserve.rules.config import STDIN

    if STDIN not in paths:
        return None
    with click.open_file("-") as f:  # click's own `-` handling: standard input, not closed
        return f.read()


@click.command()
@filename_option
@click.option("--dry-run", type=click.Choice(["none", "client", "server"]), is_flag=False, flag_value="client", default="none",
              show_default=True, help="Validate and print what would be created, configured or left unchanged, writing nothing. "
                                       "client and server are the same here (kubectl's values).")
@redis_option
@cluster_options
def apply(paths: tuple[Path, ...], dry_run: str, redis_url: str, target: Target) -> None:
    """Validate and apply InferenceServices, Predictors and TrafficRules. Nothing changes unless all
    of it is valid; a kind meshserve does not handle is an error naming it.

    In cluster mode (--mode cluster, MESHSERVE_MODE=cluster, or --kubeconfig/--context/-n) the
    objects are created or replaced through the Kubernetes API instead of written to Redis, and
    `meshserve controller` registers them.

    Exit status: 0 applied (or, with --dry-run, valid); 1 invalid input, Redis or the Kubernetes API unreachable or refusing."""
    from meshserve.rules.config import apply_paths
    from meshserve.rules.preview import verdicts

    stdin = _stdin(paths)
    if target.mode == CLUSTER:
        for line in _in_cluster(target, lambda c: _cluster_apply(c, paths, stdin, dry_run != "none"), "apply"):
            click.echo(line)
        return
    if dry_run != "none":
        res = _run(_url(redis_url), lambda state: apply_paths(state, paths, stdin, dry_run=True))
        for label, verdict in verdicts(res.before, res.after):
            click.echo(f"{label} {verdict} (dry run)")
        return

    async def go(state: State) -> Any:
        from meshserve.settings import Settings
        from meshserve_loader.predict import Predictor

        # Lists the new models' stored files with this machine's storage-config (MESHSERVE_STORAGE_CONFIG).
        res = await apply_paths(state, paths, stdin, predict=Predictor.from_settings(Settings.from_env()))
        trace.get_current_span().set_attributes(tracing.applied(res.specs, res.rules))
        if res.specs or res.rules:
            # Return once the gateways route what was applied: `apply && curl` got a 404 when
            # the request beat the routes' push (tens of ms).
            res.notes.extend(_gateways_note(await store_ops.wait_for_gateways(state.r, APPLY_WAIT_SECONDS)))
        return res

    res = _run(_url(redis_url), go, "apply", {"meshserve.files": [str(p) for p in paths]})
    for spec in res.specs:
        click.echo(f"{res.kinds.get(spec.alias, 'InferenceService').lower()}/{spec.alias} -> {spec.id}")
    for r in res.rules:
        click.echo(f"trafficrule/{r.name} applied (model {r.model})")
    for n in res.notes:
        click.echo(f"  {n}")


APPLY_WAIT_SECONDS = 10.0


def _gateways_note(caught_up: bool | None) -> list[str]:
    if caught_up is False:
        return [f"the gateways have not applied the new routes after {APPLY_WAIT_SECONDS:g}s; requests may get 404 until they do (meshserve status)"]
    return []


@click.command()
@filename_option
@redis_option
def diff(paths: tuple[Path, ...], redis_url: str) -> None:
    """Show how the mesh would change if the files were applied: a unified diff of each stored
    object against the file's, as YAML. Nothing is written.

    Exit status, as `kubectl diff`: 0 no differences; 1 differences; 3 the files are invalid or
    Redis is unreachable (2 stays a usage error)."""
    from meshserve.rules.config import apply_paths
    from meshserve.rules.preview import unified_diff

    stdin = _stdin(paths)
    res = _run(_url(redis_url), lambda state: apply_paths(state, paths, stdin, dry_run=True), failed=exits.DIFF_ERROR)
    text = unified_diff(res.before, res.after)
    click.echo(text, nl=False)
    raise click.exceptions.Exit(exits.DIFF_FOUND if text else exits.OK)


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
@output_option
def get_rules(redis_url: str, output: str) -> None:
    """Traffic rules and InferenceService version moves, with their live state."""
    from meshserve.rules import plan as pl
    from meshserve.rules import store

    async def read(state: State) -> Any:
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
                     "phase": status.get("phase", "") + step, "traffic": _weights(plan), "reason": status.get("reason", ""),
                     "since": status.get("since", 0.0)})
    for alias, t in sorted(transitions.items()):
        plan = pl.plan_for_transition(t)
        target = t.new if t.phase in (pl.T_DRAINING, "Unloading", pl.T_DONE) else t.old
        rows.append({"kind": "inferenceservice", "name": alias, "model": f"{t.old} -> {t.new}", "type": "version move",
                     "phase": t.phase, "traffic": _weights(plan) if plan else f"{target}=100%", "reason": t.reason, "since": t.since})
    if is_data(output):
        emit(rows, output)
        return
    if not rows:
        click.echo("no traffic rules and no version moves. Apply one: meshserve apply -f mesh-config/examples/<file>.yaml")
        return
    from rich.console import Console
    from rich.table import Table

    wide = output == WIDE
    table = Table("KIND", "NAME", "MODEL", "TYPE", "PHASE", "TRAFFIC", "REASON", *(("IN PHASE FOR",) if wide else ()))
    now = time.time()
    for r in rows:
        extra = (f"{now - r['since']:.0f}s" if r["since"] else "-",) if wide else ()
        table.add_row(*(str(r[k]) for k in ("kind", "name", "model", "type", "phase", "traffic", "reason")), *extra)
    Console().print(table)


async def _find(state: State, name: str) -> tuple[str, Any, Any]:
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
    from meshserve.rules import plan as pl
    from meshserve.rules import store
    from meshserve_rollout.controller import advance

    async def go(state: State) -> str:
        kind, obj, status = await _find(state, name)
        _describe(kind, obj)
        now = time.time()
        if kind == "rule":
            if not obj.get("canary"):
                raise LookupError(f"rule {name!r} has no canary to promote; edit its weights and apply it")
            if status.get("phase") not in (pl.PROGRESSING, pl.PAUSED):
                raise LookupError(f"rule {name!r} is {status.get('phase')}: only a progressing or paused canary can be promoted (re-apply the rule to restart it)")
            new = advance(obj, status, now)
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
    from meshserve.rules import moves
    from meshserve.rules import plan as pl
    from meshserve.rules import store

    async def go(state: State) -> str:
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
            ops.append(store_ops.set_alias(t.alias, t.old))
            changes.append((messages.KIND_ALIAS, t.alias))
        if t.phase in (pl.T_LOADING, pl.T_CANARY):
            ops += moves.restore_spec_ops(await state.r.hget(keys.MODELS, t.new), t)
        t.phase, t.since, t.reason = pl.T_ROLLED_BACK, now, "rolled back by the operator"
        await store.set_transition(state, t, ops, changes)
        return f"inferenceservice/{name}: rolled back, 100% to {t.old}"

    click.echo(_run(_url(redis_url), go, "rollback", {"meshserve.name": name}))


@click.group()
def delete() -> None:
    """Remove mesh resources."""


def _delete_model(kind: str) -> click.Command:
    @click.command(kind.lower(), help=f"Remove {kind} NAME: its name stops routing at once (what the cluster controller does "
                                      f"when the object is deleted); the model's loaded copies age out of the cache. In cluster mode, "
                                      f"deletes the {kind} object.")
    @click.argument("name")
    @redis_option
    @cluster_options
    def delete_model(name: str, redis_url: str, target: Target) -> None:
        from meshserve.rules import store

        if target.mode == CLUSTER:
            def go_cluster(c: Any) -> str:
                if not c.delete(kind, name):
                    raise LookupError(f"no {kind} named {name!r} in namespace {c.ns}")
                return f"{kind.lower()}/{name} deleted"

            click.echo(_in_cluster(target, go_cluster, "delete"))
            return

        async def go(state: State) -> list[str]:
            if not await state.r.hexists(keys.ALIASES, name):
                raise LookupError(f"no InferenceService or Predictor named {name!r} (meshserve models lists them)")
            await state.remove_aliases([name])
            out = [f"{kind.lower()}/{name} deleted: requests for it now get 404; its loaded copies age out of the cache"]
            out += _gateways_note(await store_ops.wait_for_gateways(state.r, APPLY_WAIT_SECONDS))
            out += [f"  trafficrule/{r} still names it as its model: delete the rule too (meshserve delete rule {r})"
                    for r, d in sorted((await store.rule_docs(state)).items()) if d.get("spec", {}).get("model") == name]
            return out

        for line in _run(_url(redis_url), go, "delete"):
            click.echo(line)

    return delete_model


delete.add_command(_delete_model("InferenceService"))
delete.add_command(_delete_model("InferenceService"), name="isvc")
delete.add_command(_delete_model("Predictor"))


@delete.command("rule")
@click.argument("name")
@redis_option
@cluster_options
def delete_rule(name: str, redis_url: str, target: Target) -> None:
    """Remove traffic rule NAME: its model's traffic goes back to the model itself at once.
    In cluster mode, deletes the TrafficRule object; the controller removes it from Redis."""
    from meshserve.rules import store

    if target.mode == CLUSTER:
        def go_cluster(c: Any) -> str:
            if not c.delete("TrafficRule", name):
                raise LookupError(f"no TrafficRule named {name!r} in namespace {c.ns}")
            return f"trafficrule/{name} deleted"

        click.echo(_in_cluster(target, go_cluster, "delete"))
        return

    async def go(state: State) -> str:
        docs = await store.rule_docs(state)
        if name not in docs:
            known = ", ".join(sorted(docs)) or "none"
            raise LookupError(f"no traffic rule named {name!r} (known: {known})")
        await store.delete_rule(state, name)
        return f"trafficrule/{name} deleted; {docs[name]['spec']['model']} serves its own traffic again"

    click.echo(_run(_url(redis_url), go))


COMMANDS = [apply, diff, get, promote, rollback, delete]
