"""The runtime process a loader agent runs and watches (MLServer, or our built-in runtime when
the agent owns it): start, notice death, restart. The agent reports the models a death lost."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("meshserve.loader.process")


PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    # Its own group, so we stop it and its workers together; and the kernel stops it if the
    # agent dies, even by SIGKILL, so a runtime is never orphaned.
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class RuntimeProcess:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    log_path: Path | None = None
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0

    async def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out if out is not None else None,
                stderr=asyncio.subprocess.STDOUT if out is not None else None,
                env={**os.environ, **self.env},
                cwd=str(self.cwd) if self.cwd else None,
                preexec_fn=_child_setup,
            )
        finally:
            if out is not None:
                out.close()
        log.info("started runtime %s (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def exit_code(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(p.wait(), wait)
                break
            except asyncio.TimeoutError:
                continue


def builtin_argv(index: int) -> list[str]:
    return [sys.executable, "-m", "meshserve_loader.builtin", "--index", str(index)]


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
    """A standalone MLServer on free ports with its models dir under `work`, loading only on
    request: (process, REST URL, models dir). For tests and the peer benchmark."""
    from meshserve.devmesh import free_port

    rest, grpc_port, metrics = free_port(), free_port(), free_port()
    models = work / "mlserver-models"
    models.mkdir()
    proc = RuntimeProcess("mlserver", [str(exe), "start", str(models)], mlserver_env(host, rest, grpc_port, metrics, models, {}),
                          log_path=work / "mlserver.log")
    await proc.start()
    return proc, f"http://{host}:{rest}", models
