"""Runs child processes for `meshserve up`: prefixed logs, ordered shutdown, no orphans.

Each child runs in its own process group (so Ctrl-C reaches only us, and we stop the children
in order) and asks the kernel to SIGTERM it if we die, even by kill -9.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass

from meshserve.deathsig import die_with_parent

def _child_setup() -> None:  # runs in the child between fork and exec
    os.setpgrp()
    die_with_parent()


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    pump: asyncio.Task[None]
    argv: list[str]
    env: dict[str, str] | None
    restarts: int = 0
    next_restart: float = 0.0
    stop_signal: int = signal.SIGTERM


class Supervisor:
    def __init__(self, env: dict[str, str] | None = None, pid_file: "os.PathLike[str] | None" = None):
        self.env = {**os.environ, **(env or {})}
        self.children: list[Child] = []
        self.exited = asyncio.Event()
        self.pid_file = pid_file

    async def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM) -> Child:
        proc = await self._spawn(argv, env)
        child = Child(name, proc, asyncio.create_task(self._pump(name, proc)), argv, env, stop_signal=stop_signal)
        self.children.append(child)
        self._write_pids()
        return child

    async def restart_dead(self, now: float) -> list[str]:
        """Restart children that died, with a per-child backoff (1 s doubling to 10 s), the way
        a Kubernetes restartPolicy would: one crashed component never takes the mesh down."""
        restarted = []
        for c in self.children:
            if c.proc.returncode is None:
                continue
            if c.next_restart == 0.0:
                c.next_restart = now + min(10.0, 2.0 ** c.restarts)
                continue
            if now < c.next_restart:
                continue
            c.restarts += 1
            c.next_restart = 0.0
            c.proc = await self._spawn(c.argv, c.env)
            c.pump = asyncio.create_task(self._pump(c.name, c.proc))
            restarted.append(c.name)
        if restarted:
            self._write_pids()
        return restarted

    def _write_pids(self) -> None:
        if self.pid_file is not None:
            import json

            tmp = f"{self.pid_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({c.name: c.proc.pid for c in self.children}, f)
            os.replace(tmp, self.pid_file)

    async def _spawn(self, argv: list[str], env: dict[str, str] | None) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**self.env, **(env or {})},
            preexec_fn=_child_setup,
        )

    async def _pump(self, name: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        width = 12
        while True:
            line = await proc.stdout.readline()
            if not line:
                break
            sys.stdout.write(f"{name:<{width}}| {line.decode(errors='replace').rstrip()}\n")
            sys.stdout.flush()
        code = await proc.wait()
        if code not in (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL):
            sys.stdout.write(f"{name:<{width}}| exited with code {code}\n")
        self.exited.set()

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc.returncode is not None]

    async def stop_all(self, timeout: float = 5.0) -> None:
        """Stop children newest first (the gateway before what it routes to, the store last)."""
        for child in reversed(self.children):
            await self._stop(child, timeout)
        self.children.clear()

    async def _stop(self, child: Child, timeout: float) -> None:
        p = child.proc
        if p.returncode is None:
            try:
                os.killpg(p.pid, child.stop_signal)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except asyncio.TimeoutError:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await p.wait()
        try:
            await asyncio.wait_for(child.pump, 1.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            child.pump.cancel()
