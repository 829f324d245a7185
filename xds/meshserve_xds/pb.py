"""Two protobuf helpers every Envoy builder needs: packing into an Any, and "over ADS"."""

from __future__ import annotations

from google.protobuf import any_pb2

from envoy.config.core.v3 import config_source_pb2


def pack_any(msg: object) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)  # type: ignore[arg-type]
    return a


def ads_source() -> config_source_pb2.ConfigSource:
    """Fetch the named resource over the same ADS stream."""
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3)
