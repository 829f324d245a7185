"""The model servers a loader agent drives, one adapter per ServingRuntime server type, behind
one interface (base.py `Adapter`: start, stop, restart, readiness, load, unload, stats).

| serverType (builtInAdapter) | adapter | who starts the server |
|---|---|---|
| builtin (and no ServingRuntime) | builtin.BuiltinAdapter | the loader (`meshserve up`), else its own container |
| mlserver | mlserver.MLServerAdapter | the loader, from its own venv, else its own container |
| triton (or a tritonserver image) | triton.TritonAdapter | the loader (a `tritonserver` on PATH), else its own container |
| modelruntime (ModelMesh SPI) | spi.SpiAdapter | never the loader: its own container |
"""

from __future__ import annotations

import importlib

from meshserve_loader.servers.base import Adapter, Endpoints, Terms

__all__ = ["ADAPTERS", "Adapter", "Endpoints", "Terms", "adapter_class"]

# serverType -> "module:class", imported when a pod uses it (MLServer's and the SPI's need grpc
# stubs and libraries a built-in pod never loads).
ADAPTERS = {
    "builtin": "meshserve_loader.servers.builtin:BuiltinAdapter",
    "mlserver": "meshserve_loader.servers.mlserver:MLServerAdapter",
    "triton": "meshserve_loader.servers.triton:TritonAdapter",
    "modelruntime": "meshserve_loader.servers.spi:SpiAdapter",
}


def adapter_class(server_type: str, runtime: str) -> type[Adapter]:
    where = ADAPTERS.get(server_type)
    if where is None:
        raise SystemExit(f"runtime {runtime!r}: serverType {server_type!r} is not run by meshserve's loader "
                         f"(it runs {', '.join(sorted(ADAPTERS))})")
    module, _, name = where.partition(":")
    cls: type[Adapter] = getattr(importlib.import_module(module), name)
    return cls
