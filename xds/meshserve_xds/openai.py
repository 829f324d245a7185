"""OpenAI-compatible endpoints on the gateway's REST listener (issue 17): the model is the JSON
body's `model`. Pure builders for what Envoy needs (docs/design/routing.md, "OpenAI"): the
json_to_metadata filter that lifts `model` (the scoped layout keys its scope on it; the matcher
layout copies it into a header its /v1/ branch looks up), the wrapper that runs a filter on
/v1/ paths only, and the local replies in OpenAI's error shape."""

from __future__ import annotations

from google.protobuf import struct_pb2

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.core.v3 import extension_pb2 as ext_core
from envoy.config.core.v3 import substitution_format_string_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2 as j2m
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import http_inputs_pb2, regex_pb2, string_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2
from xds.type.matcher.v3 import string_pb2 as xstring_pb2

from meshserve_xds.pb import pack_any
from meshserve_xds.resources import KEY_HEADER

OPENAI_PREFIX = "/v1/"
# Where json_to_metadata puts what it lifts (its filter name); the scope-key Lua reads it there.
J2M_NAMESPACE = "envoy.filters.http.json_to_metadata"


def model_metadata_filter() -> hcm.HttpFilter:
    """The body's `model` into dynamic metadata, for the Lua filter to key the scope on. Only on
    /v1/ paths (a match_delegate skips it on every other request), so /v2 and gRPC bodies are
    never buffered or parsed: the filter holds a request until its whole body is in, which a
    large v2 tensor must not pay. Measured cost on /v1: docs/design/routing.md, "OpenAI"."""
    rule = j2m.JsonToMetadata.Rule(
        selectors=[j2m.JsonToMetadata.Selector(key="model")],
        on_present=j2m.JsonToMetadata.KeyValuePair(key="model", type=j2m.JsonToMetadata.STRING),
    )
    # Any content type: `curl -d` says application/x-www-form-urlencoded, and such a request
    # would otherwise go the slow way (by the activator) every time. A body that isn't JSON sets
    # nothing and goes to the activator, which answers it in OpenAI's error shape.
    cfg = j2m.JsonToMetadata(request_rules=j2m.JsonToMetadata.MatchRules(
        rules=[rule], allow_empty_content_type=True, allow_content_types_regex=regex_pb2.RegexMatcher(regex=".*")))
    return only_on_v1(ext_core.TypedExtensionConfig(name=J2M_NAMESPACE, typed_config=pack_any(cfg)), "meshserve.openai_model")


def only_on_v1(config: ext_core.TypedExtensionConfig, name: str) -> hcm.HttpFilter:
    """An HTTP filter that runs on /v1/ paths only: a match_delegate skips it on any other
    request, on its headers alone."""
    pred = matcher_pb2.Matcher.MatcherList.Predicate
    not_v1 = pred(not_matcher=pred(single_predicate=pred.SinglePredicate(
        input=extension_pb2.TypedExtensionConfig(name="path", typed_config=pack_any(http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=":path"))),
        value_match=xstring_pb2.StringMatcher(prefix=OPENAI_PREFIX),
    )))
    skip = matcher_pb2.Matcher.OnMatch(action=extension_pb2.TypedExtensionConfig(name="skip", typed_config=pack_any(skip_action_pb2.SkipFilter())))
    wrapped = extension_matcher_pb2.ExtensionWithMatcher(
        xds_matcher=matcher_pb2.Matcher(matcher_list=matcher_pb2.Matcher.MatcherList(matchers=[
            matcher_pb2.Matcher.MatcherList.FieldMatcher(predicate=not_v1, on_match=skip)])),
        extension_config=config,
    )
    return hcm.HttpFilter(name=name, typed_config=pack_any(wrapped))


def error_mappers() -> list[hcm.ResponseMapper]:
    """Envoy's own replies on /v1/ paths in OpenAI's error shape, which its clients parse: an
    unregistered `model` (no scope) is 404 model_not_found; anything else (no upstream, a
    timeout) keeps its status, with the reason as the message."""
    def mapper(extra: accesslog_pb2.AccessLogFilter | None, message: str, type_: str, code: str | None, param: str | None) -> hcm.ResponseMapper:
        on_v1 = accesslog_pb2.AccessLogFilter(header_filter=accesslog_pb2.HeaderFilter(header=rc.HeaderMatcher(
            name=":path", string_match=string_pb2.StringMatcher(prefix=OPENAI_PREFIX))))
        flt = on_v1 if extra is None else accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=[on_v1, extra]))
        body = struct_pb2.Struct()
        body.update({"error": {"message": message, "type": type_, "param": param, "code": code}})
        return hcm.ResponseMapper(filter=flt, body_format_override=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=body, content_type="application/json"))

    no_route = accesslog_pb2.AccessLogFilter(response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=["NR"]))
    server = accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(comparison=accesslog_pb2.ComparisonFilter(
        op=accesslog_pb2.ComparisonFilter.GE, value=base_pb2.RuntimeUInt32(default_value=500, runtime_key="meshserve.openai_server_error"))))
    return [
        mapper(no_route, f"The model '%REQ({KEY_HEADER})%' does not exist: no InferenceService or model is registered under this name",
               "invalid_request_error", "model_not_found", "model"),
        mapper(server, "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)", "server_error", None, None),
        mapper(None, "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)", "invalid_request_error", None, None),
    ]
