"""Protobuf wire bytes from templates, for resources built by the hundred thousand. Pure.

A full build of the scoped layout at 100,000 registered models is ~200,000 scopes and ~20,000
RouteConfigurations that differ from each other only in a few strings (a name, a model id).
Building each as protobuf messages in Python costs most of a full resync (docs/design/routing.md,
"Full build"). Here such a resource is built once with placeholder strings by the ordinary
builder, serialized, and compiled into a `Template`: the wire bytes with those strings left
open. Rendering splices the real strings in and recomputes every enclosing length prefix, so
the result is byte for byte what serializing the message built with those strings gives
(tests/test_xds_fastbuild.py checks this over many names, unicode and long ones included).

- Only string fields may hold a placeholder, whole or as part (`"scope/" + name`). A placeholder
  anywhere else (a bytes field, a packed Any, a map entry, whose order is not fixed, an unknown
  field) refuses to compile, and the caller builds messages.
- The render function is generated Python (one straight-line function per template: lengths
  from the strings' lengths, inner to outer, then one join). Its source holds variable names
  and indices only; the constant bytes are passed in, never written into it.
- proto3 leaves an empty string out of the wire format. A slot that is a whole string field
  therefore renders `None` when given b"", and the caller builds that one message normally.
- `compile_checked` renders the template once with sample strings and compares it with the
  builder's own output, so a builder that does more with a string than copy it (say, uses its
  length in another field) is caught when the template is made, not after.

`WireTable` holds a type's resources serialized; it reads as a mapping of messages (parsed on
access) and the snapshot cache packs its bytes without parsing them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Zero-padded, so that placeholders sort as their slots do (a builder may sort its strings).
_PH = "\x00\x7fslot{:04d}\x7f\x00"
_PH_RE = re.compile(rb"\x00\x7fslot(\d+)\x7f\x00")
_VT_MAX = 1 << 12


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# Length prefixes below 4 KiB come from this table; longer ones are encoded.
VT = [varint(i) for i in range(_VT_MAX)]
_VTL = [len(v) for v in VT]


def placeholder(i: int) -> str:
    """The string to build a template's message with where slot `i` goes."""
    return _PH.format(i)


