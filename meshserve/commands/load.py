"""`meshserve load MODEL...`: ask for loads the way the activator does, and watch them finish.

Each model (an InferenceService name or a concrete id) is asked for with an entry on
ms:loadreq, as a cold request at the activator asks; the placement leader places it (or moves
it up its pod's load queue when a load is already under way). Then the command follows:

- ms:placements for the model's copies: `loading` on a pod, then `loaded` (done) or `failed`
  (done, with the reason placement recorded; a failure and its retry on another pod land in
  one commit, so a failed copy with nothing else pending is the end);
- the loader's ms:progress:<model>|<pod> entry of each loading copy: bytes pulled, then
  `loading` into the runtime. A loading copy with no entry is still queued on its pod.

Like the activator it asks again when nothing is pending after 2 s (the model was evicted
between the ask and the look, say). Exit status: 0 every model loaded; 1 a load failed or the
timeout passed (the reason is `meshserve explain`'s summary), or nothing was asked (a name is
not registered, or Redis cannot be reached). 2 is left to usage errors (exits.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import click

from meshserve.store import ops as store_ops
from meshserve.store.messages import LoadRequest
from meshserve.store.state import State
from meshserve.commands import exits
from meshserve.commands.status import _mb, _run, _url, json_option, redis_option
from meshserve.model import CopyState

REREQUEST_S = 2.0  # as the activator: ask again when nothing is pending this long after asking
POLL_S = 0.2
TERMINAL = ("loaded", "failed", "timeout", "not_found", "skipped")


@dataclass
class Watch:
    """One model's load as the command sees it; also its --json output."""

    name: str
    model: str = ""
    state: str = "requested"  # requested, queued, pulling, loading, then one of TERMINAL (skipped: another name was unknown)
    pod: str = ""
    pods: list[str] = field(default_factory=list)  # every pod holding it, when loaded
    size: int = 0
    done_bytes: int = 0
    total_bytes: int = 0
    reason: str = ""
    seconds: float = 0.0
    _t0: float = field(default=0.0, repr=False)
    _asked: float = field(default=0.0, repr=False)  # monotonic time of the last ask
    _old_failures: set[tuple[str, float]] = field(default_factory=set, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


async def _ask(state: State, w: Watch) -> None:
    # The activator's fields exactly (placement/meshserve_placement/activator.py).
    await store_ops.request_load(state.r, LoadRequest(w.model))
    w._asked = time.monotonic()


async def _poll(state: State, w: Watch) -> None:
    copies = await state.copies(w.model)
    loaded = sorted(p for p, c in copies.items() if c.state == CopyState.LOADED)
    if loaded:
        w.state, w.pods = "loaded", loaded
        w.pod = w.pod if w.pod in loaded else loaded[0]
        w.size = copies[w.pod].size
        w.reason = ""
        return
    loading = sorted(p for p, c in copies.items() if c.state == CopyState.LOADING)
    if loading:
        progress = await state.progress([(w.model, p) for p in loading])
        rank = {"loading": 3, "loaded": 3, "pulling": 2}
        best = max(loading, key=lambda p: (rank.get(progress.get((w.model, p), {}).get("phase", ""), 0), p == w.pod))
        doc = progress.get((w.model, best))
        w.pod = best
        if doc is None:
            w.state = "queued"
        else:
            w.state = "loading" if doc["phase"] in ("loading", "loaded") else doc["phase"]
            w.done_bytes, w.total_bytes = int(doc.get("done_bytes", 0)), int(doc.get("total_bytes", 0))
        return
    # Only failures after our ask count (placement's clock, compared with itself): older ones are history.
    failed = [(c.since, p, c.reason) for p, c in copies.items() if c.state == CopyState.FAILED and (p, c.since) not in w._old_failures]
    if failed:
        _, pod, reason = max(failed)
        w.state, w.pod = "failed", "" if pod == "-" else pod
        w.reason = reason if pod != "-" else f"could not be placed: {reason}"
        return
    if time.monotonic() - w._asked > REREQUEST_S:
        await _ask(state, w)


async def load_models(
    url: str, names: list[str], wait: bool, timeout: float, on_update: Callable[[list[Watch]], None] = lambda ws: None
) -> list[Watch]:
    state = State.from_url(url)
    try:
        watches = [Watch(n) for n in names]
        for w in watches:
            w.model = await state.resolve(w.name) or ""
            if not w.model:
                w.state = "not_found"
                w.reason = f"model '{w.name}' not found: no InferenceService or model is registered under this name (see `meshserve models`)"
        unknown = [w.name for w in watches if w.state == "not_found"]
        if unknown:  # ask for nothing
            for w in watches:
                if w.state != "not_found":
                    w.state, w.reason = "skipped", f"not asked for: {', '.join(unknown)} not registered"
            on_update(watches)
            return watches
        t0 = time.monotonic()
        for w in watches:
            w._t0 = t0
            copies = await state.copies(w.model)
            w._old_failures = {(p, c.since) for p, c in copies.items() if c.state == CopyState.FAILED}
            if not any(c.state == CopyState.LOADED for c in copies.values()):
                await _ask(state, w)
        deadline = t0 + timeout
        while True:
            for w in watches:
                if w.state not in TERMINAL:
                    await _poll(state, w)
                    w.seconds = round(time.monotonic() - w._t0, 2)
            on_update(watches)
            if not wait or all(w.state in TERMINAL for w in watches):
                return watches
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL_S)
    finally:
        await state.close()
    from meshserve.commands.explain import gather as explain

    for w in watches:
        if w.state not in TERMINAL:
            summary = (await explain(url, w.model))["summary"]
            w.state, w.reason = "timeout", f"not loaded within {timeout:g}s ({w.state}): {summary}"
    on_update(watches)
    return watches


