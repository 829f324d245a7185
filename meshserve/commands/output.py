"""`-o json|yaml|wide` for the reading commands, as kubectl's `-o`.

The default is a table for people; `wide` adds columns; `json` and `yaml` print the same plain
data (YAML through PyYAML's safe_dump). `--json` stays as an alias of `-o json`: scripts and
tests written before `-o` use it.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, TypeVar

import click

TABLE, WIDE, JSON, YAML = "table", "wide", "json", "yaml"
F = TypeVar("F", bound=Callable[..., Any])


def output_option(f: F) -> F:
    """Add `-o/--output` and `--json` to a command; it receives one `output` argument (table, wide, json or yaml)."""

    @functools.wraps(f)
    def wrapper(*args: Any, output: str | None, as_json: bool, **kwargs: Any) -> Any:
        if as_json and output not in (None, JSON):
            raise click.UsageError(f"--json and -o {output} ask for different formats: give one of them")
        return f(*args, output=JSON if as_json else (output or TABLE), **kwargs)

    wrapper = click.option("--json", "as_json", is_flag=True, help="Same as -o json (kept for scripts).")(wrapper)
    wrapper = click.option(
        "-o", "--output", type=click.Choice([JSON, YAML, WIDE]), default=None,
        help="Output format: json or yaml (machine-readable), wide (a table with more columns). Default: a table.",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


def is_data(output: str) -> bool:
    """Whether `output` asks for machine-readable data rather than a table."""
    return output in (JSON, YAML)


def emit(data: Any, output: str) -> None:
    """Print `data` as JSON or YAML."""
    if output == YAML:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True), nl=False)
    else:
        click.echo(json.dumps(data, indent=2))
