"""The CLI's one exit-code convention, as kubectl's: 0 ok, 1 failed, 2 usage.

- 0: the command did what was asked.
- 1: it could not: a name is not found, Redis cannot be reached, a file is not valid, a load
  failed or timed out. The message on stderr says what to do.
- 2: the command line itself is wrong (an unknown option, a bad value). click raises these
  (click.UsageError, exit 2), so nothing here returns 2.

`meshserve diff` alone follows `kubectl diff`: 0 no differences, 1 differences, 3 it could not
compare (">1 an error"), so a script can tell a diff from a failure.

Commands exit through these helpers, never with bare numbers, so the convention has one home.
"""

from __future__ import annotations

from typing import Awaitable, NoReturn, TypeVar

import click

OK = 0
FAILED = 1
USAGE = 2  # click's own, for bad command lines (click.UsageError)
DIFF_FOUND = 1
DIFF_ERROR = 3

HELP = (
    "Exit status: 0 ok; 1 failed (not found, Redis unreachable, invalid YAML, a failed load); "
    "2 usage (bad options or arguments). `meshserve diff`: 0 no differences, 1 differences, 3 error."
)

T = TypeVar("T")


def fail(message: str, code: int = FAILED) -> NoReturn:
    """Print `message` to stderr and exit `code` (1 unless the command's own convention says otherwise)."""
    click.echo(message, err=True)
    raise click.exceptions.Exit(code)


def done(ok: bool) -> NoReturn:
    """Exit 0 when `ok`, else 1 (the reason was already printed)."""
    raise click.exceptions.Exit(OK if ok else FAILED)


def is_unreachable(e: BaseException) -> bool:
    """Whether `e` means the mesh's Redis could not be reached (redis-py wraps socket errors in its own types)."""
    return isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith("redis")


def unreachable(url: str, e: BaseException, code: int = FAILED) -> NoReturn:
    from meshserve.settings import redact_url

    fail(f"cannot reach the mesh's Redis at {redact_url(url)}: {str(e).rstrip('.')}. Is `meshserve up` running? Or pass --redis-url.", code)


def run(url: str, coro: Awaitable[T], code: int = FAILED) -> T:
    """Run a coroutine that reads or writes the mesh at `url`; Redis unreachable exits `code` with what to do."""
    import asyncio

    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except Exception as e:
        if is_unreachable(e):
            unreachable(url, e, code)
        raise


