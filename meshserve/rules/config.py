"""`meshserve apply`: InferenceServices and TrafficRules from files, validated as a whole before
anything is written, then registered in one atomic commit.

Validation is pure (`read_config`, `validate_rules`); the Redis reads and the commit are in
`apply_path`. A file that fails leaves the mesh exactly as it was.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping

from meshserve import registry, servingconfig
from meshserve.store.state import State
from meshserve.model import CopyState, ModelSpec
from meshserve.rules import schema, store
from meshserve.yamlfile import ConfigError, Document, iter_yaml_files, load_documents

EXAMPLES_DIR = "examples"  # documentation: applied only when named explicitly
STDIN = Path("-")  # `-f -`: YAML from standard input, as kubectl's
STDIN_LABEL = "<stdin>"  # how errors name it: `<stdin>:12: spec.x: reason`


@dataclass
class Config:
    specs: list[ModelSpec] = field(default_factory=list)
    percents: dict[str, int | None] = field(default_factory=dict)  # alias -> canaryTrafficPercent
    rule_docs: list[Document] = field(default_factory=list)
    rules: list[schema.Rule] = field(default_factory=list)
    # Documents read by other components (ServingRuntime: the runtime pods; the storage-config
    # Secret: the loaders), one `file:line: kind/name: ...` line each, for the CLI to show.
    skipped: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # alias -> InferenceService or Predictor
    serving: servingconfig.ServingConfig | None = None  # a model-serving-config ConfigMap
    warnings: list[str] = field(default_factory=list)  # its keys that meshserve does not act on


# Kinds meshserve reads that define no model: who reads them. Any kind not here and not a
# model or a TrafficRule is refused, naming the kind, so nothing a user applies is dropped
# without a word (a Predictor once was).
OTHER_READERS = {
    "ServingRuntime": "read by the runtime pods from mesh-config/ when they start (MESHSERVE_POD_RUNTIMES)",
    "ClusterServingRuntime": "read by the runtime pods from mesh-config/ when they start (MESHSERVE_POD_RUNTIMES)",
}
STORAGE_SECRET = "storage-config"
# Model id -> bytes predicted from its stored files (disk x 1.25), for the specs given; a model
# whose files could not be listed is left out. The composition root (the CLI, `meshserve up`)
# passes the loader's (meshserve_loader/predict.py): the kernel does not read object stores.
Predict = Callable[[list[ModelSpec]], Awaitable[dict[str, int]]]


def classify_other(doc: Document) -> str:
    """For a document that is neither a model nor a TrafficRule: the note for `skipped`, or a
    ConfigError naming the kind when meshserve does not handle it."""
    d = doc.data if isinstance(doc.data, dict) else {}
    kind, name = d.get("kind"), str((d.get("metadata") or {}).get("name") or "")
    where = f"{doc.file}:{doc.line_of(())}"
    if kind in OTHER_READERS:
        return f"{where}: {kind}/{name}: {OTHER_READERS[kind]}"
    if kind == "Secret" and name == STORAGE_SECRET:
        return f"{where}: Secret/{name}: read by the loaders from MESHSERVE_STORAGE_CONFIG (point it at this file)"
    handled = "InferenceService, Predictor, TrafficRule, ServingRuntime, the storage-config Secret and the model-serving-config ConfigMap"
    if not kind:
        raise doc.error(("kind",), f"required: every document needs a kind; meshserve reads {handled}")
    what = f"{kind}/{name}" if name else str(kind)
    if kind in ("Secret", "ConfigMap"):
        raise doc.error(("metadata", "name"), f"{what}: meshserve reads no {kind} of that name (only {STORAGE_SECRET if kind == 'Secret' else servingconfig.CONFIGMAP_NAME}); "
                        "remove it from the files given to meshserve, or apply it with kubectl")
    raise doc.error(("kind",), f"meshserve does not handle kind {kind} ({d.get('apiVersion', 'no apiVersion')}); it reads {handled}: "
                    "remove it from the files given to meshserve, or apply it with kubectl")


def canary_percent(doc: Document) -> tuple[Document, int | None]:
    """KServe's `spec.predictor.canaryTrafficPercent`, and the document without it.

    It is a traffic setting, not part of the model: it must not change the concrete model id
    (the SHA-1 of the predictor spec), or moving 10% -> 100% would start another version move."""
    pred = ((doc.data or {}).get("spec") or {}).get("predictor") if isinstance(doc.data, dict) else None
    if not isinstance(pred, dict) or "canaryTrafficPercent" not in pred:
        return doc, None
    raw = pred["canaryTrafficPercent"]
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= 100:
        raise doc.error(("spec", "predictor", "canaryTrafficPercent"), f"must be an integer from 0 to 100, got {raw!r}")
    data = copy.deepcopy(doc.data)
    del data["spec"]["predictor"]["canaryTrafficPercent"]
    return Document(doc.file, data, doc.node), raw


def _files(path: Path) -> Iterable[Path]:
    for f in iter_yaml_files(path):
        if path.is_dir() and EXAMPLES_DIR in f.relative_to(path).parts[:-1]:
            continue
        yield f


def _documents(path: Path, stdin: str | None) -> Iterable[Document]:
    if path == STDIN:
        if stdin is None:
            raise ConfigError(STDIN_LABEL, 0, "", "standard input was not read (only the CLI reads `-f -`)")
        yield from load_documents(STDIN_LABEL, stdin)
        return
    if not path.exists():
        raise ConfigError(str(path), 0, "", "no such file or directory")
    for f in _files(path):
        yield from load_documents(f)


def read_config(paths: Iterable[Path], stdin: str | None = None) -> Config:
    """Parse every InferenceService and TrafficRule under `paths` (rules not yet validated
    against known models: see `validate_rules`); a path `-` stands for `stdin`, the text the CLI
    read from standard input. Raises ConfigError naming file, line, field."""
    cfg = Config()
    seen: dict[str, str] = {}
    for path in paths:
        for doc in _documents(path, stdin):
            if schema.is_rule(doc):
                cfg.rule_docs.append(doc)
                continue
            if servingconfig.is_serving_config(doc.data):
                if cfg.serving is not None:
                    raise doc.error(("metadata", "name"), f"a second {servingconfig.CONFIGMAP_NAME}: keep one")
                cfg.serving = servingconfig.parse(doc)
                cfg.warnings += cfg.serving.warnings
                continue
            if not registry.is_model(doc):
                cfg.skipped.append(classify_other(doc))
                continue
            registry.check_api_version(doc)
            doc2, pct = canary_percent(doc) if registry.is_inference_service(doc) else (doc, None)
            spec = registry.parse_model(doc2)
            if spec.alias in seen:
                raise doc.error(("metadata", "name"), f"'{spec.alias}' is also defined in {seen[spec.alias]}")
            seen[spec.alias] = doc.file
            cfg.kinds[spec.alias] = str(doc.data.get("kind"))
            cfg.specs.append(spec)
            cfg.percents[spec.alias] = pct
    return cfg


def validate_rules(cfg: Config, known_models: Iterable[str], existing_owners: dict[str, str] | None = None) -> None:
    known = set(known_models) | {s.alias for s in cfg.specs} | {s.id for s in cfg.specs}
    cfg.rules = [schema.parse_rule(d, known) for d in cfg.rule_docs]
    schema.check_unique(list(zip(cfg.rules, cfg.rule_docs)), existing_owners)


@dataclass
class Applied:
    specs: list[ModelSpec]
    rules: list[schema.Rule]
    notes: list[str]
    kinds: dict[str, str] = field(default_factory=dict)  # alias -> InferenceService or Predictor
    serving: servingconfig.ServingConfig | None = None
    # Label (`inferenceservice/<name>`, `trafficrule/<name>`) -> the object as stored before and
    # as the files define it (preview.py), for `--dry-run` and `meshserve diff`.
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)


async def apply_paths(state: State, paths: Iterable[Path], stdin: str | None = None, dry_run: bool = False,
                      predict: Predict | None = None) -> Applied:
    """Validate everything, then write it in one commit (models, aliases or version moves, rules).
    With `dry_run` nothing is written: the result says what would change. `predict`: lists the
    stored files of models with no stated size, for placement to book before their first load."""
    from meshserve.rules import moves, preview

    cfg = read_config(list(paths), stdin)
    snap = await state.snapshot()
    rules, statuses, transitions = await store.read_all(state)
    owners = {spec["model"]: name for name, spec in rules.items()}
    validate_rules(cfg, set(snap.aliases) | set(snap.models), owners)
    await predict_sizes(cfg.specs, snap.models, predict)  # only once all of it is valid
    loaded = {m: sum(1 for c in cs.values() if c.state == CopyState.LOADED) for m, cs in snap.placements.items()}
    now = time.time()
    ops, changes, notes = moves.registration(cfg.specs, cfg.percents, snap.aliases, loaded, transitions, now)
    docs = [r.to_doc() for r in cfg.rules]
    rops, rchanges = store.rule_ops(docs, statuses, now)
    after = preview.new_objects(cfg.specs, cfg.kinds, cfg.rules)
    before = preview.stored(snap, transitions, await store.rule_docs(state), preview.names(after))
    if (ops or rops) and not dry_run:
        await state.commit(ops + rops, changes + rchanges)
    return Applied(cfg.specs, cfg.rules, notes + cfg.skipped + cfg.warnings, cfg.kinds, cfg.serving, before, after)


async def predict_sizes(specs: list[ModelSpec], stored: Mapping[str, ModelSpec], predict: Predict | None) -> None:
    """Set `predicted_size` on the specs with no stated size. A model already registered keeps
    its prediction (the same id is the same storage entry: its files were listed then); the
    others are listed through `predict`, if given."""
    todo = []
    for s in specs:
        if s.size_hint:
            continue
        old = stored.get(s.id)
        if old is not None and old.predicted_size:
            s.predicted_size = old.predicted_size
        else:
            todo.append(s)
    if predict is not None and todo:
        got = await predict(todo)
        for s in todo:
            s.predicted_size = got.get(s.id, 0)


def rule_summary(name: str, spec: dict[str, Any], status: dict[str, Any]) -> str:
    return json.dumps({"name": name, "spec": spec, "status": status})
