"""The full build's fast path (fastpb templates) gives the bytes the protobuf builders give.

Kind: unit (pure), with hypothesis over names: ASCII, unicode, NULs, names that look like the
templates' placeholders, and names long enough for two- and three-byte length prefixes and for
the prefix table's fallback (4,096 bytes and up).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envoy.config.route.v3 import route_pb2, scoped_route_pb2
from google.protobuf import any_pb2, wrappers_pb2
from meshserve.rules.plan import Branch, Plan
from meshserve_xds import clusters, fastpb, scoped, scoped_routes
from meshserve_xds import resources as r
from meshserve_xds.cache import SnapshotCache, pack

ACT = r.Endpoint("10.0.1.1", 8080, 8081)
PODS = {f"pod-{i}": r.Endpoint(f"10.0.0.{i}", 8008, 8033) for i in range(4)}
FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Names: anything a string field holds, weighted towards the lengths where a prefix grows.
names = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
    st.sampled_from([
        "m", "-", "m0__isvc-0000000000", "模型-ä", "😀" * 40, "\x00", "a\x00b", fastpb.placeholder(0), fastpb.placeholder(7) + "x",
        "x" * 115, "x" * 116, "x" * 121, "x" * 122, "x" * 127, "x" * 128, "x" * 4089, "x" * 4090, "x" * 4095, "x" * 4096,
        "x" * 16373, "x" * 16384, "é" * 3000,
    ]),
)


def _bytes(msg: object) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()  # type: ignore[attr-defined]


# -- the encoder


def test_varint_matches_protobuf() -> None:
    assert fastpb.varint(0) == b"\x00"
    for n in (1, 127, 128, 300, 4095, 4096, 16383, 16384, 2**21, 2**28 + 5, 2**35):
        assert fastpb.varint(n) == wrappers_pb2.UInt64Value(value=n).SerializeToString()[1:]
    assert all(fastpb.VT[i] == fastpb.varint(i) for i in range(len(fastpb.VT)))


@FEW
@given(name=names, target=names)
def test_scope_template_gives_protobufs_bytes(name: str, target: str) -> None:
    tpl = fastpb.compile_checked(scoped_routes.scope, 2)
    assert tpl is not None
    assert tpl.render(name.encode(), target.encode()) == scoped_routes.scope(name, target).SerializeToString()


@FEW
@given(name=names, target=st.sampled_from([scoped_routes.ACTIVATOR_RC, "model/x", "traffic/é"]))
def test_scopes_wire_gives_protobufs_bytes(name: str, target: str) -> None:
    targets = {r.NO_MODEL: scoped_routes.ACTIVATOR_RC, name: target}
    table = scoped_routes.scopes_wire(targets)
    assert list(table) == [scoped_routes.scope_name(n) for n in targets]
    for n, t in targets.items():
        assert _bytes(table.wire[scoped_routes.scope_name(n)]) == scoped_routes.scope(n, t).SerializeToString()
        assert table[scoped_routes.scope_name(n)] == scoped_routes.scope(n, t)


def test_an_empty_name_is_built_as_a_message() -> None:
    """proto3 leaves an empty string out of the wire format, so no template renders it."""
    tpl = fastpb.compile_checked(scoped_routes.scope, 2)
    assert tpl is not None and tpl.render(b"", b"activator") is None
    table = scoped_routes.scopes_wire({"": scoped_routes.ACTIVATOR_RC, "a": ""})
    assert isinstance(table.wire["scope/"], scoped_route_pb2.ScopedRouteConfiguration)
    assert isinstance(table.wire["scope/a"], scoped_route_pb2.ScopedRouteConfiguration)
    assert table.wire["scope/"].SerializeToString() == scoped_routes.scope("", scoped_routes.ACTIVATOR_RC).SerializeToString()


@FEW
@given(
    model=names,
    aliases=st.lists(names, max_size=3),
    pods=st.one_of(st.lists(st.sampled_from(["pod-0", "pod-1", "pod-2", "pod-9", "pod-10", "pod-100"]), min_size=1, max_size=6, unique=True),
                   st.lists(names, min_size=1, max_size=4, unique=True)),
    timeout=st.sampled_from([65.0, 1.0, 3600.0]),
)
def test_model_routes_wire_gives_protobufs_bytes(model: str, aliases: list[str], pods: list[str], timeout: float) -> None:
    """Any pod set (a single pod or a copy set, in any order), any number of names."""
    s = r.RoutingState(pods=PODS, loaded={model: pods}, aliases={a: model for a in aliases}, activator=ACT, cold_timeout_s=timeout)
    table = scoped_routes.model_routes_wire(s, s.loaded)
    got = table.wire[scoped_routes.model_rc_name(model)]
    assert isinstance(got, bytes)
    assert got == scoped_routes.model_routes(s, model).SerializeToString()
    assert table[scoped_routes.model_rc_name(model)] == scoped_routes.model_routes(s, model)


def test_one_template_per_number_of_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copy sets are many in a large pool (one per pair of pods in use): templates are not."""
    pods = {f"pod-{i}": r.Endpoint(f"10.0.0.{i}", 8008, 8033) for i in range(30)}
    sets = [list(c) for c in itertools.combinations(sorted(pods, reverse=True), 2)]  # 435 pairs, unsorted
    loaded = {f"m{i}": sets[i // 2] if i % 2 else [f"pod-{i % 30}"] for i in range(600)}
    s = r.RoutingState(pods=pods, loaded=loaded, aliases={f"a{i}": f"m{i}" for i in range(600)}, activator=ACT)
    compiled = []
    real = fastpb.compile_checked
    monkeypatch.setattr(fastpb, "compile_checked", lambda *a, **k: compiled.append(a[1]) or real(*a, **k))
    table = scoped_routes.model_routes_wire(s, s.loaded)
    assert len(clusters.copy_sets_of(s.loaded.values(), pods)) > 100 and len(compiled) == 2
    for m in s.loaded:
        assert table.wire[scoped_routes.model_rc_name(m)] == scoped_routes.model_routes(s, m).SerializeToString()


def test_templates_refuse_what_they_cannot_splice() -> None:
    """A string inside a packed Any (its length sits in a bytes field), or used for more than
    its bytes (its length in another field), gives no template: the caller builds messages."""
    def packed_any(name: str) -> route_pb2.RouteConfiguration:
        rc = route_pb2.RouteConfiguration(name="x")
        rc.typed_per_filter_config["f"].Pack(wrappers_pb2.StringValue(value=name))
        return rc

    def uses_length(name: str) -> route_pb2.RouteConfiguration:
        return route_pb2.RouteConfiguration(name=name, max_direct_response_body_size_bytes=wrappers_pb2.UInt32Value(value=len(name)))

    def map_key(name: str) -> route_pb2.RouteConfiguration:  # map entries come in no set order
        rc = route_pb2.RouteConfiguration(name="x")
        rc.typed_per_filter_config[name].type_url = "t"
        return rc

    assert fastpb.compile_checked(packed_any, 1) is None
    assert fastpb.compile_checked(map_key, 1) is None
    assert fastpb.compile_checked(uses_length, 1) is None
    with pytest.raises(fastpb.TemplateError):
        fastpb.Template.of(packed_any(fastpb.placeholder(0)), 1)


def test_without_templates_the_build_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _state()
    want = _digests(scoped.build_all(s, r.ListenerConfig(), wire=False))
    monkeypatch.setattr(fastpb, "compile_checked", lambda *a, **k: None)
    monkeypatch.setattr(scoped_routes, "_scope_templates", {})
    assert _digests(scoped.build_all(s, r.ListenerConfig())) == want


# -- whole builds


def _state(n: int = 60) -> r.RoutingState:
    """Registered cold ids, aliases of cold and loaded models, single copies and copy sets,
    several aliases per model, unicode and long names, an empty one, and traffic plans."""
    ids = [f"m{i}__isvc-{i:010x}" for i in range(n)] + ["模型__isvc-é", "y" * 300, ""]
    pods = sorted(PODS)
    loaded = {m: [pods[i % 4]] if i % 3 else [pods[i % 4], pods[(i + 1) % 4]] for i, m in enumerate(ids) if i % 2 == 0}
    aliases = {f"m{i}": m for i, m in enumerate(ids)} | {f"alt-{i}": m for i, m in enumerate(ids) if i % 5 == 0} | {"😀": ids[0]}
    traffic = {"m1": Plan(name="m1", branches=[Branch(((ids[0], 90), (ids[2], 10)))]), ids[4]: Plan(name=ids[4], branches=[Branch(((ids[4], 100),))])}
    return r.RoutingState(pods=PODS, loaded=loaded, aliases=aliases, activator=ACT, traffic=traffic, registered=set(ids))


def _digests(res: r.Resources) -> dict[str, dict[str, bytes]]:
    return {t: {n: pack(m, t)[1] for n, m in (getattr(items, "wire", None) or items).items()} for t, items in res.by_type.items()}


def test_full_build_is_byte_identical_to_the_protobuf_build() -> None:
    s = _state()
    fast, slow = scoped.build_all(s, r.ListenerConfig()), scoped.build_all(s, r.ListenerConfig(), wire=False)
    assert set(fast.by_type) == set(slow.by_type)
    for t in slow.by_type:
        assert list(fast.by_type[t]) == list(slow.by_type[t]), t  # same names, same order
        for n, m in slow.by_type[t].items():
            assert _bytes(getattr(fast.by_type[t], "wire", fast.by_type[t])[n]) == _bytes(m), (t, n)
    assert isinstance(fast.by_type[r.SCOPED_ROUTE_TYPE], fastpb.WireTable)
    wire = fast.by_type[r.SCOPED_ROUTE_TYPE].wire  # type: ignore[attr-defined]
    assert sum(isinstance(v, bytes) for v in wire.values()) == len(wire) - 1  # all but the empty name's


def test_the_cache_packs_serialized_resources_as_it_packs_messages() -> None:
    """Same bytes, same digests, same type versions; twice the same."""
    s = _state()
    caches = []
    for wire in (True, False, True):
        c = SnapshotCache()
        c.set("g", scoped.build_all(s, r.ListenerConfig(), wire=wire))
        caches.append(c.group("g").types)
    for t, snap in caches[1].items():
        for other in (caches[0], caches[2]):
            assert other[t].version == snap.version and other[t].digests == snap.digests, t
            for n, b in snap.resources.items():
                assert other[t].resources[n] == b and b.__class__ is bytes
                assert hashlib.blake2b(b, digest_size=16).digest() == snap.digests[n]


def test_pack_takes_bytes_and_patch_takes_a_wire_table() -> None:
    msg = scoped_routes.scope("m", "activator")
    b, d = pack(msg.SerializeToString(), r.SCOPED_ROUTE_TYPE)
    assert b == msg.SerializeToString() and (b, d) == pack(msg) == pack(any_pb2.Any(value=b))
    c = SnapshotCache()
    c.patch("g", r.SCOPED_ROUTE_TYPE, scoped_routes.scopes_wire({"m": "activator", "n": "model/n"}))
    c.patch("g", r.SCOPED_ROUTE_TYPE, {"scope/k": scoped_routes.scope("k", "activator")})
    other = SnapshotCache()
    other.set("g", r.Resources(by_type={r.SCOPED_ROUTE_TYPE: {f"scope/{n}": scoped_routes.scope(n, t) for n, t in
                                                              (("m", "activator"), ("n", "model/n"), ("k", "activator"))}}))
    assert c.group("g").types[r.SCOPED_ROUTE_TYPE].digests == other.group("g").types[r.SCOPED_ROUTE_TYPE].digests
    assert c.group("g").types[r.SCOPED_ROUTE_TYPE].version == other.group("g").types[r.SCOPED_ROUTE_TYPE].version


def test_a_patched_snapshot_equals_a_fresh_fast_build() -> None:
    """The source builds in full once, then patches with messages (diff_partial): the digests
    must meet, or every patch after a full build would look like a change."""
    s = _state()
    c = SnapshotCache()
    c.set("g", scoped.build_all(s, r.ListenerConfig()))
    idx = scoped.index(s)
    m, cold = "m12__isvc-000000000c", "m15__isvc-000000000f"  # neither named by a plan
    assert s.loaded[m] == ["pod-0", "pod-1"] and cold not in s.loaded
    s.loaded[m] = ["pod-3"]  # a move, off a copy set
    s.loaded[cold] = ["pod-0", "pod-2"]  # a load, onto a copy set no model used yet
    aliases = {a: x for a, x in s.aliases.items() if x in (m, cold)}
    assert not scoped.involves_traffic(idx, {m, cold}, {m, cold, *aliases})
    part = r.RoutingState(pods=PODS, loaded={x: s.loaded[x] for x in (m, cold)}, aliases=aliases, activator=ACT, registered={m, cold})
    patch = scoped.diff_partial(idx, part, {m, cold}, {m, cold, *aliases})
    assert patch.upserts[r.SCOPED_ROUTE_TYPE] and patch.upserts[r.ROUTE_TYPE] and patch.upserts[r.CLUSTER_TYPE]
    for t in (r.CLUSTER_TYPE, r.ENDPOINT_TYPE, r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE):
        c.patch("g", t, patch.upserts.get(t, {}), patch.removes.get(t, []))
    fresh = SnapshotCache()
    fresh.set("g", scoped.build_all(s, r.ListenerConfig()))
    for t in (r.SCOPED_ROUTE_TYPE, r.ROUTE_TYPE, r.CLUSTER_TYPE):
        assert c.group("g").types[t].digests == fresh.group("g").types[t].digests, t
        assert c.group("g").types[t].version == fresh.group("g").types[t].version, t


def test_wire_table_reads_as_a_mapping_of_messages() -> None:
    table = scoped_routes.scopes_wire({"a": "activator", "b": "model/b"})
    assert len(table) == 2 and "scope/a" in table and "scope/x" not in table and list(table) == ["scope/a", "scope/b"]
    assert table == {"scope/a": scoped_routes.scope("a", "activator"), "scope/b": scoped_routes.scope("b", "model/b")}
    assert {"scope/a": scoped_routes.scope("a", "activator"), "scope/b": scoped_routes.scope("b", "model/b")} == table
    assert table != {"scope/a": scoped_routes.scope("a", "activator")}
    assert table["scope/b"].route_configuration_name == "model/b"
    assert dict(table.items())["scope/a"].key.fragments[0].string_key == "a"
    table["scope/c"] = scoped_routes.scope("c", "activator")
    del table["scope/a"]
    assert list(table) == ["scope/b", "scope/c"] and table["scope/c"] == scoped_routes.scope("c", "activator")


@pytest.mark.parametrize("type_url", [r.SCOPED_ROUTE_TYPE, ""])
def test_responses_written_from_bytes_equal_the_built_ones(type_url: str) -> None:
    """fastpb's delta and SotW responses: the bytes protobuf gives for the same response, over
    empty, unicode and long names, versions and values (two-byte length prefixes, over 4 KiB)."""
    from envoy.service.discovery.v3 import discovery_pb2

    values = [b"", b"x", scoped_routes.scope("m", "activator").SerializeToString(), b"\x01" * 5000, b"\x02" * 200]
    names = ["", "scope/é", "n" * 300, "scope/m", "x" * 5000]
    versions = ["", "0123abcd" * 4, "v" * 200, "1", "é"]
    updated = list(zip(names, versions, values))
    for removed in ([], ["gone", "", "é" * 100]):
        for nonce, version in (("", ""), ("abc", "0123456789abcdef+partial")):
            want = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version, type_url=type_url, nonce=nonce, removed_resources=removed,
                resources=[discovery_pb2.Resource(name=n, version=v, resource=any_pb2.Any(type_url=type_url, value=b)) for n, v, b in updated],
            )
            assert fastpb.delta_response(version, type_url, nonce, updated, removed) == want.SerializeToString()
            assert fastpb.delta_response(version, type_url, nonce, [], removed) == discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=version, type_url=type_url, nonce=nonce, removed_resources=removed).SerializeToString()
        want_sotw = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=nonce,
                                                    resources=[any_pb2.Any(type_url=type_url, value=b) for b in values])
        assert fastpb.discovery_response(version, type_url, nonce, values) == want_sotw.SerializeToString()
        assert fastpb.discovery_response(version, type_url, nonce, []) == discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce).SerializeToString()


def test_the_full_build_renders_scopes_in_a_loop_as_scopes_wire_does() -> None:
    """scoped._scopes_table (Template.render_table): the same table, order and bytes as
    scopes_wire, cold and loaded names, the empty one and unicode and long ones among them."""
    targets = {"": "activator", "a": "activator", "é" * 300: "activator", "b": "model/b", "c" * 5000: "activator",
               "d": "traffic/d", "-": "activator"}
    fast, slow = scoped._scopes_table(targets), scoped_routes.scopes_wire(targets)
    assert list(fast) == list(slow)
    for n in slow:
        assert _bytes(fast.wire[n]) == _bytes(slow.wire[n]) == scoped_routes.scope(n[len("scope/"):], targets[n[len("scope/"):]]).SerializeToString(), n
    assert sum(isinstance(v, bytes) for v in fast.wire.values()) == len(targets) - 1  # the empty name is a message
