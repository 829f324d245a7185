"""The `meshserve` command. Each command group lives in its own module under
meshserve/commands/ and is registered here, so components add commands without touching
each other's code."""

from __future__ import annotations

import importlib
import pkgutil

import click

import meshserve.commands
from meshserve.commands.exits import HELP as EXIT_HELP
from meshserve.commands.exits import FAILED
from meshserve.extras import MissingExtra
from meshserve.settings import SettingsError


@click.group(epilog=EXIT_HELP)
@click.version_option(package_name="meshserve")
def cli() -> None:
    """meshserve: many models on a pool of runtime pods, routed by Envoy."""


def _register() -> None:
    for mod in pkgutil.iter_modules(meshserve.commands.__path__):
        m = importlib.import_module(f"meshserve.commands.{mod.name}")
        for cmd in getattr(m, "COMMANDS", ()):
            cli.add_command(cmd)


_register()


def main() -> None:
    try:
        cli()
    except (MissingExtra, SettingsError) as e:
        # A library of an extra this install lacks, or a MESHSERVE_* value that can't be read:
        # say which, not a traceback.
        click.echo(f"meshserve: {e}", err=True)
        raise SystemExit(FAILED) from None


if __name__ == "__main__":
    main()
