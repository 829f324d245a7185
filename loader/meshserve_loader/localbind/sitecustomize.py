"""Put on a local transformer's PYTHONPATH by `meshserve up` (meshserve/transformer.py).

kserve's ModelServer binds its REST server on 0.0.0.0, with no option to change it; on one
machine the mesh's servers listen on MESHSERVE_BIND_HOST (127.0.0.1) only. Python imports a
`sitecustomize` module at start: this one makes uvicorn's default-all-interfaces host that one.
Its gRPC server is turned off (--enable_grpc false): the gateway routes only REST to it.
"""

import os

_host = os.environ.get("MESHSERVE_BIND_HOST")
if _host:
    try:
        import uvicorn

        _init = uvicorn.Config.__init__

        def _bound(self, app, *args, **kwargs):  # type: ignore[no-untyped-def]
            if kwargs.get("host") in ("0.0.0.0", "::"):
                kwargs["host"] = _host
            _init(self, app, *args, **kwargs)

        uvicorn.Config.__init__ = _bound
    except ImportError:
        pass
