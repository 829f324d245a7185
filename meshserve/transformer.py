"""KServe transformers in front of a mesh predictor (docs/design/traffic.md, "Transformers").

An InferenceService with `spec.transformer` has two parts:
- its predictor, a mesh model like any other, registered under the derived name
  `<name>-predictor` (KServe's name for the predictor component) instead of `<name>`;
- its transformer, the user's kserve.Model subclass (preprocess / postprocess) in the
  transformer's container, run by `meshserve up` as a local process (its image a local folder,
  loader/meshserve_loader/runtime_image.py), with KServe's arguments: `--model_name
  <name>-predictor`, `--predictor_host <the gateway>`, `--predictor_protocol v2`.

The gateway sends `<name>` to the transformer, with the name in the path rewritten to
`<name>-predictor` (the name the transformer serves); the transformer calls the predictor by
that name through the gateway, so the predictor loads on first use and routes as any model.
What the xDS server needs, per transformer, is in the Redis hash `ms:transformers`:
name -> {"host", "rest_port", "grpc_port", "predictor"}, written by `meshserve up`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshserve.yamlfile import Document

from meshserve.store.keys import TRANSFORMERS  # noqa: E402,F401 - read by the xDS source until it converts
PREDICTOR_SUFFIX = "-predictor"


def predictor_name(name: str) -> str:
    return name + PREDICTOR_SUFFIX


@dataclass(frozen=True)
class TransformerSpec:
    name: str  # the InferenceService's: what clients address
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def predictor(self) -> str:
        return predictor_name(self.name)


def has_transformer(data: Any) -> bool:
    spec = data.get("spec") if isinstance(data, dict) else None
    return isinstance(spec, dict) and isinstance(spec.get("transformer"), dict)


def parse_transformer(doc: Document) -> TransformerSpec | None:
    """The transformer of an InferenceService document, or None. Its first container runs."""
    d = doc.data
    if not has_transformer(d):
        return None
    name = str((d.get("metadata") or {}).get("name") or "")
    containers = d["spec"]["transformer"].get("containers") or []
    if not containers or not isinstance(containers[0], dict) or not containers[0].get("image"):
        raise doc.error(("spec", "transformer", "containers"), "needs a container with an image (the user's kserve.Model transformer)")
    c = containers[0]
    env = tuple((str(e["name"]), str(e.get("value", ""))) for e in c.get("env") or [] if isinstance(e, dict) and "name" in e)
    return TransformerSpec(name, str(c["image"]), tuple(map(str, c.get("command") or ())), tuple(map(str, c.get("args") or ())), env)


def transformer_args(t: TransformerSpec, gateway: str, http_port: int, grpc_port: int) -> list[str]:
    """What KServe's controller adds to a transformer's arguments, pointed at the mesh. The
    user's own `args` come first; argparse takes the last of a repeated option, so ours win for
    the options the mesh owns (its name, the predictor's address, its ports)."""
    ours = ["--model_name", t.predictor, "--predictor_host", gateway, "--http_port", str(http_port), "--grpc_port", str(grpc_port),
            "--enable_grpc", "false"]  # the gateway routes only REST to it (scoped.transformer_routes)
    if not any(a.startswith("--predictor_protocol") or a.startswith("--protocol") for a in t.args):
        ours += ["--predictor_protocol", "v2"]  # a mesh predictor speaks KServe v2 only
    return ours


BIND_SHIM = Path(__file__).resolve().parents[1] / "loader" / "meshserve_loader" / "localbind"


def transformer_env(t: TransformerSpec, image_env: dict[str, str], host: str) -> dict[str, str]:
    """The process's env: the image's (Dockerfile ENV, its folder on PYTHONPATH), then the
    container's, then the shim that keeps kserve's server on `host` (localbind/)."""
    env = {**image_env, **dict(t.env)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (image_env.get("PYTHONPATH", ""), str(BIND_SHIM)) if p)
    env["MESHSERVE_BIND_HOST"] = host
    return env


def record(host: str, rest_port: int, grpc_port: int, predictor: str) -> str:
    return json.dumps({"host": host, "rest_port": rest_port, "grpc_port": grpc_port, "predictor": predictor}, sort_keys=True)
