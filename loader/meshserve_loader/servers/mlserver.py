"""MLServer (and other KServe v2 repository-API servers) as the pod's runtime.

The loader lays out one folder per model in MLServer's models dir, holding a model-settings.json
that names the model (its concrete id), the implementation for its format and the path of the
pulled files, then calls `POST /v2/repository/models/{id}/load`. Unload removes the folder.
MLServer reports no sizes, so the size is the resident-memory delta of its process tree.

`MLServerAdapter` runs it from its own venv (mlserver_venv.py; a ServingRuntime's image may be a
local folder: runtime_image.py) when the loader runs the server, else reaches the MLServer
container beside it. MLServer takes port numbers and reports none: its ports are fixed or
reserved (servers/base.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import aiohttp

if TYPE_CHECKING:
    from meshserve.settings import Settings

from meshserve_loader.memory import tree_rss_bytes
from meshserve_loader.process import RuntimeProcess
from meshserve_loader.servers.base import Adapter, Endpoints, wait_http_ready

log = logging.getLogger("meshserve.loader")
REPO = Path(__file__).resolve().parents[3]

# KServe modelFormat name -> MLServer runtime class (the packages mlserver-<name> provide them).
IMPLEMENTATIONS = {
    "sklearn": "mlserver_sklearn.SKLearnModel",
    "xgboost": "mlserver_xgboost.XGBoostModel",
    "lightgbm": "mlserver_lightgbm.LightGBMModel",
    "mlflow": "mlserver_mlflow.MLflowRuntime",
    "huggingface": "mlserver_huggingface.HuggingFaceRuntime",
}


class LayoutError(ValueError):
    pass


def model_settings(model_id: str, fmt: str, path: Path, default_implementation: str = "", base: dict[str, str] | None = None) -> dict[str, Any]:
    """The model-settings.json MLServer gets for a model. Pure apart from reading a
    model-settings.json the model itself ships (custom runtimes bring their own implementation).
    Which class serves it: the model's own model-settings.json, else the runtime's
    MLSERVER_MODEL_IMPLEMENTATION (`default_implementation`: a custom runtime image sets it, and
    MLServer would apply it to every model naming none), else MLServer's class for the format."""
    own: dict[str, Any] = {}
    if path.is_dir() and (path / "model-settings.json").exists():
        try:
            own = json.loads((path / "model-settings.json").read_text())
        except ValueError as e:
            raise LayoutError(f"the model's model-settings.json is not valid JSON: {e}") from None
    impl = own.get("implementation") or default_implementation or IMPLEMENTATIONS.get(fmt.lower())
    if not impl:
        raise LayoutError(
            f"MLServer has no built-in implementation for format {fmt!r} (it has {', '.join(sorted(IMPLEMENTATIONS))}); "
            "ship a model-settings.json with 'implementation' in the model's folder, or set MLSERVER_MODEL_IMPLEMENTATION in the runtime's env"
        )
    params = dict(own.get("parameters") or {})
    params["uri"] = str(path.resolve())
    if base:
        # An adapter (issue 17): its base's files, fetched by the loader, for the user's MLModel
        # to load (and share between its adapters): parameters.extra.base_model_path / base_model.
        params["extra"] = {**(params.get("extra") or {}), **base}
    return {**own, "name": model_id, "implementation": impl, "parameters": params}


