"""What `meshserve apply` would change, without writing it: `apply --dry-run` and `meshserve diff`.

An object here is what the mesh stores for one name, as plain data: an InferenceService or
Predictor is the ModelSpec its name points at (the version a move under way goes to, since
that is what applying the same file again would ask for); a TrafficRule is its stored document.
Both sides are normalised through JSON, so a tuple and a list of the same items are equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any

from meshserve.store.state import Snapshot
from meshserve.model import ModelSpec
from meshserve.rules import plan as pl
from meshserve.rules import schema

CREATED, CONFIGURED, UNCHANGED = "created", "configured", "unchanged"


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def stored(snap: Snapshot, transitions: dict[str, pl.Transition], rule_docs: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """The stored object for each label in `names` (label -> name), missing when nothing is stored.

    Labels are `<kind>/<name>` with kind `trafficrule` for rules and the model kinds otherwise."""
    out: dict[str, Any] = {}
    for label, name in names.items():
        if label.startswith("trafficrule/"):
            if name in rule_docs:
                out[label] = _plain(rule_docs[name])
            continue
        t = transitions.get(name)
        moving = t is not None and t.phase in (pl.T_LOADING, pl.T_CANARY)
        model_id = t.new if moving and t is not None else snap.aliases.get(name)
        spec = snap.models.get(model_id or "")
        if spec is None:
            continue
        if moving and t is not None and "minCopies" in t.extra:
            # A move stores the new version with a copy boost and restores the user's value after.
            spec = dataclasses.replace(spec, min_copies=int(t.extra["minCopies"]))
        out[label] = _plain(dataclasses.asdict(spec))
    return out


def new_objects(specs: list[ModelSpec], kinds: dict[str, str], rules: list[schema.Rule]) -> dict[str, Any]:
    """Label -> object for what a set of files defines, in file order (models, then rules)."""
    out: dict[str, Any] = {f"{kinds.get(s.alias, 'InferenceService').lower()}/{s.alias}": _plain(dataclasses.asdict(s)) for s in specs}
    out.update({f"trafficrule/{r.name}": _plain(r.to_doc()) for r in rules})
    return out


def names(labels: dict[str, Any]) -> dict[str, str]:
    """Label -> the name it stands for."""
    return {label: label.partition("/")[2] for label in labels}


def verdicts(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, created|configured|unchanged) for each new object, in the order given."""
    return [(label, CREATED if label not in old else (UNCHANGED if old[label] == obj else CONFIGURED)) for label, obj in new.items()]


def unified_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A unified diff per changed object, of its YAML, as `kubectl diff` prints (empty: no difference)."""
    import yaml

    def text(obj: Any) -> list[str]:
        return [] if obj is None else yaml.safe_dump(obj, sort_keys=False, default_flow_style=False).splitlines(keepends=True)

    out: list[str] = []
    for label, obj in new.items():
        before = old.get(label)
        if before == obj:
            continue
        out += difflib.unified_diff(text(before), text(obj), f"stored/{label}", f"new/{label}")
    return "".join(out)
