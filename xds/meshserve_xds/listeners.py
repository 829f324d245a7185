"""The gateway's listeners: `meshserve_rest` (8008) and `meshserve_grpc` (8033), each an HTTP
connection manager. Pure: settings in, protobuf out.

`build_listener` takes its RouteConfiguration of the same name over RDS (the matcher layout);
`build_scoped_listener` takes scoped routes keyed on `x-ms-model` instead, behind the
scope-key Lua filter (the scoped layout; docs/design/routing.md).
"""

from __future__ import annotations

from google.protobuf import struct_pb2, wrappers_pb2

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, protocol_pb2, substitution_format_string_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.on_demand.v3 import on_demand_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from meshserve.settings import MAX_REQUEST_BYTES
from meshserve_xds import grpc_fields, lua, openai
from meshserve_xds.pb import ads_source, pack_any
from meshserve_xds.resources import KEY_HEADER

SCOPES = "meshserve_scopes"
HCM = "envoy.filters.network.http_connection_manager"
# The gRPC frame prefix (compressed flag, length) before each message.
GRPC_FRAME_PREFIX = 5
GRPC_RESOURCE_EXHAUSTED = "8"
GRPC_NOT_FOUND = "5"


def router() -> hcm.HttpFilter:
    return hcm.HttpFilter(name="envoy.filters.http.router", typed_config=pack_any(router_pb2.Router()))


def json_errors() -> hcm.LocalReplyConfig:
    """Replies Envoy makes itself (no upstream, timeouts) come as KServe v2 error JSON."""
    body = struct_pb2.Struct()
    body.update({"error": "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)"})
    return hcm.LocalReplyConfig(
        body_format=substitution_format_string_pb2.SubstitutionFormatString(json_format=body, content_type="application/json")
    )


def grpc_limits() -> tuple[protocol_pb2.Http2ProtocolOptions, list[hcm.ResponseMapper]]:
    """One request size limit for gRPC whether or not the client sends a routing header.

    Without one, the Lua filter buffers the message to read the model name, and Envoy caps a
    buffered stream at its HTTP/2 stream window (16 MiB by default): anything bigger was UNKNOWN
    "Payload Too Large" while the same message with mm-vmodel-id passed. The window is set so
    that a message of MAX_REQUEST_BYTES fits, as the runtimes' max_receive_message_length
    lets it; over it, Envoy's 413 is mapped to RESOURCE_EXHAUSTED, the code gRPC itself gives
    a message over its limit."""
    h2 = protocol_pb2.Http2ProtocolOptions(initial_stream_window_size=wrappers_pb2.UInt32Value(value=MAX_REQUEST_BYTES + GRPC_FRAME_PREFIX))
    too_large = hcm.ResponseMapper(
        filter=accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
            comparison=accesslog_pb2.ComparisonFilter(op=accesslog_pb2.ComparisonFilter.EQ, value=base_pb2.RuntimeUInt32(default_value=413, runtime_key="meshserve.grpc_too_large_status")),
        )),
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            text_format_source=base_pb2.DataSource(inline_string=f"request message is larger than the {MAX_REQUEST_BYTES >> 20} MiB limit"),
        ),
        headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="grpc-status", value=GRPC_RESOURCE_EXHAUSTED))],
    )
    # A stream's first message over the same window: the field extraction filter (grpc_fields)
    # refuses it as FAILED_PRECONDITION "internal buffer limits"; the same answer as above.
    stream_too_large = hcm.ResponseMapper()
    stream_too_large.CopyFrom(too_large)
    stream_too_large.filter.CopyFrom(grpc_fields.buffer_overflow())
    return h2, [too_large, stream_too_large]


