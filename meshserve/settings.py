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
    envoy_admin_port: int = 9901
    xds_port: int = 18000
    xds_debug_port: int = 18001
    activator_rest_port: int = 18100
    activator_grpc_port: int = 18101
    placement_metrics_port: int = 18102
    # Runtime pod i gets ports runtime_base_port + 10*i (+0 REST, +1 gRPC, +2 loader metrics).
    runtime_base_port: int = 18200
    pods: int = 2
    pod_capacity_bytes: int = 1 << 30
    data_dir: Path = field(default_factory=lambda: Path(".meshserve"))
    config_dir: Path = field(default_factory=lambda: Path("mesh-config"))
    heartbeat_seconds: float = 1.0
    # A pod is presumed dead after this many missed heartbeats; its routes go within two periods.
    heartbeat_misses: int = 2
    lease_seconds: float = 2.0
    cold_start_timeout_seconds: float = 60.0
    load_timeout_seconds: float = 90.0
    failed_pod_exclusion_seconds: float = 900.0  # ModelMesh's 15 minutes
    debounce_quiet_ms: int = 20
    debounce_max_ms: int = 200
    log_json: bool = False
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
    # Pod i runs runtime entry i (cycling): "builtin" or a ServingRuntime's name in config_dir.
    pod_runtimes: str = "builtin"
    drain_timeout_seconds: float = 1.0  # on SIGTERM, wait this long for placement to move models (preStop)
    # True: the loader agent runs the built-in runtime itself and restarts it if it dies (as
    # `meshserve up` does). False: the runtime is its own process/container (Kubernetes).
    loader_runs_runtime: bool = False

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        s = cls()
        for f in dataclasses.fields(cls):
            env = os.environ.get(f"MESHSERVE_{f.name.upper()}")
            if env is not None:
                setattr(s, f.name, _coerce(f.type, env))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        s.data_dir = Path(s.data_dir)
        s.config_dir = Path(s.config_dir)
        return s

    def pod_ports(self, index: int) -> tuple[int, int, int]:
        base = self.runtime_base_port + 10 * index
        return base, base + 1, base + 2

    @property
    def pvc_root(self) -> Path:
        """Where a PersistentVolumeClaim name maps to a local directory in embedded mode."""
        return self.data_dir / "pvc"

    def as_env(self) -> dict[str, str]:
        return {f"MESHSERVE_{f.name.upper()}": str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _coerce(type_name: object, value: str) -> object:
    t = str(type_name)
    if t == "int":
        return int(value)
    if t == "float":
        return float(value)
    if t == "bool":
        return value.lower() in ("1", "true", "yes", "on")
    if t == "Path":
        return Path(value)
    return value
