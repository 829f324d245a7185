"""Envoy's gRPC field extraction filter, for streams: the model a ModelStreamInfer stream's
first request names, read by Envoy itself so that a stream with no routing header is routed
like a unary call (lua.py sets `mm-vmodel-id` from it)."""

from __future__ import annotations

from google.protobuf import descriptor_pb2

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.filters.http.grpc_field_extraction.v3 import config_pb2 as gfe
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from meshserve_proto import grpc_predict_v2_pb2 as pb
from meshserve_xds.pb import pack_any

STREAM_METHOD = "inference.GRPCInferenceService.ModelStreamInfer"


def _descriptors() -> bytes:
    fds = descriptor_pb2.FileDescriptorSet()
    pb.DESCRIPTOR.CopyToProto(fds.file.add())
    return fds.SerializeToString()


def stream_model_filter() -> hcm.HttpFilter:
    config = gfe.GrpcFieldExtractionConfig(
        descriptor_set=base_pb2.DataSource(inline_bytes=_descriptors()),
        extractions_by_method={STREAM_METHOD: gfe.FieldExtractions(request_field_extractions={
            "model_name": gfe.RequestFieldValueDisposition(dynamic_metadata="model")})},
    )
    return hcm.HttpFilter(name="envoy.filters.http.grpc_field_extraction", typed_config=pack_any(config))


def buffer_overflow() -> accesslog_pb2.AccessLogFilter:
    """Envoy's local reply when this filter could not hold the first message (over the
    stream's buffer): its details name the filter and FAILED_PRECONDITION."""
    cel = cel_pb2.ExpressionFilter(expression='response.code_details.startsWith("grpc_field_extraction_FAILED_PRECONDITION")')
    return accesslog_pb2.AccessLogFilter(extension_filter=accesslog_pb2.ExtensionFilter(
        name="envoy.access_loggers.extension_filters.cel", typed_config=pack_any(cel)))
