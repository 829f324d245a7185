"""ServingRuntime resources (parsed into RuntimeSpec) and which one serves a model. Pure.

KServe's rule, as ModelMesh applies it: an explicit `runtime:` in the InferenceService picks that
runtime, which must declare the model's format; otherwise the runtimes that declare the format
(and version, when the model names one) with `autoSelect: true` are candidates, and the first by
name wins so every component picks the same one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from meshserve.yamlfile import Document

SR_KIND = "ServingRuntime"
BUILTIN = "meshserve-builtin"
# ModelMesh's builtInAdapter.serverType values, and ours.
SERVER_TYPES = ("mlserver", "triton", "ovms", "torchserve", "builtin", "modelruntime")


class RuntimeSelectionError(ValueError):
    pass


@dataclass(frozen=True)
class Format:
    name: str
    version: str = ""
    auto_select: bool = False


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    formats: tuple[Format, ...]
    server_type: str = "builtin"
    multi_model: bool = True
    mem_buffer_bytes: int = 0
    loading_timeout_ms: int = 0
    runtime_management_port: int = 0
    grpc_data_port: int = 0  # `grpcDataEndpoint: port:N`: where the runtime serves inference
    env: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    image: str = field(default="", compare=False)  # the first container's image (runtime_image.py maps it locally)

    def declares(self, fmt: str, version: str = "") -> bool:
        return any(f.name == fmt and (not version or not f.version or f.version == version) for f in self.formats)

    def auto_selects(self, fmt: str, version: str = "") -> bool:
        return any(f.auto_select and f.name == fmt and (not version or not f.version or f.version == version) for f in self.formats)

    def format_names(self) -> list[str]:
        return sorted({f.name for f in self.formats})


def parse_serving_runtime(d: Mapping[str, Any], where: str = "ServingRuntime") -> RuntimeSpec:
    if d.get("kind") != SR_KIND:
        raise RuntimeSelectionError(f"{where}: expected kind {SR_KIND}, got {d.get('kind')!r}")
    name = str((d.get("metadata") or {}).get("name") or "")
    if not name:
        raise RuntimeSelectionError(f"{where}: metadata.name is required")
    spec = d.get("spec") or {}
    formats = []
    for i, f in enumerate(spec.get("supportedModelFormats") or []):
        if not isinstance(f, dict) or not f.get("name"):
            raise RuntimeSelectionError(f"{where} {name}: supportedModelFormats[{i}] needs a name")
        formats.append(Format(str(f["name"]), str(f.get("version") or ""), bool(f.get("autoSelect", False))))
    adapter = spec.get("builtInAdapter") or {}
    server_type = str(adapter.get("serverType") or "builtin").lower()
    if server_type not in SERVER_TYPES:
        raise RuntimeSelectionError(f"{where} {name}: builtInAdapter.serverType {server_type!r} is not one of {', '.join(SERVER_TYPES)}")
    env: list[tuple[str, str]] = []
    containers = [c for c in spec.get("containers") or [] if isinstance(c, dict)]
    for c in containers:
        for e in c.get("env") or []:
            if isinstance(e, dict) and "name" in e and "value" in e:
                env.append((str(e["name"]), str(e["value"])))
    return RuntimeSpec(
        name=name,
        formats=tuple(formats),
        server_type=server_type,
        multi_model=bool(spec.get("multiModel", True)),
        mem_buffer_bytes=int(adapter.get("memBufferBytes") or 0),
        loading_timeout_ms=int(adapter.get("modelLoadingTimeoutMillis") or 0),
        runtime_management_port=int(adapter.get("runtimeManagementPort") or 0),
        grpc_data_port=_endpoint_port(spec.get("grpcDataEndpoint"), f"{where} {name}: grpcDataEndpoint"),
        env=tuple(env),
        image=str(containers[0].get("image") or "") if containers else "",
    )


def _endpoint_port(raw: Any, where: str) -> int:
    """KServe's endpoint form `port:8085` (or `unix:...`, which a pod's neighbour can't reach)."""
    if not raw:
        return 0
    kind, _, value = str(raw).partition(":")
    if kind != "port" or not value.isdigit():
        raise RuntimeSelectionError(f"{where}: expected `port:<number>`, got {raw!r}")
    return int(value)


def serving_runtimes(docs: Iterable[Document]) -> list[RuntimeSpec]:
    return [parse_serving_runtime(doc.data, f"{doc.file}") for doc in docs if isinstance(doc.data, dict) and doc.data.get("kind") == SR_KIND]


def select_runtime(fmt: str, version: str, explicit: str, runtimes: Iterable[RuntimeSpec]) -> RuntimeSpec:
    """The runtime that serves a model of format `fmt` (and `version`), honouring an explicit
    `runtime:`. Raises RuntimeSelectionError saying what to change."""
    rts = sorted(runtimes, key=lambda r: r.name)
    if explicit:
        for r in rts:
            if r.name == explicit:
                if not r.declares(fmt, version):
                    raise RuntimeSelectionError(
                        f"runtime {explicit!r} does not declare format {fmt}{' version ' + version if version else ''} "
                        f"(it declares {', '.join(r.format_names()) or 'none'}); add it to its supportedModelFormats"
                    )
                return r
        raise RuntimeSelectionError(f"runtime {explicit!r} is not defined; known runtimes: {', '.join(r.name for r in rts) or 'none'}")
    for r in rts:
        if r.auto_selects(fmt, version):
            return r
    declaring = [r.name for r in rts if r.declares(fmt, version)]
    hint = f"; {', '.join(declaring)} declare it without autoSelect: name one in `runtime:`" if declaring else ""
    raise RuntimeSelectionError(f"no runtime auto-selects format {fmt}{' version ' + version if version else ''}{hint}")


def builtin_runtime(formats: Iterable[str]) -> RuntimeSpec:
    """Our built-in runtime as a ServingRuntime would declare it: every format, autoSelect."""
    return RuntimeSpec(BUILTIN, tuple(Format(f, "", True) for f in sorted(formats)), "builtin")


def infer_server_type(spec: RuntimeSpec, docs: Iterable[Document]) -> RuntimeSpec:
    """A ServingRuntime with no builtInAdapter.serverType whose container is Triton (the users'
    servingruntime-triton.yaml: KServe's form, image nvcr.io/nvidia/tritonserver) is run as a
    Triton runtime. Every other runtime is returned unchanged."""
    if spec.server_type != "builtin":
        return spec
    for doc in docs:
        d = doc.data
        if not isinstance(d, Mapping) or d.get("kind") != "ServingRuntime" or (d.get("metadata") or {}).get("name") != spec.name:
            continue
        s = d.get("spec") or {}
        if (s.get("builtInAdapter") or {}).get("serverType"):
            return spec
        for c in s.get("containers") or []:
            image = str((c or {}).get("image") or "")
            repo = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
            if repo == "tritonserver":
                return dataclasses.replace(spec, server_type="triton")
    return spec