def connection_manager(name: str, http2_only: bool) -> hcm.HttpConnectionManager:
    """The matcher layout's connection manager: RDS `name`; on REST, the OpenAI model filters
    and v2 error JSON (OpenAI's on /v1/ paths); on gRPC, the size limit and model-header Lua
    filter."""
    manager = hcm.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm.HttpConnectionManager.HTTP2 if http2_only else hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(config_source=ads_source(), route_config_name=name),
        http_filters=[router()],
        max_request_headers_kb=wrappers_pb2.UInt32Value(value=96),
    )
    if not http2_only:
        # OpenAI-style requests: the body's `model` into `x-ms-model`, for the routes' /v1/ branch.
        manager.http_filters.insert(0, openai.model_metadata_filter())
        manager.http_filters.insert(1, lua.openai_key_filter())
        manager.local_reply_config.CopyFrom(json_errors())
        manager.local_reply_config.mappers.extend(openai.error_mappers())
        # The scoped layout's REST route bounds gaps (routes.streaming) for v2 too: its timeout is the 504 it was.
        manager.local_reply_config.mappers.append(hcm.ResponseMapper(filter=openai.stream_idle(), status_code=wrappers_pb2.UInt32Value(value=504)))
        # HTTP/1.0 clients (ab, some load balancers' health checks, old SDKs) were refused with
        # 426. Envoy serves them over HTTP/1.1 upstream and closes after each response; the
        # default host is for those that send no Host header.
        manager.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions(accept_http_10=True, default_host_for_http_10="meshserve"))
    else:
        # gRPC clients that send no mm-vmodel-id / mm-model-id: route by the message's model_name.
        manager.http_filters.insert(0, lua.model_header_filter())
        manager.http_filters.insert(0, grpc_fields.stream_model_filter())
        h2, too_large = grpc_limits()
        manager.http2_protocol_options.CopyFrom(h2)
        manager.local_reply_config.mappers.extend(too_large)
    return manager


def listener(name: str, host: str, port: int, manager: hcm.HttpConnectionManager) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[listener_components_pb2.Filter(name=HCM, typed_config=pack_any(manager))])],
    )


def build_listener(name: str, host: str, port: int, http2_only: bool) -> listener_pb2.Listener:
    return listener(name, host, port, connection_manager(name, http2_only))


def on_demand() -> hcm.HttpFilter:
    """Holds a request whose scope names a RouteConfiguration Envoy has not received yet.

    Envoy applies a scope update at once and fetches the RouteConfiguration it names afterwards
    ("new RDS subscriptions created after listener warming up" are not waited for,
    scoped_rds.cc). A model that just loaded, or a name that just got a traffic plan, has a
    scope naming a RouteConfiguration new to the gateway: for one RDS round trip its requests
    would match no route and get a 404. With this filter such a request finds no route, asks
    for the scope's RouteConfiguration and continues once it arrived (the on-demand S/RDS
    path, which waits while the scope's config is still Envoy's empty placeholder). A request
    that has a route, or whose name has no scope, passes straight through."""
    return hcm.HttpFilter(name="envoy.filters.http.on_demand", typed_config=pack_any(on_demand_pb2.OnDemand()))


def scoped_routes() -> hcm.ScopedRoutes:
    frag = hcm.ScopedRoutes.ScopeKeyBuilder.FragmentBuilder
    return hcm.ScopedRoutes(
        name=SCOPES,
        scope_key_builder=hcm.ScopedRoutes.ScopeKeyBuilder(fragments=[frag(header_value_extractor=frag.HeaderValueExtractor(name=KEY_HEADER, index=0))]),
        rds_config_source=ads_source(),
        scoped_rds=hcm.ScopedRds(scoped_rds_config_source=ads_source()),
    )


def build_scoped_listener(name: str, host: str, port: int, http2_only: bool) -> listener_pb2.Listener:
    """The matcher layout's listener with scoped routes and the scope-key Lua filter (and, on
    REST, the OpenAI model filter before it)."""
    manager = connection_manager(name, http2_only)
    manager.ClearField("rds")
    manager.scoped_routes.CopyFrom(scoped_routes())
    del manager.http_filters[:]
    first = [grpc_fields.stream_model_filter()] if http2_only else [openai.model_metadata_filter()]
    manager.http_filters.extend([*first, lua.scope_key_filter(), on_demand(), router()])
    # No scope: nobody registered that name. Say which, as the activator does in the other
    # layout: KServe v2 error JSON on REST, NOT_FOUND on gRPC (Envoy's own mapping of a local
    # 404 is UNIMPLEMENTED with no message, which reads as a missing method).
    message = f"model '%REQ({KEY_HEADER})%' not found: no InferenceService or model is registered under this name"
    no_route = accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NR"]))
    if http2_only:
        manager.local_reply_config.mappers.append(hcm.ResponseMapper(
            filter=no_route,
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(text_format_source=base_pb2.DataSource(inline_string=message)),
            headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="grpc-status", value=GRPC_NOT_FOUND))],
        ))
    else:  # openai.error_mappers() come first (connection_manager): the first mapper that matches wins
        body = struct_pb2.Struct()
        body.update({"error": message})
        manager.local_reply_config.mappers.append(hcm.ResponseMapper(
            filter=no_route,
            body_format_override=substitution_format_string_pb2.SubstitutionFormatString(json_format=body, content_type="application/json"),
        ))
    return listener(name, host, port, manager)
