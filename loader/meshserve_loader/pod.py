"""What runtime pod N is: which model server it runs (settings.pod_runtimes names "builtin" or a
ServingRuntime in config_dir), the adapter that drives it (servers/), the formats it
advertises, its capacity, and the ports it advertises (the ones its servers reported or were
given: servers/base.py).

Its id and ports come from the settings: `pod-<N>` on ports offset by N under `meshserve up`
(or ports bound on 0, with MESHSERVE_RUNTIME_BASE_PORT=0), or in cluster mode MESHSERVE_POD_ID
(the Kubernetes pod name) on the fixed MESHSERVE_POD_PORT ports (Settings.pod_name / pod_ports).
In cluster mode (MESHSERVE_LOADER_RUNS_RUNTIME false) the model server, MLServer included, is
its own container beside the loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from meshserve.model import Pod
from meshserve.settings import Settings
from meshserve.yamlfile import iter_yaml_files, load_documents
from meshserve_loader.builtin.formats import builtin_formats
from meshserve_loader.memory import cgroup_limit_bytes, pod_capacity
from meshserve_loader.metrics import LoaderMetrics
from meshserve_loader.servers import Adapter, Endpoints, adapter_class
from meshserve_loader.servers.mlserver import mlserver_models_dir
from meshserve_loader.serving_runtime import RuntimeSpec, builtin_runtime, infer_server_type, serving_runtimes

log = logging.getLogger("meshserve.loader")

BUILTIN_NAME = "builtin"
__all__ = ["BuiltPod", "build_pod", "find_runtime", "mlserver_models_dir", "runtime_name_of_pod"]


@dataclass
class BuiltPod:
    pod: Pod
    spec: RuntimeSpec
    server: Adapter
    load_timeout: float
    metrics: LoaderMetrics


def runtime_name_of_pod(settings: Settings, index: int) -> str:
    names = [n.strip() for n in settings.pod_runtimes.split(",") if n.strip()] or [BUILTIN_NAME]
    return names[index % len(names)]


def find_runtime(config_dir: Path, name: str) -> RuntimeSpec:
    docs = [d for f in iter_yaml_files(config_dir) for d in load_documents(f)] if config_dir.exists() else []
    for rt in serving_runtimes(docs):
        if rt.name == name:
            return infer_server_type(rt, docs)  # KServe-style Triton runtimes name no serverType
    raise SystemExit(f"pod runtime {name!r}: no ServingRuntime of that name under {config_dir}; add one or fix MESHSERVE_POD_RUNTIMES")


def advertised_formats(spec: RuntimeSpec) -> list[str]:
    # Every declared format: an InferenceService that names this runtime explicitly may use a
    # format the runtime does not auto-select.
    return spec.format_names()


def auto_formats(spec: RuntimeSpec) -> list[str]:
    """The formats placement may pick this runtime for when a model names none (autoSelect)."""
    return sorted({f.name for f in spec.formats if f.auto_select})


async def build_pod(settings: Settings, index: int, session: aiohttp.ClientSession) -> BuiltPod:
    """Start the pod's server (through its adapter) and describe the pod it makes."""
    name = runtime_name_of_pod(settings, index)
    spec = builtin_runtime(builtin_formats()) if name == BUILTIN_NAME else find_runtime(settings.config_dir, name)
    metrics = LoaderMetrics()
    server = adapter_class(spec.server_type, name)(settings, index, spec, session, metrics)
    endpoints = await server.start()
    return BuiltPod(describe_pod(settings, index, spec, server, endpoints), spec, server, load_timeout(settings, spec, server), metrics)


def describe_pod(settings: Settings, index: int, spec: RuntimeSpec, server: Adapter, endpoints: Endpoints) -> Pod:
    """The pod as placement sees it. A server's own terms (the SPI's runtimeStatus) cap the
    configured capacity and load concurrency."""
    configured = settings.pod_capacity_bytes
    said = server.terms.capacity_bytes
    capacity = pod_capacity(min(configured, said) if said and configured else (configured or said), cgroup_limit_bytes(),
                            spec.mem_buffer_bytes or settings.mem_buffer_bytes)
    max_loading = max(1, settings.max_concurrent_loads)
    if server.terms.max_loading:
        max_loading = max(1, min(max_loading, server.terms.max_loading))
    return Pod(
        id=settings.pod_name(index),
        host=settings.host,
        rest_port=endpoints.rest,
        grpc_port=endpoints.grpc,
        capacity_bytes=capacity,
        formats=advertised_formats(spec),
        runtime=spec.name,
        auto_formats=auto_formats(spec),
        max_loading=max_loading,
        resolves_names=server.resolves_names,
        awaits_loads=server.awaits_loads,
    )


def load_timeout(settings: Settings, spec: RuntimeSpec, server: Adapter) -> float:
    ms = server.terms.loading_timeout_ms or spec.loading_timeout_ms
    return ms / 1000 if ms else settings.load_timeout_seconds
