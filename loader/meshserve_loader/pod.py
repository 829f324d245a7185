"""What runtime pod N is: which runtime it runs (settings.pod_runtimes names "builtin" or a
ServingRuntime in config_dir), the formats it advertises, its capacity, and the process the
agent must run and watch (MLServer pods; the built-in runtime is started beside the agent).

Its id and ports come from the settings: `pod-<N>` on ports offset by N under `meshserve up`,
or in cluster mode MESHSERVE_POD_ID (the Kubernetes pod name) on the fixed MESHSERVE_POD_PORT
ports (Settings.pod_name / pod_ports). In cluster mode (MESHSERVE_LOADER_RUNS_RUNTIME false)
the model server, MLServer included, is its own container beside the loader."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from meshserve.model import Pod
from meshserve.settings import Settings
from meshserve.yamlfile import iter_yaml_files, load_documents
from meshserve_loader.builtin.formats import builtin_formats
from meshserve_loader.builtin_client import RuntimeClient
from meshserve_loader.memory import cgroup_limit_bytes, pod_capacity
from meshserve_loader.metrics import LoaderMetrics
from meshserve_loader.process import RuntimeProcess, builtin_argv, mlserver_env
from meshserve_loader.runtimes import RuntimeSpec, builtin_runtime, serving_runtimes
from meshserve_loader.triton import infer_server_type

log = logging.getLogger("meshserve.loader")

REPO = Path(__file__).resolve().parents[2]
BUILTIN_NAME = "builtin"


@dataclass
class BuiltPod:
    pod: Pod
    spec: RuntimeSpec
    runtime: object
    process: RuntimeProcess | None
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
    name = runtime_name_of_pod(settings, index)
    rest, grpc_port, _metrics_port = settings.pod_ports(index)
    pod_id = settings.pod_name(index)
    url = f"http://{settings.host}:{rest}"
    process: RuntimeProcess | None = None
    if name == BUILTIN_NAME:
        spec = builtin_runtime(builtin_formats())
        # The repository API is on the runtime's loopback control port, never the pod address:
        # the loader shares the runtime's network namespace (the pod's in Kubernetes).
        runtime: object = RuntimeClient(f"http://127.0.0.1:{settings.pod_control_port(index)}", session)
        if settings.loader_runs_runtime:
            # Its output goes where ours does (`meshserve up` prefixes and shows it).
            process = RuntimeProcess(f"runtime-{index}", builtin_argv(index), {"MESHSERVE_RUNTIME_BASE_PORT": str(settings.runtime_base_port)})
            await process.start()
    elif (spec := find_runtime(settings.config_dir, name)).server_type == "triton":
        from meshserve_loader.triton import start_triton

        runtime, process = await start_triton(settings, index, spec, session)
    else:
        if spec.server_type == "modelruntime":
            return await _spi_pod(settings, index, spec)
        if spec.server_type != "mlserver":
            raise SystemExit(
                f"runtime {name!r}: serverType {spec.server_type!r} is not run by meshserve's loader yet "
                "(it runs builtin, mlserver, triton, and modelruntime for ModelMesh SPI runtimes)"
            )
        from meshserve_loader.mlserver import MLServerClient

        models_dir = mlserver_models_dir(settings, pod_id)
        # A ServingRuntime's own per-model MLServer settings (MLSERVER_MODEL_NAME, _URI) don't
        # apply to a multi-model server; its default class (a custom image's
        # MLSERVER_MODEL_IMPLEMENTATION) does, for every model that names none.
        extra = {k: v for k, v in spec.env if not k.startswith("MLSERVER_MODEL_") or k == "MLSERVER_MODEL_IMPLEMENTATION"}
        if not settings.loader_runs_runtime:
            # MLServer is the container beside this one (istio/runtime-mlserver.yaml), started
            # with these ports and MLSERVER_MODELS_DIR on the volume both mount. Its process is
            # not ours to see, so a load's size is the prediction, not an RSS delta.
            log.info("runtime %s is MLServer in its own container at %s, models dir %s", name, url, models_dir)
            runtime = MLServerClient(url, session, models_dir, default_implementation=extra.get("MLSERVER_MODEL_IMPLEMENTATION", ""))
            return _built(settings, pod_id, rest, grpc_port, spec, runtime, None)
        from meshserve_loader.mlserver_venv import ensure_mlserver
        from meshserve_loader.runtime_image import ensure_local_image, parse_images

        log.info("runtime %s is MLServer: making sure its venv exists (a few minutes the first time)", name)
        exe = ensure_mlserver(REPO)
        argv = [str(exe), "start", str(models_dir)]
        folder = parse_images(settings.runtime_images).get(spec.image) if spec.image else None
        if folder is not None:
            # The runtime's image is a local folder: its own venv over MLServer's, its code on
            # the path, its Dockerfile's ENV under the ServingRuntime's env (runtime_image.py).
            image = ensure_local_image(spec.image, folder, exe.parent / "python", REPO)
            argv = [str(image.python), *argv]
            extra = {**image.env, **{k: v for k, v in extra.items() if k != "PYTHONPATH"}}
            log.info("runtime %s: image %s is %s", name, spec.image, folder)
        # MLServer knows a model only by the id it was loaded under, and a gRPC client names the
        # alias in the message: the pod's gRPC port is a pass-through that renames (limiter.py),
        # MLServer's own is beside it. REST needs none: the gateway rewrites the path.
        mlserver_grpc = rest + 5
        env = mlserver_env(settings.host, rest, mlserver_grpc, rest + 3, models_dir, extra)
        process = RuntimeProcess(name, argv, env, log_path=settings.data_dir / f"{pod_id}-mlserver.log")
        models_dir.mkdir(parents=True, exist_ok=True)
        await process.start()
        from meshserve_loader.limiter import LimitingProxy, ModelLimits

        proxy = LimitingProxy(ModelLimits(), f"{settings.host}:{mlserver_grpc}", rename=True)
        await proxy.start(settings.host, grpc_port)
        proc = process
        runtime = MLServerClient(url, session, models_dir, pid=lambda: proc.pid,
                                 default_implementation=extra.get("MLSERVER_MODEL_IMPLEMENTATION", ""))
        runtime.grpc_proxy = proxy  # held for the agent's life (a grpc.aio server nobody holds is collected)
    return _built(settings, pod_id, rest, grpc_port, spec, runtime, process)


def mlserver_models_dir(settings: Settings, pod_id: str) -> Path:
    """Where the loader lays out MLServer's model folders: MLServer's MLSERVER_MODELS_DIR. Local
    pods share one data dir, so each has its own folder; a cluster pod's data dir is its own
    volume, and the path is fixed (<data_dir>/mlserver) for the MLServer container to name."""
    base = settings.data_dir / "mlserver"
    return (base if settings.cluster_pod else base / pod_id).resolve()


def _built(settings: Settings, pod_id: str, rest: int, grpc_port: int, spec: RuntimeSpec, runtime: object,
           process: RuntimeProcess | None) -> BuiltPod:
    buffer = spec.mem_buffer_bytes or settings.mem_buffer_bytes
    capacity = pod_capacity(settings.pod_capacity_bytes, cgroup_limit_bytes(), buffer)
    pod = Pod(
        id=pod_id,
        host=settings.host,
        rest_port=rest,
        grpc_port=grpc_port,
        capacity_bytes=capacity,
        formats=advertised_formats(spec),
        runtime=spec.name,
        auto_formats=auto_formats(spec),
        max_loading=max(1, settings.max_concurrent_loads),
    )
    timeout = spec.loading_timeout_ms / 1000 if spec.loading_timeout_ms else settings.load_timeout_seconds
    return BuiltPod(pod, spec, runtime, process, timeout, LoaderMetrics())


async def _spi_pod(settings: Settings, index: int, spec: RuntimeSpec) -> BuiltPod:
    """A runtime written for ModelMesh's SPI, running beside the agent (its own container) on
    builtInAdapter.runtimeManagementPort. Its runtimeStatus sets capacity, load concurrency and
    timeout, as in ModelMesh."""
    from meshserve_loader.spi import SpiClient

    if not spec.runtime_management_port:
        raise SystemExit(f"runtime {spec.name!r}: a modelruntime needs builtInAdapter.runtimeManagementPort (its SPI gRPC port)")
    client = SpiClient(f"{settings.host}:{spec.runtime_management_port}")
    metrics = LoaderMetrics()
    await client.wait_ready(120)
    status = await client.status()
    rest, grpc_port, _ = settings.pod_ports(index)
    if status.limit_model_concurrency:
        # Envoy reaches this pod's gRPC through the limiting pass-through (limiter.py), which
        # forwards to the runtime's data endpoint (grpcDataEndpoint, else its SPI port).
        from meshserve_loader.limiter import ModelLimits

        data = spec.grpc_data_port or spec.runtime_management_port
        if data == grpc_port:
            raise SystemExit(f"runtime {spec.name!r} limits per-model concurrency, so the pod's gRPC port {grpc_port} is the "
                             f"loader's pass-through; serve inference on another port (grpcDataEndpoint)")
        await client.limit_concurrency(ModelLimits(settings.request_queue_timeout_seconds, metrics.registry), settings.host, grpc_port,
                                       f"{settings.host}:{data}")
    elif spec.grpc_data_port:
        grpc_port = spec.grpc_data_port  # Envoy goes straight to the runtime's data endpoint
    configured = settings.pod_capacity_bytes or status.capacity_bytes
    capacity = pod_capacity(min(configured, status.capacity_bytes) if status.capacity_bytes else configured, cgroup_limit_bytes(),
                            spec.mem_buffer_bytes or settings.mem_buffer_bytes)
    pod = Pod(settings.pod_name(index), settings.host, rest, grpc_port, capacity, advertised_formats(spec), spec.name,
              auto_formats(spec), max(1, min(settings.max_concurrent_loads, status.max_loading or settings.max_concurrent_loads)))
    timeout = (status.loading_timeout_ms or spec.loading_timeout_ms) / 1000 or settings.load_timeout_seconds
    return BuiltPod(pod, spec, client, None, timeout, metrics)
