"""Issue 9: fuzz the REST body parsing (hypothesis, bounded). Whatever the bytes, the decoder
either returns a request or raises CodecError (a 400 with a message); nothing else escapes.

Kind: unit (pure), property-based.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshserve_loader.builtin import codec

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
DATATYPES = st.sampled_from(list(codec.DATATYPES) + ["", "FP99", "bytes"])
tensor = st.fixed_dictionaries(
    {"name": st.text(max_size=8), "datatype": DATATYPES, "shape": st.lists(st.integers(-2, 5), max_size=3)},
    optional={"data": json_values, "contents": st.dictionaries(st.sampled_from(["fp32_contents", "int64Contents", "bytes_contents", "bogus"]), json_values, max_size=2)},
)
request = st.fixed_dictionaries({"inputs": st.lists(tensor, max_size=3)}, optional={"id": json_values, "outputs": json_values})

BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode(body: bytes) -> None:
    try:
        codec.decode_json_request(body)
    except codec.CodecError as e:
        assert str(e)  # every rejection says something


@BOUNDED
@given(st.binary(max_size=300))
def test_arbitrary_bytes(body: bytes) -> None:
    _decode(body)


@BOUNDED
@given(json_values)
def test_arbitrary_json(doc: object) -> None:
    _decode(json.dumps(doc).encode())


@BOUNDED
@given(request)
def test_request_shaped_json(doc: dict) -> None:
    body = json.dumps(doc).encode()
    _decode(body)
    _decode(body[: len(body) // 2])  # truncated