def _succeeded(watches: list[Watch], wait: bool) -> bool:
    if any(w.state == "not_found" for w in watches):
        return False
    return not wait or all(w.state == "loaded" for w in watches)


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Watch the loads until each is loaded or failed.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for all of them.")
@redis_option
@json_option
def load(models: tuple[str, ...], wait: bool, timeout: float, redis_url: str, as_json: bool) -> None:
    """Load MODELS (InferenceService names or concrete ids) now, with a progress bar per model.

    Exit status: 0 all loaded (or, with --no-wait, asked for); 1 a load failed or timed out,
    a name is not registered (nothing is asked for), or Redis cannot be reached."""
    url = _url(redis_url)
    if as_json or not wait:
        watches = _run(load_models(url, list(models), wait, timeout), url)
    else:
        watches = _with_bars(url, list(models), timeout)
    for w in watches:
        if w.state == "not_found":
            click.echo(w.reason, err=True)
    if as_json:
        click.echo(json.dumps([w.to_dict() for w in watches], indent=2))
    elif not wait:
        for w in watches:
            if w.state != "not_found":
                click.echo(f"{w.name}: {'already loaded on ' + ', '.join(w.pods) if w.state == 'loaded' else 'load requested'}")
    exits.done(_succeeded(watches, wait))


def _with_bars(url: str, names: list[str], timeout: float) -> list[Watch]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class StateColumn(ProgressColumn):
        """A spinner while a load is under way, then a tick or a cross."""

        spinner = SpinnerColumn()

        def render(self, task: Any) -> Text:
            s = task.fields.get("state")
            if s == "loaded":
                return Text("✓", style="green")
            if s in ("failed", "timeout", "not_found"):
                return Text("✗", style="red")
            if s == "skipped":
                return Text("-")
            return self.spinner.render(task)  # type: ignore[return-value]

    con = Console()
    bars = Progress(
        StateColumn(), TextColumn("[bold]{task.description}"), BarColumn(finished_style="green"), TextColumn("{task.fields[bytes]}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=con,
    )
    tasks = {i: bars.add_task(n, total=None, state="requested", bytes="", status="requested") for i, n in enumerate(names)}

    def show(watches: list[Watch]) -> None:
        for i, w in enumerate(watches):
            kw: dict[str, Any] = {"state": w.state}
            if w.state == "pulling":
                known = w.total_bytes > 0
                if known:  # else the bar pulses (rich's update cannot unset a total, so None means unchanged)
                    kw.update(total=w.total_bytes, completed=w.done_bytes)
                kw.update(status=f"pulling on {w.pod}",
                          bytes=f"{_mb(w.done_bytes)} / {_mb(w.total_bytes)}" if known else _mb(w.done_bytes))
            elif w.state == "loading":
                kw.update(status=f"[cyan]loading into {w.pod}", bytes=_mb(w.total_bytes or w.done_bytes) if w.total_bytes or w.done_bytes else "")
            elif w.state == "queued":
                kw.update(status=f"queued on {w.pod}")
            elif w.state == "loaded":
                kw.update(total=1, completed=1, bytes=_mb(w.size), status=f"[green]loaded on {w.pod}" + (f" (also {', '.join(p for p in w.pods if p != w.pod)})" if len(w.pods) > 1 else ""))
            elif w.state in ("failed", "timeout", "not_found"):
                kw.update(total=1, completed=0, status=f"[red]{'failed: ' if w.state == 'failed' else ''}{w.reason}")
            elif w.state == "skipped":
                kw.update(total=1, completed=0, status=w.reason)
            bars.update(tasks[i], **kw)

    with bars:
        return _run(load_models(url, names, True, timeout, show), url)  # type: ignore[no-any-return]


COMMANDS = [load]
