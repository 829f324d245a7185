"""InferenceService spec.transformer (meshserve/transformer.py): parsing, the predictor's derived
name, the transformer's arguments, and its routes in both gateway layouts. Kind: unit."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshserve import registry
from meshserve.transformer import parse_transformer, transformer_args
from meshserve.yamlfile import ConfigError, load_documents
from meshserve_loader.runtime_image import image_argv
from meshserve_xds import matcher, scoped_routes
from meshserve_xds import resources as r
from meshserve_xds import scoped

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "mesh-config" / "examples" / "digits-transformer"
ACT = r.Endpoint("127.0.0.1", 9000, 9001)
ID = "digits__isvc-0123456789"


def test_an_isvc_with_a_transformer_registers_its_predictor_under_the_derived_name() -> None:
    (doc,) = load_documents(EXAMPLE / "inferenceservice.yaml")
    spec = registry.parse_inference_service(doc)
    assert spec.alias == "digits-predictor" and spec.id.startswith("digits__isvc-")
    t = parse_transformer(doc)
    assert t is not None and (t.name, t.image, t.predictor) == ("digits", "registry.example/digits-transformer:latest", "digits-predictor")
    # Without a transformer, nothing changes.
    (plain,) = load_documents(REPO / "mesh-config" / "sklearn-mnist.yaml")
    assert registry.parse_inference_service(plain).alias == "sklearn-mnist" and parse_transformer(plain) is None


def test_a_transformer_needs_an_image(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text((EXAMPLE / "inferenceservice.yaml").read_text().replace("image: registry.example/digits-transformer:latest", "workingDir: /x"))
    (doc,) = load_documents(f)
    with pytest.raises(ConfigError, match="needs a container with an image"):
        parse_transformer(doc)


def test_argv_is_the_dockerfile_entrypoint_then_kserves_arguments(tmp_path: Path) -> None:
    (doc,) = load_documents(EXAMPLE / "inferenceservice.yaml")
    t = parse_transformer(doc)
    assert t is not None
    py = tmp_path / "bin" / "python"
    argv = image_argv(EXAMPLE, py, t.command, t.args) + transformer_args(t, "127.0.0.1:8008", 5000, 5001)
    assert argv[:3] == [str(py), "-m", "digits_transformer"]
    i = argv.index("--model_name")
    assert argv[i + 1] == "digits-predictor" and argv[argv.index("--predictor_host") + 1] == "127.0.0.1:8008"
    assert argv[argv.index("--predictor_protocol") + 1] == "v2"


def _state(loaded: bool) -> r.RoutingState:
    return r.RoutingState(
        pods={"pod-0": r.Endpoint("127.0.0.1", 3000, 3001)},
        loaded={ID: ["pod-0"]} if loaded else {},
        aliases={"digits-predictor": ID},
        activator=ACT,
        registered={ID},
        transformers={"digits": r.Transformer(r.Endpoint("127.0.0.1", 7000, 7001), "digits-predictor")},
    )


def test_scoped_layout_sends_the_name_to_the_transformer_with_the_served_name() -> None:
    res = scoped.build_all(_state(False), r.ListenerConfig(), wire=False)
    assert res.by_type[r.SCOPED_ROUTE_TYPE]["scope/digits"].route_configuration_name == "transformer/digits"
    assert res.by_type[r.SCOPED_ROUTE_TYPE]["scope/digits-predictor"].route_configuration_name == scoped_routes.ACTIVATOR_RC  # loads on first use
    route = res.by_type[r.ROUTE_TYPE]["transformer/digits"].virtual_hosts[0].routes[0].route
    assert route.cluster == "transformer_digits_rest" and route.regex_rewrite.substitution == "/v2/models/digits-predictor"
    assert res.by_type[r.ENDPOINT_TYPE]["transformer_digits_rest"].endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 7000


def test_scoped_diffs_keep_the_transformers_scope() -> None:
    idx = scoped.index(_state(False))
    # The predictor loads: its alias' scope moves; the transformer's name is not touched even
    # when a change names it.
    part = _state(True)
    patch = scoped.diff_partial(idx, part, {ID}, {"digits-predictor", "digits"})
    assert set(patch.upserts[r.SCOPED_ROUTE_TYPE]) == {"scope/digits-predictor"} and not patch.removes[r.SCOPED_ROUTE_TYPE]
    # A full diff without the transformer removes its route configuration and scope.
    gone = _state(True)
    gone.transformers = {}
    patch, _ = scoped.diff(scoped.index(_state(True)), gone)
    assert "transformer/digits" in patch.removes[r.ROUTE_TYPE] and "scope/digits" in patch.removes[r.SCOPED_ROUTE_TYPE]


def test_matcher_layout_routes_the_name_to_the_transformer() -> None:
    from envoy.config.route.v3 import route_components_pb2

    rc = matcher.build_rest_routes(_state(True))
    exact = rc.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map
    route = route_components_pb2.Route()
    exact["/v2/models/digits"].action.typed_config.Unpack(route)
    assert route.route.cluster == "transformer_digits_rest" and route.route.regex_rewrite.substitution == "/v2/models/digits-predictor"
    exact["/v2/models/digits-predictor"].action.typed_config.Unpack(route)
    assert route.route.cluster == "pod_pod-0_rest"
