"""Ports, timings and paths: the one place each default is defined.

Every process takes its settings from here, overridable by environment variables
(`MESHSERVE_<NAME>`), so `meshserve up`, the tests and a Kubernetes Deployment agree.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

# Gateway ports are the users' contract (ModelMesh and ASM use the same numbers).
GATEWAY_REST_PORT = 8008
GATEWAY_GRPC_PORT = 8033
# The largest inference request body or gRPC message any meshserve hop accepts.
MAX_REQUEST_BYTES = 64 << 20


@dataclass
class Settings:
    host: str = "127.0.0.1"
    redis_url: str = ""  # empty: start an embedded Valkey
    redis_port: int = 16379
    gateway_rest_port: int = GATEWAY_REST_PORT
    gateway_grpc_port: int = GATEWAY_GRPC_PORT
    # Envoy worker threads of `meshserve up`'s gateway (bench/gateway.py measures 1 against 2).
    envoy_concurrency: int = 2
    envoy_admin_port: int = 9901  # the gateway Envoy's admin API: always on loopback
    # A second gateway-Envoy listener serving only GET /stats/prometheus (never the rest of the
    # admin API), for scraping in a cluster: "" (the default, `meshserve up`) adds none, and the
    # stats are on the loopback admin port; the pod IP in a cluster (istio/gateway.yaml).
    envoy_metrics_host: str = ""
    envoy_metrics_port: int = 9902
    xds_port: int = 18000
    # Per-model request stats on the gateway (Envoy `vhost.model.route.<model id>.*`, the
    # request panels of the model dashboard). Off: they cost ~4.5 KiB of gateway memory per
    # loaded model, ~90 MiB at 20,000 loaded (docs/design/routing.md). The runtimes' own
    # per-model metrics (meshserve_runtime_requests, meshserve_runtime_inference_seconds)
    # are always there.
    xds_route_stats: bool = False
    # Scopes of a loaded model whose every pod resolves names itself (the built-in runtime)
    # name one RouteConfiguration per pod set instead of the model's own: 11-14 KiB of gateway
    # memory less per loaded model (docs/design/routing.md "Shared routes"). Off with route stats
    # on (those are per model).
    xds_shared_routes: bool = True
    xds_debug_port: int = 18001
    # Where xds's HTTP listener (/healthz, /metrics, /debug/config) binds. Loopback by default:
    # /debug/config shows the whole routing state (model ids, pod addresses). In a cluster set it
    # to the pod IP (istio/gateway.yaml) so kubelet's readiness probe and Prometheus reach
    # /healthz and /metrics; /debug/config then still answers only connections made to loopback
    # (e.g. `kubectl port-forward`), never ones to the pod IP (meshserve_xds/health.py).
    xds_debug_host: str = "127.0.0.1"
    activator_rest_port: int = 18100
    activator_grpc_port: int = 18101
    placement_metrics_port: int = 18102
    # Runtime pod i gets ports runtime_base_port + 10*i (+0 REST, +1 gRPC, +2 loader metrics,
    # +4 the built-in runtime's control port, on 127.0.0.1 only: see pod_control_port). 0: every
    # listener the loader starts binds port 0 (or a reserved port, for MLServer and Triton) and
    # the loader advertises the ports they got (loader/meshserve_loader/servers/__init__.py).
    runtime_base_port: int = 18200
    # Cluster mode: one runtime pod per Kubernetes pod. pod_id is the pod's id in the mesh (its
    # Redis order stream, heartbeat and clusters), e.g. the pod name from the downward API
    # (metadata.name): a StatefulSet pod comes back under the same name to finish its orders.
    # Set, every pod serves on the same fixed ports whatever the index: pod_port (REST), +1
    # (gRPC), +2 (loader metrics), +3 (the runtime's own metrics, MLServer/Triton). Empty
    # (`meshserve up`): pod i is `pod-<i>` on runtime_base_port + 10*i. Never handed down to
    # child processes (as_env): one id can't name several pods.
    pod_id: str = ""
    pod_port: int = 8080
    pods: int = 2
    pod_capacity_bytes: int = 1 << 30
    data_dir: Path = field(default_factory=lambda: Path(".meshserve"))
    config_dir: Path = field(default_factory=lambda: Path("mesh-config"))
    heartbeat_seconds: float = 1.0
    # A pod is presumed dead after this many missed heartbeats; its routes go within two periods.
    heartbeat_misses: int = 2
    # A pod whose heartbeats stopped but whose runtime still answers placement's probe has a
    # stalled loader (paused, starved, restarting): its copies and routes stay, nothing new is
    # placed there, for up to this many seconds. 0: withdraw on missed heartbeats alone.
    loader_stall_grace_seconds: float = 30.0
    # A pod whose heartbeats stopped and whose runtime accepts connections but does not answer
    # is paused as a whole (SIGSTOP, a frozen cgroup, a VM being migrated): kept, with nothing new
    # placed there, for up to this many seconds. A dead runtime refuses, an unreachable node does
    # not accept: both are withdrawn at once. 0: withdraw paused pods at once too.
    paused_pod_grace_seconds: float = 10.0
    lease_seconds: float = 2.0
    cold_start_timeout_seconds: float = 60.0
    load_timeout_seconds: float = 90.0
    # A runtime that limits per-model concurrency (ModelMesh SPI `limitModelConcurrency`): how
    # long a request may wait for a slot of its model before RESOURCE_EXHAUSTED.
    request_queue_timeout_seconds: float = 30.0
    failed_pod_exclusion_seconds: float = 900.0  # ModelMesh's 15 minutes
    # An unload order is carried out this long after it arrives: the copy left the routes in the
    # same commit, and the gateways must apply that (xDS debounce up to 200 ms, build, push)
    # before the runtime drops the model, or a request routed meanwhile gets a 404
    # (docs/design/placement.md, "Unloads wait for the routes").
    unload_grace_seconds: float = 0.5
    # ... but no longer than until every gateway ACKed routes at least as new as the order (the
    # xDS servers publish that, ms:xds:synced): 0.5 s was the whole of a cold start into a full
    # cache (issue 19). False: always the whole grace, as before.
    unload_waits_for_gateways: bool = True
    debounce_quiet_ms: int = 20
    debounce_max_ms: int = 200
    log_json: bool = False
    log_level: str = "info"  # debug, info, warning or error, for every component
    # Loader (issue 5). Storage: a storage-config file or mounted Secret dir ("" = none).
    storage_config: str = ""
    cache_max_bytes: int = 4 << 30  # the pod's disk cache of pulled models
    max_model_bytes: int = 8 << 30  # one model's files; bigger pulls are refused
    pull_progress_bytes: int = 32 << 20  # pulls at least this big log their progress
    # Memory: pod_capacity_bytes 0 = the cgroup memory limit minus mem_buffer_bytes.
    mem_buffer_bytes: int = 128 << 20
    max_concurrent_loads: int = 2
    # False refuses formats whose files run code when loaded (pickle/joblib, user classes).
    allow_executable_formats: bool = True
    # Formats whose libraries the built-in runtime imports at start, comma-separated ("sklearn,onnx").
    # The rest are imported by the first load of their format: ~1.3 CPU-s of that load, ~110 MiB saved
    # per idle runtime for sklearn (docs/design/loader.md).
    runtime_preimport: str = ""
    # ModelMesh's payload processors (the built-in runtime's payloads.py): whitespace-separated
    # URIs such as http://trustyai-service/consumer/kserve/v2 or logger:///*?<model id>. Empty:
    # the runtime reads ModelMesh's own MM_PAYLOAD_PROCESSORS, so a pod spec for ModelMesh works.
    payload_processors: str = ""
    # Local directories besides the PVC root and the pod's disk cache that models may be loaded
    # from (`storageUri: file:///...`), os.pathsep-separated. The built-in runtime refuses a load
    # of any path outside these, the PVC root and its pod's cache (docs/security.md).
    model_roots: str = ""
    # Pod i runs runtime entry i (cycling): "builtin" or a ServingRuntime's name in config_dir.
    pod_runtimes: str = "builtin"
    # A ServingRuntime's container image on one machine: "<image>=<its build folder>,..."
    # (loader/meshserve_loader/runtime_image.py). `meshserve up` pulls no images.
    runtime_images: str = ""
    drain_timeout_seconds: float = 1.0  # on SIGTERM, wait this long for placement to move models (preStop)
    # True: the loader agent runs the built-in runtime itself and restarts it if it dies (as
    # `meshserve up` does). False: the runtime is its own process/container (Kubernetes).
    loader_runs_runtime: bool = False
    # xDS over mutual TLS (issue 9; docs/security.md). PEM file paths. All three of cert, key
    # and CA set: the ADS port speaks TLS only and requires a client certificate signed by the
    # CA, and the gateway bootstrap dials it with TLS. All empty: plaintext.
    xds_tls_cert: str = ""  # the xDS server's certificate (chain)
    xds_tls_key: str = ""
    xds_tls_ca: str = ""  # the CA both sides verify the other's certificate against
    # What the gateway Envoy (and a proxyless client) presents; empty: xds_tls_cert/_key, which
    # must then allow clientAuth use too.
    xds_tls_client_cert: str = ""
    xds_tls_client_key: str = ""
    # The name the gateway sends as SNI and requires among the server certificate's SANs.
    xds_tls_server_name: str = "meshserve-xds"

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        s = cls()
        for f in dataclasses.fields(cls):
            var = f"MESHSERVE_{f.name.upper()}"
            env = os.environ.get(var)
            if env is not None:
                setattr(s, f.name, coerce_env(f.type, env, var))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        s.data_dir = Path(s.data_dir)
        s.config_dir = Path(s.config_dir)
        if s.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(f"MESHSERVE_LOG_LEVEL={s.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        return s

    @property
    def cluster_pod(self) -> bool:
        """True when this process is one Kubernetes runtime pod (MESHSERVE_POD_ID set)."""
        return bool(self.pod_id)

    def pod_name(self, index: int) -> str:
        """The runtime pod's id: MESHSERVE_POD_ID in cluster mode, else `pod-<index>`."""
        return self.pod_id or f"pod-{index}"

    def pod_ports(self, index: int) -> tuple[int, int, int]:
        """(REST, gRPC, loader metrics) of runtime pod `index`; fixed in cluster mode; all 0 when
        runtime_base_port is 0 (bind port 0, advertise what was bound)."""
        if self.ephemeral_pod_ports:
            return 0, 0, 0
        base = self.pod_port if self.pod_id else self.runtime_base_port + 10 * index
        return base, base + 1, base + 2

    def pod_control_port(self, index: int) -> int:
        """The built-in runtime's control port (repository API: load, unload, index), which it
        binds on 127.0.0.1 only: the loader shares the pod's network namespace (in Kubernetes the
        pod's, under `meshserve up` the machine's), other pods never reach it."""
        return 0 if self.ephemeral_pod_ports else self.pod_ports(index)[0] + 4

    @property
    def ephemeral_pod_ports(self) -> bool:
        return not self.pod_id and self.runtime_base_port == 0

    def pod_cache_dir(self, pod_id: str) -> Path:
        """The pod's disk cache of pulled models: the loader writes it, the runtime loads from it."""
        return self.data_dir / "cache" / pod_id

    def allowed_model_roots(self, pod_id: str) -> list[Path]:
        """Where a model the built-in runtime loads may live: the pod's disk cache, the PVC root
        and `model_roots`, each resolved (symlinks and `..`), as a load path is before the check."""
        return [p.resolve() for p in (self.pod_cache_dir(pod_id), self.pvc_root, *self.extra_model_roots)]

    @property
    def extra_model_roots(self) -> list[Path]:
        """`model_roots` as paths: where `file://` models may live besides the PVC root."""
        return [Path(p.strip()) for p in self.model_roots.split(os.pathsep) if p.strip()]

    @property
    def xds_tls(self) -> bool:
        """True when the ADS port speaks mTLS; a ValueError when it is half configured."""
        parts = {"MESHSERVE_XDS_TLS_CERT": self.xds_tls_cert, "MESHSERVE_XDS_TLS_KEY": self.xds_tls_key, "MESHSERVE_XDS_TLS_CA": self.xds_tls_ca}
        missing = [k for k, v in parts.items() if not v]
        if len(missing) == len(parts):
            if self.xds_tls_client_cert or self.xds_tls_client_key:
                raise ValueError("MESHSERVE_XDS_TLS_CLIENT_CERT/_KEY are set but xDS TLS is off: set MESHSERVE_XDS_TLS_CERT, _KEY and _CA too")
            return False
        if missing:
            raise ValueError(f"xDS TLS is half configured: {', '.join(missing)} not set (set all of MESHSERVE_XDS_TLS_CERT, _KEY and _CA, or none)")
        if bool(self.xds_tls_client_cert) != bool(self.xds_tls_client_key):
            raise ValueError("set both MESHSERVE_XDS_TLS_CLIENT_CERT and MESHSERVE_XDS_TLS_CLIENT_KEY, or neither")
        return True

    @property
    def embedded_redis_url(self) -> str:
        """Where `meshserve up`'s embedded Valkey listens."""
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def cli_redis_url(self, explicit: str = "") -> str:
        """The Redis a CLI command talks to: --redis-url, else MESHSERVE_REDIS_URL, else the
        embedded Valkey of a local `meshserve up`."""
        return explicit or self.redis_url or self.embedded_redis_url

    @property
    def pvc_root(self) -> Path:
        """Where a PersistentVolumeClaim name maps to a local directory in embedded mode."""
        return self.data_dir / "pvc"

    def as_env(self) -> dict[str, str]:
        """The settings for child processes (`meshserve up`). pod_id goes down empty: it names
        one pod, and a MESHSERVE_POD_ID left in the shell must not give every local pod one id."""
        env = {f"MESHSERVE_{f.name.upper()}": str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        env["MESHSERVE_POD_ID"] = ""
        return env


class SettingsError(ValueError):
    """A MESHSERVE_* variable whose value can't be read: the message names it and what it takes."""


LOG_LEVELS = ("debug", "info", "warning", "error")


def coerce_env(type_name: object, value: str, var: str = "") -> object:
    t = str(type_name)
    try:
        if t == "int":
            return int(value)
        if t == "float":
            return float(value)
    except ValueError:
        raise SettingsError(f"{var}={value!r}: expected a {'whole number' if t == 'int' else 'number'}") from None
    if t == "bool":
        # Only true and false: a typo like `ture` must not quietly read as false.
        v = value.strip().lower()
        if v not in ("true", "false"):
            raise SettingsError(f"{var}={value!r}: expected true or false")
        return v == "true"
    if t == "Path":
        return Path(value)
    return value


def redact_url(url: str) -> str:
    """A URL safe to print: any password (redis://:secret@host) replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