def lay_out(models_dir: Path, model_id: str, fmt: str, path: Path, default_implementation: str = "", base: dict[str, str] | None = None) -> Path:
    """Write the model's folder (atomically: MLServer may scan the dir at any time)."""
    settings = model_settings(model_id, fmt, path, default_implementation, base)
    target = models_dir / model_id
    tmp = models_dir / f".{model_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if path.is_dir():
        # A custom runtime's code (model.py) must sit beside model-settings.json: MLServer puts
        # that folder on sys.path. Links, not copies: the disk cache holds the bytes once.
        for f in path.iterdir():
            if f.name != "model-settings.json":
                (tmp / f.name).symlink_to(f.resolve())
    (tmp / "model-settings.json").write_text(json.dumps(settings, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def base_settings(params: dict[str, Any]) -> dict[str, str] | None:
    """The base an adapter's load names (agent.py), as model-settings.json's extra fields."""
    if not params.get("base_path"):
        return None
    return {"base_model_path": str(Path(str(params["base_path"])).resolve()), "base_model": str(params.get("base_model") or "")}


@dataclass
class MLServerClient:
    base_url: str
    session: aiohttp.ClientSession
    models_dir: Path
    pid: Callable[[], int] = lambda: 0  # the runtime's process, for the RSS delta (0: unknown)
    kind: str = "mlserver"
    default_implementation: str = ""  # the runtime's MLSERVER_MODEL_IMPLEMENTATION

    def __post_init__(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        # MLServer loads can't be measured apart when they overlap.
        self._lock = asyncio.Lock()

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await wait_http_ready(self.session, self.base_url, timeout, "MLServer", 0.2)

    async def load(self, model_id: str, params: dict[str, Any], timeout: float) -> int:
        path = Path(str(params["path"]))
        try:
            lay_out(self.models_dir, model_id, str(params.get("format", "")), path, self.default_implementation, base_settings(params))
        except LayoutError as e:
            raise RuntimeError(str(e)) from None
        async with self._lock:
            pid = self.pid()
            before = tree_rss_bytes(pid) if pid else 0
            async with self.session.post(
                f"{self.base_url}/v2/repository/models/{model_id}/load", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                if r.status != 200:
                    body = await r.text()
                    shutil.rmtree(self.models_dir / model_id, ignore_errors=True)
                    raise RuntimeError(f"MLServer could not load {model_id}: HTTP {r.status}: {_error_text(body)}")
            measured = tree_rss_bytes(pid) - before if pid else 0
        return max(measured, 0)

    async def unload(self, model_id: str) -> None:
        async with self.session.post(f"{self.base_url}/v2/repository/models/{model_id}/unload") as r:
            if r.status not in (200, 404):
                raise RuntimeError(f"MLServer could not unload {model_id}: HTTP {r.status}: {_error_text(await r.text())}")
        shutil.rmtree(self.models_dir / model_id, ignore_errors=True)

    async def held(self) -> list[str]:
        async with self.session.post(f"{self.base_url}/v2/repository/index", json={}) as r:
            if r.status != 200:
                return []
            return [m["name"] for m in await r.json() if m.get("state") == "READY"]

    async def stats(self) -> dict[str, Any]:
        # MLServer keeps no per-model recency we can read cheaply; the gateway's counters do.
        return {m: {} for m in await self.held()}


def _error_text(body: str) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("error") or doc.get("detail") or body) if isinstance(doc, dict) else body
    except ValueError:
        return body[:500]


def mlserver_env(host: str, rest: int, grpc_port: int, metrics_port: int, models_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """MLServer's settings for a pod: our ports and models dir win over the ServingRuntime's env
    (they must match what the pod advertised); loads happen only on our orders."""
    return {
        "MLSERVER_PARALLEL_WORKERS": "0",  # in-process: lower memory, and the RSS delta is the model's
        **extra,
        "MLSERVER_HOST": host,
        "MLSERVER_HTTP_PORT": str(rest),
        "MLSERVER_GRPC_PORT": str(grpc_port),
        "MLSERVER_METRICS_PORT": str(metrics_port),
        "MLSERVER_MODELS_DIR": str(models_dir),
        "MLSERVER_LOAD_MODELS_AT_STARTUP": "false",
    }


async def start_mlserver(exe: Path, work: Path, host: str = "127.0.0.1") -> tuple[RuntimeProcess, str, Path]:
    """A standalone MLServer on reserved ports (held for this process's life) with its models
    dir under `work`, loading only on request: (process, REST URL, models dir). For tests and the
    peer benchmark."""
    from meshserve.ports import reserve_port

    rest, grpc_port, metrics = reserve_port(), reserve_port(), reserve_port()
    models = work / "mlserver-models"
    models.mkdir()
    proc = RuntimeProcess("mlserver", [str(exe), "start", str(models)], mlserver_env(host, rest, grpc_port, metrics, models, {}),
                          log_path=work / "mlserver.log")
    await proc.start()
    return proc, f"http://{host}:{rest}", models


def mlserver_models_dir(settings: "Settings", pod_id: str) -> Path:
    """Where the loader lays out MLServer's model folders: MLServer's MLSERVER_MODELS_DIR. Local
    pods share one data dir, so each has its own folder; a cluster pod's data dir is its own
    volume, and the path is fixed (<data_dir>/mlserver) for the MLServer container to name."""
    base = settings.data_dir / "mlserver"
    return (base if settings.cluster_pod else base / pod_id).resolve()


def _port_in_env(runtime: str, env: dict[str, str], name: str) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SystemExit(f"runtime {runtime!r}: its container env sets {name}={raw!r}, which is not a port number")
    return int(raw)


class MLServerAdapter(Adapter):
    kind = "mlserver"

    async def start(self) -> Endpoints:
        s, spec = self.settings, self.spec
        rest, grpc_port, _ = s.pod_ports(self.index)
        models_dir = mlserver_models_dir(s, self.pod_id)
        # A ServingRuntime's own per-model MLServer settings (MLSERVER_MODEL_NAME, _URI) don't
        # apply to a multi-model server; its default class (a custom image's
        # MLSERVER_MODEL_IMPLEMENTATION) does, for every model that names none.
        extra = {k: v for k, v in spec.env if not k.startswith("MLSERVER_MODEL_") or k == "MLSERVER_MODEL_IMPLEMENTATION"}
        if not s.loader_runs_runtime:
            # MLServer is the container beside this one (istio/runtime-mlserver.yaml), started
            # with these ports and MLSERVER_MODELS_DIR on the volume both mount. Its process is
            # not ours to see, so a load's size is the prediction, not an RSS delta. A
            # ServingRuntime written for ModelMesh states MLServer's REST port in its env
            # (MLSERVER_HTTP_PORT, e.g. 8002): that is where MLServer listens, so the loader and
            # the gateway go there; without it, the pod's REST port.
            rest = _port_in_env(spec.name, extra, "MLSERVER_HTTP_PORT") or rest
            url = f"http://{s.host}:{rest}"
            log.info("runtime %s is MLServer in its own container at %s, models dir %s", spec.name, url, models_dir)
            self.client = MLServerClient(url, self.session, models_dir, default_implementation=extra.get("MLSERVER_MODEL_IMPLEMENTATION", ""))
            data = spec.grpc_data_port
            if data and data != grpc_port:
                # MLServer serves gRPC on the ServingRuntime's grpcDataEndpoint, and the pod's gRPC
                # port is this loader's renaming pass-through to it (limiter.py), as ModelMesh's
                # container fronts the same endpoint: MLServer knows a model only by its id, and a
                # ModelMesh client names the InferenceService in the message.
                grpc_port = await self._front_grpc(data, grpc_port)
            else:
                log.warning("runtime %s: MLServer serves gRPC on the pod's port %d itself, so a gRPC request that names an "
                            "InferenceService (not its model id) is NOT_FOUND there; give the ServingRuntime a "
                            "grpcDataEndpoint on another port (MLSERVER_GRPC_PORT) and the loader fronts it", spec.name, grpc_port)
            self.endpoints = Endpoints(rest, grpc_port)
            return self.endpoints
        from meshserve_loader.runtime_image import ensure_local_image, parse_images
        from meshserve_loader.servers.mlserver_venv import ensure_mlserver

        log.info("runtime %s is MLServer: making sure its venv exists (a few minutes the first time)", spec.name)
        exe = ensure_mlserver(REPO)
        argv = [str(exe), "start", str(models_dir)]
        folder = parse_images(s.runtime_images).get(spec.image) if spec.image else None
        if folder is not None:
            # The runtime's image is a local folder: its own venv over MLServer's, its code on
            # the path, its Dockerfile's ENV under the ServingRuntime's env (runtime_image.py).
            image = ensure_local_image(spec.image, folder, exe.parent / "python", REPO)
            argv = [str(image.python), *argv]
            extra = {**image.env, **{k: v for k, v in extra.items() if k != "PYTHONPATH"}}
            log.info("runtime %s: image %s is %s", spec.name, spec.image, folder)
        # MLServer knows a model only by the id it was loaded under, and a gRPC client names the
        # alias in the message: the pod's gRPC port is a pass-through that renames (limiter.py),
        # MLServer's own is beside it. REST needs none: the gateway rewrites the path.
        # The class for models that name none: the ServingRuntime's env over its image's ENV.
        default_impl = extra.get("MLSERVER_MODEL_IMPLEMENTATION", "")
        rest, mlserver_grpc, metrics_port = self.server_ports(3, (0, 5, 3))
        env = mlserver_env(s.host, rest, mlserver_grpc, metrics_port, models_dir, extra)
        self.process = RuntimeProcess(spec.name, argv, env, log_path=s.data_dir / f"{self.pod_id}-mlserver.log")
        models_dir.mkdir(parents=True, exist_ok=True)
        await self.process.start()
        grpc_port = await self._front_grpc(mlserver_grpc, grpc_port)
        proc = self.process
        self.client = MLServerClient(f"http://{s.host}:{rest}", self.session, models_dir, pid=lambda: proc.pid,
                                     default_implementation=default_impl)
        self.endpoints = Endpoints(rest, grpc_port)
        return self.endpoints

    async def _front_grpc(self, mlserver_grpc: int, pod_grpc: int) -> int:
        """The renaming pass-through (limiter.py) on the pod's gRPC port, in front of MLServer's
        own: MLServer knows a model only by its id, a client names the InferenceService.
        Returns the port it bound."""
        from meshserve_loader.limiter import LimitingProxy, ModelLimits

        host = self.settings.host
        self.proxy = LimitingProxy(ModelLimits(), f"{host}:{mlserver_grpc}", rename=True)
        return await self.proxy.start(host, pod_grpc)

    async def stop(self) -> None:
        proxy = getattr(self, "proxy", None)
        if proxy is not None:
            await proxy.stop()
        await super().stop()
