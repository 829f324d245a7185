"""`meshserve up`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from meshserve.settings import Settings


@click.command()
@click.option("--redis-url", envvar="MESHSERVE_REDIS_URL", default="", help="Use this Redis/Valkey instead of an embedded Valkey.")
@click.option("--pods", type=int, default=None, help="Number of local runtime pods (default 2).")
@click.option("--config", "config_dir", type=click.Path(path_type=Path), default=None, help="mesh-config directory.")
def up(redis_url: str, pods: int | None, config_dir: Path | None) -> None:
    """Run the whole mesh in the foreground (Ctrl-C stops it)."""
    from meshserve.up import run_up

    s = Settings.from_env(redis_url=redis_url or None, pods=pods, config_dir=config_dir)
    explicit = {"pods"} if pods is not None else set()  # a flag wins over model-serving-config
    sys.exit(asyncio.run(run_up(s, explicit)))


COMMANDS = [up]