class TemplateError(ValueError):
    pass


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data):
            raise TemplateError("truncated varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


# A parsed template: a list of parts, each constant bytes, or
# ("str", tag_bytes, [bytes | slot int, ...]) for a string field holding slots, or
# ("msg", tag_bytes, [parts]) for a sub-message holding slots.
_Part = Any


def _parse(data: bytes, desc: Descriptor) -> list[_Part]:
    parts: list[_Part] = []
    i = 0
    while i < len(data):
        start = i
        tag, i = _read_varint(data, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            _, i = _read_varint(data, i)
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        elif wt == 2:
            ln, j = _read_varint(data, i)
            payload = data[j:j + ln]
            i = j + ln
            if _PH_RE.search(payload):
                fd = desc.fields_by_number.get(num)
                tag_bytes = data[start:_tag_end(data, start)]
                if fd is None:
                    raise TemplateError(f"slot in unknown field {num} of {desc.full_name}")
                if fd.type == FieldDescriptor.TYPE_MESSAGE:
                    if fd.message_type.full_name == "google.protobuf.Any":
                        raise TemplateError(f"slot inside a packed Any ({desc.full_name}.{fd.name})")
                    if fd.message_type.GetOptions().map_entry:  # entries may come in any order
                        raise TemplateError(f"slot in a map ({desc.full_name}.{fd.name})")
                    parts.append(("msg", tag_bytes, _parse(payload, fd.message_type)))
                elif fd.type == FieldDescriptor.TYPE_STRING:
                    parts.append(("str", tag_bytes, _split(payload)))
                else:
                    raise TemplateError(f"slot in non-string field {desc.full_name}.{fd.name}")
                continue
        else:
            raise TemplateError(f"wire type {wt} not supported")
        if i > len(data):
            raise TemplateError("truncated field")
        if parts and isinstance(parts[-1], bytes):
            parts[-1] += data[start:i]
        else:
            parts.append(data[start:i])
    return parts


def _tag_end(data: bytes, start: int) -> int:
    _, i = _read_varint(data, start)
    return i


def _split(payload: bytes) -> list[bytes | int]:
    out: list[bytes | int] = []
    pos = 0
    for m in _PH_RE.finditer(payload):
        if m.start() > pos:
            out.append(payload[pos:m.start()])
        out.append(int(m.group(1)))
        pos = m.end()
    if pos < len(payload):
        out.append(payload[pos:])
    return out


class Template:
    """The wire bytes of one message with some strings left open, rendered by a function
    generated for it (straight-line joins, no interpretation per part).

    A one-slot template also has `render_table(items, out, prefix, only, other)`: for each
    (key, t) of `items`, `out[prefix + key]` is the template rendered with the key where
    `t == only` (and the key is not empty), else `other(key, t)`; in `items`' order. The
    same body in one loop: at 2,000,000 scopes a call each was a fifth of the build."""

    def __init__(self, data: bytes, desc: Descriptor, slots: int):
        self.slots = slots
        self.parts = _parse(data, desc)
        self.render: Callable[..., bytes | None] = self._generate()

    @classmethod
    def of(cls, msg: Any, slots: int) -> "Template":
        return cls(msg.SerializeToString(), msg.DESCRIPTOR, slots)

    def _generate(self) -> Callable[..., bytes | None]:
        """Source for `render(s0, s1, ...)`: lengths computed inner to outer from the slots'
        lengths, then one join of constants, length prefixes and slots in wire order."""
        lines: list[str] = []
        whole: set[int] = set()
        used: set[int] = set()
        counter = [0]
        lengths: dict[str, tuple[str, str]] = {}  # length expression -> its variable, its varint's

        def gen(parts: list[_Part]) -> tuple[list[bytes | str], int, list[str]]:
            """Wire items (constant bytes or a variable's name), and the length: a constant
            plus variables."""
            items: list[bytes | str] = []
            const, terms = 0, []
            for p in parts:
                if isinstance(p, bytes):
                    items.append(p)
                    const += len(p)
                    continue
                kind, tag, sub = p
                if kind == "str":
                    inner: list[bytes | str] = []
                    ic, it = 0, []
                    for x in sub:
                        if isinstance(x, int):
                            if x >= self.slots:
                                raise TemplateError(f"slot {x} out of range")
                            used.add(x)
                            inner.append(f"s{x}")
                            it.append(f"L{x}")
                        else:
                            inner.append(x)
                            ic += len(x)
                    if len(sub) == 1 and isinstance(sub[0], int):
                        whole.add(sub[0])
                else:
                    inner, ic, it = gen(sub)
                expr = " + ".join([str(ic), *it] if ic else it)
                if expr not in lengths:  # the same length (the same field of the same slots) once
                    counter[0] += 1
                    n, v = (expr, f"v{counter[0]}") if expr.isidentifier() else (f"n{counter[0]}", f"v{counter[0]}")
                    if n != expr:
                        lines.append(f"{n} = {expr}")
                    lines.append(f"{v} = VT[{n}] if {n} < {_VT_MAX} else VB({n})")
                    lengths[expr] = (n, v)
                n, v = lengths[expr]
                items += [tag, v, *inner]
                const += len(tag)
                terms += [f"len({v})", n]
            return items, const, terms

        top, _, _ = gen(self.parts)
        consts: list[bytes] = []
        flat: list[str] = []
        for x in top:  # adjacent constants merged
            if isinstance(x, bytes):
                if flat and flat[-1].startswith("K["):
                    consts[-1] += x
                else:
                    consts.append(x)
                    flat.append(f"K[{len(consts) - 1}]")
            else:
                flat.append(x)
        src = [f"def render({', '.join(f's{i}' for i in range(self.slots))}):"]
        if whole:
            # proto3 omits an empty string: the caller builds that message normally.
            src.append(f"    if {' or '.join(f'not s{i}' for i in sorted(whole))}: return None")
        src += [f"    L{i} = len(s{i})" for i in sorted(used)]
        src += [f"    {line}" for line in lines]
        src.append(f"    return b''.join(({', '.join(flat)},))" if flat else "    return b''")
        self.source = "\n".join(src)
        ns: dict[str, Any] = {"K": tuple(consts), "VT": VT, "VB": varint}
        exec(self.source, ns)  # generated from the template's structure: names and indices, no data
        if self.slots == 1:
            # The same body in a loop over a table (`render_table`): no call per resource.
            body = [line for line in src[1:] if not line.lstrip().startswith("if ")]
            table = ["def render_table(items, out, prefix, only, other):",
                     "    for k, t in items:",
                     "        if t != only or not k:",
                     "            out[prefix + k] = other(k, t)",
                     "            continue",
                     "        s0 = k.encode()"]
            table += [f"    {line}" for line in body[:-1]]
            table.append("        out[prefix + k] = " + body[-1].strip()[len("return "):])
            self.table_source = "\n".join(table)
            exec(self.table_source, ns)  # as above: names and indices only
            self.render_table = ns["render_table"]
        return ns["render"]


def compile_checked(build: Callable[..., Any], slots: int, samples: tuple[str, ...] | None = None) -> Template | None:
    """A template for `build(*strings)` (a message), or None when the builder's output does not
    follow its strings the way a template can. Checked against a real build with samples.

    Placeholders and the default samples sort in slot order, so a builder that sorts some of
    its strings (pods in a cluster name) is templated for strings given in sorted order."""
    try:
        t = Template.of(build(*(placeholder(i) for i in range(slots))), slots)
        # Sorted as the slots are, of lengths that take in one- and two-byte length prefixes.
        samples = samples or tuple(f"s{i:04d}-é{'x' * (i * 37 % 200)}" for i in range(slots))
        want = build(*samples).SerializeToString()
    except Exception:  # TemplateError, or a builder that refuses these strings: build normally
        return None
    if t.render(*(s.encode() for s in samples)) != want:
        return None
    return t


class WireTable(MutableMapping):
    """name -> message for one resource type, holding each resource serialized (or, for a
    few, as a message). Reading a serialized one parses it (a fresh copy each time: change it
    and store it back); `SnapshotCache` packs the bytes as they are (`wire`)."""

    __slots__ = ("type_url", "cls", "wire")

    def __init__(self, type_url: str, cls: Any, wire: dict[str, Any] | None = None):
        self.type_url = type_url
        self.cls = cls
        self.wire: dict[str, Any] = {} if wire is None else wire

    def __getitem__(self, name: str) -> Any:
        v = self.wire[name]
        return self.cls.FromString(v) if v.__class__ is bytes else v

    def __setitem__(self, name: str, msg: Any) -> None:
        self.wire[name] = msg

    def __delitem__(self, name: str) -> None:
        del self.wire[name]

    def __contains__(self, name: object) -> bool:
        return name in self.wire

    def __iter__(self) -> Iterator[str]:
        return iter(self.wire)

    def __len__(self) -> int:
        return len(self.wire)

    def __repr__(self) -> str:
        return f"WireTable({self.type_url.rsplit('.', 1)[-1]}, {len(self.wire)} resources)"


# Discovery responses written from the cache's bytes (cache.py keeps each resource serialized):
# the same bytes as the protobuf-built response (tests/test_xds_fastbuild.py compares them), at
# a join per resource instead of an Any and a Resource message each, ~2,000,000 of them in the
# first scoped-route response at a million registered models. Field numbers from
# envoy/service/discovery/v3/discovery.proto, written in ascending order as protobuf does.


def _len(n: int) -> bytes:
    return VT[n] if n < _VT_MAX else varint(n)


def _string(tag: bytes, s: str) -> bytes:
    """A string field, left out when empty (proto3)."""
    b = s.encode()
    return tag + _len(len(b)) + b if b else b""


def _any_head(type_url: str) -> bytes:
    """An Any's type_url field: what every resource of a type starts with."""
    return _string(b"\x0a", type_url)


def discovery_response(version_info: str, type_url: str, nonce: str, values: list[bytes]) -> bytes:
    """`DiscoveryResponse(version_info, resources=[Any(type_url, value) ...], type_url, nonce)`
    serialized, for resources given as their serialized messages (`values`)."""
    head = _any_head(type_url)
    hl = len(head)
    out = [_string(b"\x0a", version_info)]
    add = out.extend
    for v in values:
        lv = len(v)
        if lv:
            lvb = VT[lv] if lv < _VT_MAX else varint(lv)
            n = hl + 1 + len(lvb) + lv
            add((b"\x12", VT[n] if n < _VT_MAX else varint(n), head, b"\x12", lvb, v))
        else:  # an empty value is left out of the Any
            add((b"\x12", _len(hl), head))
    out += (_string(b"\x22", type_url), _string(b"\x2a", nonce))
    return b"".join(out)


def delta_response(system_version_info: str, type_url: str, nonce: str, updated: list[tuple[str, str, bytes]], removed: list[str]) -> bytes:
    """`DeltaDiscoveryResponse(system_version_info, resources=[Resource(name, version,
    resource=Any(type_url, value)) ...], type_url, nonce, removed_resources)` serialized, for
    `updated` as (name, version, serialized message)."""
    head = _any_head(type_url)
    hl = len(head)
    out = [_string(b"\x0a", system_version_info)]
    add = out.extend
    hl1 = hl + 1
    for name, version, v in updated:
        vb, nb = version.encode(), name.encode()
        lver, lname, lv = len(vb), len(nb), len(v)
        if lver and lname and lv and lver < _VT_MAX and lname < _VT_MAX and lv < _VT_MAX:
            # The usual resource, in one step: every field present, short length prefixes.
            lvb = VT[lv]
            na = hl1 + _VTL[lv] + lv
            nab = VT[na] if na < _VT_MAX else varint(na)
            nr = 3 + _VTL[lver] + lver + len(nab) + na + _VTL[lname] + lname
            add((b"\x12", VT[nr] if nr < _VT_MAX else varint(nr), b"\x0a", VT[lver], vb, b"\x12", nab, head, b"\x12", lvb, v,
                 b"\x1a", VT[lname], nb))
            continue
        if lv:
            lvb = VT[lv] if lv < _VT_MAX else varint(lv)
            na = hl + 1 + len(lvb) + lv
            any_parts: tuple[bytes, ...] = (head, b"\x12", lvb, v)
        else:
            na, any_parts = hl, (head,)
        nab = VT[na] if na < _VT_MAX else varint(na)
        # Resource: version (1), resource (2: a message set, so present even if empty), name (3)
        ver = (b"\x0a", _len(lver), vb) if lver else ()
        nm = (b"\x1a", _len(lname), nb) if lname else ()
        nr = (1 + len(_len(lver)) + lver if lver else 0) + 1 + len(nab) + na + (1 + len(_len(lname)) + lname if lname else 0)
        add((b"\x12", VT[nr] if nr < _VT_MAX else varint(nr), *ver, b"\x12", nab, *any_parts, *nm))
    out += (_string(b"\x22", type_url), _string(b"\x2a", nonce))
    out += [_string(b"\x32", n) or b"\x32\x00" for n in removed]
    return b"".join(out)
