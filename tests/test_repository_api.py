"""Kind: unit (pure). The v2 repository extension's bodies, read as Triton's HTTP server reads
them (src/http_server.cc, HandleRepositoryIndex / HandleRepositoryControl): an empty body is
the defaults, anything else must be a JSON object, and what meshserve cannot honour is refused
by name. Before, every body was ignored: a load asking for a config override loaded the model
as registered and answered 200."""

from __future__ import annotations

import pytest

from meshserve_placement import repository_api as repo


def test_an_empty_body_is_the_defaults() -> None:
    assert repo.read_body(b"") == {} and repo.read_body(b" \n") == {}
    assert repo.index_ready_only({}) is False
    repo.check_load({})
    repo.check_unload({})


@pytest.mark.parametrize("raw, message", [
    (b"{", "failed to parse the request JSON buffer"),
    (b"[" * 100_000, "failed to parse the request JSON buffer"),
    (b"[1]", "must be a JSON object"),
])
def test_a_body_that_is_not_a_json_object_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(repo.RepositoryBodyError, match=message):
        repo.read_body(raw)


def test_index_ready_filter() -> None:
    assert repo.index_ready_only({"ready": True}) is True
    with pytest.raises(repo.RepositoryBodyError, match="'ready' must be a boolean"):
        repo.index_ready_only({"ready": "yes"})


@pytest.mark.parametrize("params, message", [
    ({"config": "{}"}, "parameter 'config' is not supported"),
    ({"file:1/model.onnx": "AAAA"}, "parameter 'file:1/model.onnx' is not supported"),
    ({"priority": "high"}, "unknown load parameter 'priority'"),
    ({"config": 5}, "parameter 'config' is not supported"),
])
def test_load_parameters_meshserve_cannot_honour_are_refused(params: dict, message: str) -> None:
    with pytest.raises(repo.RepositoryBodyError, match=message):
        repo.check_load({"parameters": params})


def test_unload_dependents_must_be_a_boolean() -> None:
    repo.check_unload({"parameters": {"unload_dependents": True}})
    with pytest.raises(repo.RepositoryBodyError, match="unload_dependents"):
        repo.check_unload({"parameters": {"unload_dependents": "true"}})
