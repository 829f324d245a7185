"""The model server process a loader agent runs and watches (the built-in runtime, MLServer or
Triton, when the loader runs it): start, notice death, stop. The adapters (servers/) say what to
run; the agent restarts it and reports the models a death lost."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from meshserve.deathsig import die_with_parent

log = logging.getLogger("meshserve.loader.process")


def _child_setup() -> None:  # runs in the child between fork and exec
    # Its own group, so we stop it and its workers together; and the kernel stops it if the
    # agent dies, even by SIGKILL, so a runtime is never orphaned.
    os.setsid()
    die_with_parent()


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
