"""Which extra of the meshserve package brings a library, so a missing one says what to install.

The base install is what every role shares; each role's heavy libraries are an extra
(pyproject.toml): `control` (the Kubernetes client), `gateway` (Envoy), `runtime` (the model
formats' libraries), `loader` (the object-store clients), `local` (`meshserve up`), `all`.
A control-plane image carries no ML library and a runtime pod no Kubernetes client, so an
import of one of them in the wrong place must say which extra it belongs to instead of a bare
"No module named ...". Wrap the import:

    with needs("control", "cluster mode"):
        from kubernetes import client
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

EXTRAS = ("control", "gateway", "runtime", "loader", "local", "all")


class MissingExtra(ModuleNotFoundError):
    """A library of an extra that is not installed. A ModuleNotFoundError, so code that already
    catches ImportError for an optional library keeps working."""

    def __init__(self, extra: str, purpose: str, missing: str | None) -> None:
        self.extra = extra
        super().__init__(install_hint(extra, purpose, missing), name=missing)


def install_hint(extra: str, purpose: str, missing: str | None = None) -> str:
    what = f"the Python module {missing!r}" if missing else "a library"
    return (
        f"{purpose} needs {what}, which comes with meshserve's {extra!r} extra: "
        f"pip install 'meshserve[{extra}]' (or 'meshserve[all]' for every role)"
    )


@contextmanager
def needs(extra: str, purpose: str) -> Iterator[None]:
    """Turn a ModuleNotFoundError raised by the imports inside into a MissingExtra naming `extra`."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: one of {', '.join(EXTRAS)}")
    try:
        yield
    except MissingExtra:
        raise
    except ModuleNotFoundError as e:
        raise MissingExtra(extra, purpose, e.name) from e
