"""moto's S3 server, serving ranged GETs in time proportional to the range.

Stock moto (5.x) answers `Range: bytes=a-b` by reading the whole object into memory and slicing
it. A 1 GiB object fetched as 128 ranges of 8 MiB, 10 at a time, then reads 128 GiB and holds up
to 10 GiB at once: the benchmark would measure moto's copying and could run the machine out of
memory, instead of comparing the clients. This runs moto unchanged except that a GET with one
closed byte range reads just that range from the object's buffer; every other request (and all
of the S3 protocol: auth, headers, errors) is moto's own.

    python -m bench.moto_ranges -H 127.0.0.1 -p PORT      # moto.server's arguments
"""

from __future__ import annotations

import re
import threading

from moto.s3.models import FakeKey
from moto.s3.responses import S3Response
from moto.server import main

_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
_lazy = threading.local()  # set while our get_object runs: FakeKey.value hands back a window
_value = FakeKey.value
_get_object = S3Response.get_object


class _Window:
    """Stands in for an object's bytes: its length, and a slice read from the buffer alone."""

    def __init__(self, key: FakeKey):
        self.key = key

    def __len__(self) -> int:
        return int(self.key.size)

    def read(self, begin: int, end: int) -> bytes:
        with self.key.lock:
            self.key._value_buffer.seek(begin)
            return self.key._value_buffer.read(end - begin + 1)


def _value_or_window(key: FakeKey) -> object:
    return _Window(key) if getattr(_lazy, "on", False) else _value.fget(key)  # type: ignore[attr-defined]


def get_object(self: S3Response) -> object:
    m = _RANGE.fullmatch(self.headers.get("range", "") or "")
    if not m or self._get_int_param("partNumber"):
        return _get_object(self)
    _lazy.on = True
    try:
        status, headers, body = _get_object(self)
    finally:
        _lazy.on = False
    if status != 200 or not isinstance(body, _Window):
        return status, headers, body
    size = len(body)
    begin, end = int(m[1]), min(int(m[2]), size - 1)
    if begin > end:
        return _get_object(self)  # unsatisfiable or odd: moto's own answer
    for h in [h for h in headers if h.startswith("x-amz-checksum-")]:
        del headers[h]  # a range has no whole-object checksum (as moto does)
    content = body.read(begin, end)
    headers["content-range"] = f"bytes {begin}-{end}/{size}"
    headers["content-length"] = str(len(content))
    return 206, headers, content


FakeKey.value = property(_value_or_window, _value.fset)  # type: ignore[method-assign,assignment]
S3Response.get_object = get_object  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
