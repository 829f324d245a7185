"""Reading mesh-config/ and writing the registry: the embedded mode's input side."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from meshserve import registry
from meshserve.model import ModelSpec
from meshserve.store.state import State
from meshserve.yamlfile import ConfigError, iter_yaml_files, load_documents

if TYPE_CHECKING:
    from meshserve.rules.config import Predict


def read_models(path: Path) -> list[ModelSpec]:
    """Every InferenceService and Predictor under `path`. Raises ConfigError (file, line, field) on bad input;
    nothing is written until every file has parsed."""
    specs: list[ModelSpec] = []
    seen: dict[str, str] = {}
    for f in iter_yaml_files(path):
        if path.is_dir() and "examples" in f.relative_to(path).parts[:-1]:
            continue  # mesh-config/examples/ is documentation, applied only when named
        for doc in load_documents(f):
            if not registry.is_model(doc):
                continue
            spec = registry.parse_model(doc)
            if spec.alias in seen:
                raise ConfigError(doc.file, doc.line_of(("metadata", "name")), "metadata.name", f"'{spec.alias}' is also defined in {seen[spec.alias]}")
            seen[spec.alias] = doc.file
            specs.append(spec)
    return specs


async def apply_path(state: State, path: Path, predict: "Predict | None" = None) -> list[ModelSpec]:
    """Models and traffic rules under `path`. A changed InferenceService becomes a version move
    (the alias moves once the new model is loaded): meshserve/rules/config.py."""
    from meshserve import tracing
    from meshserve.rules.config import apply_paths

    with tracing.tracer(__name__).start_as_current_span("control.apply", attributes={"meshserve.files": [str(path)], "meshserve.by": "up"}) as span:
        res = await apply_paths(state, [path], predict=predict)
        span.set_attributes(tracing.applied(res.specs, res.rules))
        return res.specs
