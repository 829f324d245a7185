"""Protobuf's wire format, the two pieces needed to pass messages through without parsing them:
a length-delimited field appended to (or wrapped around) bytes already serialized. A tensor of
any size is then copied once, never decoded and encoded again."""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    """Field `field` (wire type 2) holding `payload`: a string, bytes or an embedded message."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload
