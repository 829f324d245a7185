"""Kind: unit (pure, in-memory). Issue 18: the runtime undoes a request's Content-Encoding itself,
bounded, instead of aiohttp inflating it on the event loop."""

from __future__ import annotations

import gzip
import time
import zlib

import pytest

from meshserve_loader.builtin import codec
from meshserve_loader.builtin.http_api import BodyTooLarge, UnsupportedEncoding, decode_body


def test_codings_round_trip() -> None:
    body = b'{"inputs": []}' * 100
    assert decode_body(body, "") == decode_body(body, "identity") == body
    assert decode_body(gzip.compress(body), "gzip") == decode_body(gzip.compress(body), " GZIP ") == body
    assert decode_body(zlib.compress(body), "deflate") == body
    assert decode_body(gzip.compress(body[:700]) + gzip.compress(body[700:]), "gzip") == body  # two members


def test_bad_streams_are_codec_errors() -> None:
    with pytest.raises(codec.CodecError, match="not valid gzip"):
        decode_body(b'{"inputs": []}', "gzip")
    with pytest.raises(codec.CodecError, match="truncated gzip"):
        decode_body(gzip.compress(b"x" * 1000)[:-12], "gzip")
    with pytest.raises(UnsupportedEncoding, match="'br' is not supported"):
        decode_body(b"x", "br")
    with pytest.raises(UnsupportedEncoding):
        decode_body(gzip.compress(gzip.compress(b"x")), "gzip, gzip")


def test_a_bomb_stops_at_the_limit_quickly() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join([*(z.compress(bytes(1 << 20)) for _ in range(128)), z.flush()])  # 128 MiB in ~128 KB
    t0 = time.perf_counter()
    with pytest.raises(BodyTooLarge, match="more than the 64 MiB limit"):
        decode_body(bomb, "gzip")
    assert time.perf_counter() - t0 < 2.0  # ~0.1 s: only 64 MiB + 1 byte is ever inflated
    with pytest.raises(BodyTooLarge):
        decode_body(gzip.compress(bytes(1001)), "gzip", limit=1000)
    assert len(decode_body(gzip.compress(bytes(1000)), "gzip", limit=1000)) == 1000
