"""Kind: real server. The agent's ModelRuntime SPI client against a real gRPC server of our own
(SpiServer on 127.0.0.1, stopped at the end): status, predict/load/size/unload, failures with
reasons; and the committed generated code speaks ModelMesh's wire format."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve_loader.servers.spi import SpiClient, SpiServer, serve_spi
from meshserve_proto import model_runtime_pb2 as mr


async def test_spi_round_trip(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello")
    servicer = SpiServer(capacity_bytes=123 << 20, max_loading=3, loading_timeout_ms=45_000)
    server, port = await serve_spi(servicer, "127.0.0.1")
    c = SpiClient(f"127.0.0.1:{port}")
    try:
        await c.wait_ready(10)
        st = await c.status()
        assert (st.ready, st.capacity_bytes, st.max_loading, st.loading_timeout_ms) == (True, 123 << 20, 3, 45_000)
        params = {"path": str(tmp_path / "hello.txt"), "format": "string"}
        predicted = await c.predict_size("m1", params)
        assert predicted > 0
        assert await c.load("m1", params, 10) == predicted
        assert "m1" in servicer.models and list(await c.stats()) == ["m1"]
        await c.unload("m1")
        await c.unload("m1")  # unloading what isn't loaded answers at once
        assert servicer.models == {} and await c.stats() == {}
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT: the built-in runtime cannot load format 'pytorch'"):
            await c.load("m2", {"path": str(tmp_path / "hello.txt"), "format": "pytorch"}, 10)
    finally:
        await c.close()
        await server.stop(0)


def test_wire_compatible_field_numbers() -> None:
    """ModelMesh's runtimes decode what we send: the field numbers are the SPI's."""
    f = {fd.name: fd.number for fd in mr.LoadModelRequest.DESCRIPTOR.fields}
    assert f == {"model_id": 1, "model_type": 2, "model_path": 3, "model_key": 4}
    f = {fd.name: fd.number for fd in mr.RuntimeStatusResponse.DESCRIPTOR.fields}
    assert f["capacity_in_bytes"] == 2 and f["model_loading_timeout_ms"] == 4 and f["allow_any_method"] == 10
    assert mr.DESCRIPTOR.package == "mmesh" and "ModelRuntime" in mr.DESCRIPTOR.services_by_name
