"""Encode and decode whole FUSE messages, driven by the opcode table.

Both directions for both roles: a server decodes requests and encodes replies, a client encodes
requests and decodes replies.  Decoding peer bytes raises ``ProtocolError`` and nothing else:
lengths are checked before every unpack (the fuzz invariant, SECURITY.md B6 #7).

Two paths produce the same result (the differential tests check it on every example):

- the *careful* path (``_decode_generic``, ``_encode_reply_generic``) walks the table row part
  by part, handles every compat size and extension, and names what is wrong;
- the *fast* path is generated at first use per (opcode, minor) from the same table and schemas:
  one ``struct.Struct`` each for the in_header and the fixed arguments (one combined struct
  sliced in two measured slower), one for out_header + every reply struct (packed in one call,
  so the gather list is a single ``bytes``), the exact sizes precomputed, names split with
  ``bytes.find``/``in``, results built with ``tuple.__new__``.  It handles only the regular shape (no extensions, exact lengths) and
  hands anything else to the careful path, so it never has to produce an error itself.
  Measured by ``benchmarks/codec.py`` against hand-written ``struct`` code.
"""

from __future__ import annotations

import errno as E
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from ..errors import LocalProtocolError, ProtocolError
from . import constants as C
from . import structs as S
from .constants import InitFlags, Opcode
from .extensions import Extension, decode_extensions, encode_extensions
from .opcodes import BY_NUMBER, DATA, OPCODES, XATTR, OpSpec, reply_struct_size
from .schema import (
    Codec,
    codec,
    field_types,
    flat_build_expr,
    struct_format,
    struct_format_of,
)

Buffer = bytes | bytearray | memoryview

_IN = codec(S.InHeader)
_OUT = codec(S.OutHeader)
_IN_SIZE = _IN.size
_OUT_SIZE = _OUT.size
_in_unpack = _IN.unpack
_out_pack = struct.Struct(_OUT.format).pack
_EMPTY = memoryview(b"")
_hdr_unpack = struct.Struct(_IN.format).unpack_from
_DEFAULT_MINOR = C.KERNEL_MINOR_VERSION
_INIT_VERSION = struct.Struct("<II").unpack_from
_SETXATTR_EXT = int(InitFlags.SETXATTR_EXT)
_new = tuple.__new__


class Request(NamedTuple):
    """A decoded request."""

    header: S.InHeader
    spec: OpSpec
    """The opcode's table row (``spec.opcode`` is the ``Opcode``)."""
    arg: Any
    """The fixed struct after the header (``GetattrIn``, ``WriteIn``, …) or None."""
    names: tuple[bytes, ...] = ()
    """NUL-terminated names, without their NUL."""
    data: memoryview = _EMPTY
    """Trailing bytes: WRITE data, SETXATTR value, IOCTL input, NOTIFY_REPLY data."""
    items: tuple[Any, ...] = ()
    """BATCH_FORGET ``ForgetOne`` entries, REMOVEMAPPING ``RemoveMappingOne`` entries."""
    ext: tuple[Extension, ...] = ()
    """Request extensions (security context, supplementary groups)."""

    @property
    def opcode(self) -> Opcode:
        """The request's ``Opcode``."""
        return self.spec.opcode

    @property
    def unique(self) -> int:
        """``in_header.unique``."""
        return self.header.unique

    @property
    def nodeid(self) -> int:
        """``in_header.nodeid``."""
        return self.header.nodeid


class Reply(NamedTuple):
    """A decoded reply: its header, then either an ``error`` or the body parts."""

    header: S.OutHeader
    parts: tuple[Any, ...] = ()
    """Decoded parts in the order of the table's reply row (structs and/or ``bytes``)."""

    @property
    def error(self) -> int:
        """The errno (positive) or 0."""
        return -self.header.error

    @property
    def unique(self) -> int:
        """``out_header.unique``."""
        return self.header.unique

    @property
    def value(self) -> Any:
        """The single part of a one-part reply (EntryOut, AttrOut, data…), None if empty."""
        if not self.parts:
            return None
        return self.parts[0] if len(self.parts) == 1 else self.parts


def _unpack_prefix(c: Codec, view: memoryview, offset: int, size: int) -> Any:
    """Unpack a struct of which only ``size`` leading bytes are on the wire (compat sizes)."""
    if size == c.size:
        return c.unpack(view, offset)
    padded = bytes(view[offset:offset + size]) + bytes(c.size - size)
    return c.unpack(padded)


def init_in_size(major: int, minor: int) -> int:
    """Bytes of ``fuse_init_in`` a kernel speaking ``major.minor`` sends (SPEC.md 1.4)."""
    if major < C.KERNEL_VERSION or (major == C.KERNEL_VERSION and minor < 6):
        return 8
    if major == C.KERNEL_VERSION and minor < 36:
        return C.COMPAT_INIT_IN_SIZE
    return S.SIZES[S.InitIn]


# --------------------------------------------------------------------------------------------
# Requests: decoding


def decode_request(buf: Buffer, *, minor: int = C.KERNEL_MINOR_VERSION,
                   flags: int = 0) -> Request:
    """Decode one request (in_header + arguments) as the kernel sends it at ``minor``.

    ``flags`` are the negotiated INIT flags (they decide the SETXATTR struct size; pass an
    ``int`` on hot paths, ``IntFlag`` arithmetic is slow).  INIT itself is sized by the version
    in its own body.  Raises ``ProtocolError`` with an ``errno`` to answer (ENOSYS for an
    unknown opcode, EINVAL or EIO for a malformed body) on anything malformed, and nothing else.
    The result's ``data`` is a view into ``buf``: copy it if ``buf`` is reused.
    """
    try:
        h = _hdr_unpack(buf)
        fast = (_FAST if minor == _DEFAULT_MINOR and not flags & _SETXATTR_EXT
                else _fast_table(minor, flags)).get(h[1])
        if fast is not None:
            req: Request | None = fast(buf, h)
            if req is not None:
                return req
    except struct.error:
        pass  # shorter than what the fast path unpacks: the careful path says what is wrong
    return _decode_generic(buf, minor, flags)


def decoder_for(minor: int = C.KERNEL_MINOR_VERSION,
                flags: int = 0) -> Callable[[Buffer], Request]:
    """``decode_request`` with the version fixed once (for a session's hot loop)."""
    # Measured (pinned, CPU time, memoryview GETATTR, best of 21 x 200k calls): this closure
    # 838-866 ns; with ``get(op, _no_fast)`` instead of the None test 862-863 ns, plus the
    # names bound as default arguments 875-885 ns (3.11 caches globals): no gain, kept simple.
    # A table indexed by ``buf[4]`` whose entries unpack the header themselves measured 904 ns
    # against 887 ns for this shape, and one combined in_header + getattr_in ``unpack`` sliced
    # into the two NamedTuples 821 ns against 674 ns for two ``unpack_from`` (slices copy).
    flags = int(flags)
    get = _fast_table(minor, flags).get

    def decode(buf: Buffer) -> Request:
        try:
            h = _hdr_unpack(buf)
            fast = get(h[1])
            if fast is not None:
                req: Request | None = fast(buf, h)
                if req is not None:
                    return req
        except struct.error:
            pass
        return _decode_generic(buf, minor, flags)

    decode.__doc__ = f"decode_request(buf, minor={minor}, flags={flags:#x})"
    return decode


def _decode_generic(buf: Buffer, minor: int, flags: int) -> Request:
    """The careful path: every compat size and extension, and a precise ProtocolError."""
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.format != "B" or view.itemsize != 1:
        view = view.cast("B")
    n = len(view)
    if n < _IN_SIZE:
        raise ProtocolError(f"request of {n} bytes is shorter than in_header", field="len",
                            offset=0)
    header = _in_unpack(view)
    length = header.len
    if length < _IN_SIZE or length > n:
        raise ProtocolError(f"in_header.len {length} does not fit the {n} bytes received",
                            opcode=header.opcode, field="len", offset=0)
    spec = BY_NUMBER.get(header.opcode)
    if spec is None:
        raise ProtocolError(f"unknown opcode {header.opcode}", opcode=header.opcode,
                            field="opcode", offset=4, errno=E.ENOSYS)
    end = length
    ext: tuple[Extension, ...] = ()
    if header.total_extlen:
        extlen = header.total_extlen * 8
        if extlen > end - _IN_SIZE:
            raise ProtocolError("total_extlen past the request", opcode=spec.opcode,
                                field="total_extlen", offset=36, errno=E.EINVAL)
        end -= extlen
        ext = decode_extensions(view[end:length])
    pos = _IN_SIZE
    arg: Any = None
    lenient_tail = False
    if spec.request is not None:
        if spec.opcode is Opcode.INIT:
            if end - pos < 8:
                raise ProtocolError(f"INIT arguments truncated: {end - pos} bytes",
                                    opcode=spec.opcode, field="InitIn", offset=pos,
                                    errno=E.EINVAL)
            major, kminor = _INIT_VERSION(view, pos)
            size = init_in_size(major, kminor)
            if major > C.KERNEL_VERSION:
                # Header comment on version negotiation: a newer major's INIT is answered with
                # our major and its body otherwise ignored, so take what is there.
                size = min(size, end - pos)
                lenient_tail = True
        else:
            size = spec.request_size(minor, flags)
        if size:
            if end - pos < size:
                raise ProtocolError(f"{spec.name} arguments truncated: {end - pos} of {size} bytes",
                                    opcode=spec.opcode, field=spec.request.__name__,
                                    offset=pos, errno=E.EINVAL)
            arg = _unpack_prefix(codec(spec.request), view, pos, size)
            pos += size
    names: tuple[bytes, ...] = ()
    if spec.names:
        found = []
        rest = bytes(view[pos:end])
        at = 0
        for i in range(spec.names):
            nul = rest.find(0, at)
            if nul < 0:
                raise ProtocolError(f"{spec.name} name {i} has no NUL terminator",
                                    opcode=spec.opcode, field="name", offset=pos + at,
                                    errno=E.EINVAL)
            found.append(rest[at:nul])
            at = nul + 1
        pos += at
        names = tuple(found)
    data = _EMPTY
    items: tuple[Any, ...] = ()
    if spec.data:
        data = view[pos:end]
        if spec.data_size_field is not None and arg is not None:
            want = getattr(arg, spec.data_size_field)
            if want != len(data):
                raise ProtocolError(f"{spec.name} {spec.data_size_field}={want} but "
                                    f"{len(data)} data bytes follow", opcode=spec.opcode,
                                    field=spec.data_size_field, offset=pos, errno=E.EINVAL)
    elif spec.items is not None:
        item = codec(spec.items)
        count = arg.count
        if count * item.size != end - pos:
            raise ProtocolError(f"{spec.name} count={count} but {end - pos} bytes of entries",
                                opcode=spec.opcode, field="count", offset=pos, errno=E.EINVAL)
        unpack = item.unpack
        items = tuple(unpack(view, pos + i * item.size) for i in range(count))
    elif pos != end and not lenient_tail:
        # The kernel sends exactly the arguments (fs/fuse/dev.c copies in_args back to back);
        # anything more is a hostile or confused peer, not something to ignore silently.
        raise ProtocolError(f"{spec.name} has {end - pos} unexpected trailing bytes",
                            opcode=spec.opcode, field="len", offset=pos, errno=E.EINVAL)
    return Request(header, spec, arg, names, data, items, ext)


_DECODERS: dict[tuple[int, bool], dict[int, Callable[..., Any]]] = {}


def _fast_table(minor: int, flags: int) -> dict[int, Callable[..., Any]]:
    """The fast decoders at ``minor`` (and SETXATTR_EXT from ``flags``), keyed by opcode."""
    key = (minor, bool(flags & _SETXATTR_EXT))
    found = _DECODERS.get(key)
    if found is None:
        found = {}
        for number, spec in BY_NUMBER.items():
            fast = _make_decoder(spec, minor, _SETXATTR_EXT if key[1] else 0)
            if fast is not None:
                found[number] = fast
        _DECODERS[key] = found
    return found


def _make_decoder(spec: OpSpec, minor: int, flags: int) -> Callable[..., Any] | None:
    """Generate the fast decoder of one opcode at one version (None: careful path only)."""
    if spec.opcode is Opcode.INIT:
        return None  # sized by its own body; once per connection
    size = spec.request_size(minor, flags)
    if spec.request is not None and size not in (0, codec(spec.request).size):
        return None  # a compat prefix (minor < 12 …): rare, the careful path pads it
    env: dict[str, Any] = {"_spec": spec, "_EMPTY": _EMPTY, "_mv": memoryview, "_new": _new,
                           "_Request": Request, "_InHeader": S.InHeader, "_bytes": bytes}
    fixed = _IN_SIZE + size
    arg = "None"
    lines = ["def decode(buf, h):", " length = h[0]"]
    if size:
        assert spec.request is not None
        env["_unpack"] = struct.Struct("<" + struct_format(spec.request)).unpack_from
        # unpack_from raises struct.error when buf is shorter: decode_request catches it.
        arg = flat_build_expr(spec.request, "a", 0, env, whole=True)
    header = "_new(_InHeader, h)"
    names = "()"
    data = "_EMPTY"
    items = "()"
    size_check = None
    if spec.data_size_field is not None and size:
        assert spec.request is not None
        size_check = f"a[{spec.request._fields.index(spec.data_size_field)}]"
    variable = bool(spec.names or spec.data or spec.items is not None)
    # Extensions and lengths that are not exact go to the careful path.
    if variable:
        # Each name is at least its NUL: shorter goes to the careful path (which says why).
        lines += [f" if h[7] or length < {fixed + spec.names} or length > len(buf):",
                  "  return None"]
    else:
        lines += [f" if h[7] or length != {fixed}:", "  return None"]
    if size:
        lines += [f" a = _unpack(buf, {_IN_SIZE})"]
    if spec.names == 1 and not spec.data:
        # The one name ends at the last byte (anything after its NUL is an error): the name is
        # the bytes before it, checked with ``in`` (memchr).  Sliced out of ``buf`` directly:
        # no copy of the whole message when ``buf`` is a memoryview or a bytearray, and the
        # name is ``bytes`` whatever ``buf`` is, as on the careful path (it was a bytearray
        # for a bytearray ``buf``).  Measured with ``decoder_for()`` (pinned, CPU time, best of
        # 15 x 100k): bytes 1129 -> 898 ns, memoryview 1357 -> 1156 ns against ``find``.
        lines += [f" n = buf[{fixed}:length - 1]",
                  " if type(n) is not _bytes:",
                  "  n = _bytes(n)",
                  " if buf[length - 1] != 0 or 0 in n:",
                  "  return None"]
        names = "(n,)"
    elif spec.names:
        # bytes has find(sub, start, end): no copy of the tail of a bytes message; anything
        # else (a slice of a reused read buffer) is copied once, so names are always bytes.
        lines += [" b = buf if type(buf) is _bytes else _bytes(buf[:length])",
                  f" i = b.find(0, {fixed}, length)",
                  " if i < 0:",
                  "  return None"]
        if spec.names == 2:
            lines += [" j = b.find(0, i + 1, length)",
                      " if j < 0:",
                      "  return None"]
            last = "j"
            names = f"(b[{fixed}:i], b[i + 1:j])"
        else:
            last = "i"
            names = f"(b[{fixed}:i],)"
        if spec.data:
            lines += [f" data = (buf if type(buf) is _mv else _mv(buf))[{last} + 1:length]"]
            data = "data"
            if size_check:
                lines += [f" if {size_check} != len(data):", "  return None"]
        else:
            lines += [f" if {last} != length - 1:", "  return None"]
    elif spec.data:
        lines += [" view = buf if type(buf) is _mv else _mv(buf)",
                  f" data = view[{fixed}:length]"]
        data = "data"
        if size_check:
            lines += [f" if {size_check} != length - {fixed}:", "  return None"]
    elif spec.items is not None:
        assert spec.request is not None
        item = codec(spec.items)
        env["_iter_items"] = struct.Struct(item.format).iter_unpack
        env["_Item"] = spec.items
        count = f"a[{spec.request._fields.index('count')}]"
        lines += [f" if {count} * {item.size} != length - {fixed}:",
                  "  return None",
                  " view = buf if type(buf) is _mv else _mv(buf)",
                  f" items = tuple([_new(_Item, x) for x in _iter_items(view[{fixed}:length])])"]
        items = "items"
    lines.append(f" return _new(_Request, ({header}, _spec, {arg}, {names}, {data}, {items}, ()))")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<decode {spec.name} 7.{minor}>", "exec"), env)
    result: Callable[..., Any] = env["decode"]
    return result


_FAST = _fast_table(C.KERNEL_MINOR_VERSION, 0)


# --------------------------------------------------------------------------------------------
# Requests: encoding (the client's side)


def encode_request(opcode: Opcode, unique: int, nodeid: int = 0, arg: Any = None,
                   names: Sequence[bytes] = (), data: Buffer = b"",
                   items: Iterable[Any] = (), *, uid: int = 0, gid: int = 0, pid: int = 0,
                   ext: Sequence[Extension] = (), minor: int = C.KERNEL_MINOR_VERSION,
                   flags: int = 0) -> bytes:
    """Build one request as the kernel would at ``minor`` (the client's encoder)."""
    return b"".join(encode_request_parts(opcode, unique, nodeid, arg, names, data, items,
                                         uid=uid, gid=gid, pid=pid, ext=ext, minor=minor,
                                         flags=flags))


def encode_request_parts(opcode: Opcode, unique: int, nodeid: int = 0, arg: Any = None,
                         names: Sequence[bytes] = (), data: Buffer = b"",
                         items: Iterable[Any] = (), *, uid: int = 0, gid: int = 0, pid: int = 0,
                         ext: Sequence[Extension] = (), minor: int = C.KERNEL_MINOR_VERSION,
                         flags: int = 0) -> list[Buffer]:
    """Like ``encode_request`` but as a gather list, so WRITE data is never copied.

    Size fields that describe trailing bytes (``WriteIn.size``, ``SetxattrIn.size``,
    ``IoctlIn.in_size``, ``BatchForgetIn.count`` …) must already agree with ``data``/``items``:
    a mismatch is refused rather than silently fixed.  INIT is sized by ``arg``'s own version.
    """
    spec = OPCODES.get(opcode)
    if spec is None:
        raise LocalProtocolError(f"{opcode!r} is not a request opcode")
    parts: list[Buffer] = [b""]
    if spec.request is not None:
        if spec.opcode is Opcode.INIT and isinstance(arg, S.InitIn):
            size = init_in_size(arg.major, arg.minor)
        else:
            size = spec.request_size(minor, flags)
        if size:
            if not isinstance(arg, spec.request):
                raise LocalProtocolError(f"{spec.name} needs a {spec.request.__name__}")
            parts.append(_pack_checked(spec.request, arg)[:size])
        elif arg is not None:
            raise LocalProtocolError(f"{spec.name} takes no fixed argument at 7.{minor}")
    elif arg is not None:
        raise LocalProtocolError(f"{spec.name} takes no fixed argument")
    if len(names) != spec.names:
        raise LocalProtocolError(f"{spec.name} takes {spec.names} names")
    for name in names:
        if b"\0" in name:
            raise LocalProtocolError("NUL inside a name")
        parts.append(bytes(name) + b"\0")
    item_list = list(items)
    if spec.items is not None:
        if arg.count != len(item_list):
            raise LocalProtocolError(f"{spec.name} count={arg.count} but {len(item_list)} items")
        parts.append(b"".join(_pack_checked(spec.items, x) for x in item_list))
    elif item_list:
        raise LocalProtocolError(f"{spec.name} carries no items")
    if data:
        if not spec.data:
            raise LocalProtocolError(f"{spec.name} carries no data")
        parts.append(data)
    if spec.data_size_field is not None and arg is not None:
        if getattr(arg, spec.data_size_field) != len(data):
            raise LocalProtocolError(f"{spec.name}.{spec.data_size_field} must be len(data)")
    extlen = 0
    if ext:
        ext_bytes = encode_extensions(tuple(ext))
        extlen = len(ext_bytes) // 8
        if extlen > 0xFFFF:
            raise LocalProtocolError("extensions longer than total_extlen can say")
        parts.append(ext_bytes)
    total = sum(len(p) for p in parts) + _IN_SIZE
    if total > 0xFFFFFFFF:
        raise LocalProtocolError("request longer than in_header.len can say")
    parts[0] = _pack_checked(S.InHeader, S.InHeader(total, int(opcode), unique, nodeid, uid, gid,
                                                    pid, extlen, 0))
    return parts


def _pack_checked(cls: type[Any], value: Any) -> bytes:
    """Pack a struct, turning out-of-range fields into ``LocalProtocolError``."""
    c = codec(cls)
    if not isinstance(value, cls):
        raise LocalProtocolError(f"expected a {cls.__name__}, got {type(value).__name__}")
    for name, raw in _bytes_fields(cls, value):
        raise LocalProtocolError(f"{cls.__name__}.{name} is {len(raw)} bytes, not its size")
    try:
        return c.pack(value)
    except (struct.error, TypeError) as exc:
        raise LocalProtocolError(f"{cls.__name__}: {exc}") from None


def _bytes_fields(cls: type[Any], value: Any) -> Iterable[tuple[str, bytes]]:
    """Reserved byte arrays whose length is wrong (struct would pad/truncate them silently)."""
    sch = _BYTES_SIZES.get(cls)
    if sch is None:
        sch = _BYTES_SIZES[cls] = _byte_array_sizes(cls)
    for index, name, size, nested in sch:
        field = value[index]
        if nested is not None:
            yield from _bytes_fields(nested, field)
        elif not isinstance(field, bytes | bytearray) or len(field) != size:
            yield name, bytes(field) if isinstance(field, bytes | bytearray) else b""


_BYTES_SIZES: dict[type[Any], list[tuple[int, str, int, type[Any] | None]]] = {}


def _byte_array_sizes(cls: type[Any]) -> list[tuple[int, str, int, type[Any] | None]]:
    out: list[tuple[int, str, int, type[Any] | None]] = []
    for i, (name, kind) in enumerate(field_types(cls)):
        if isinstance(kind, type):
            if _byte_array_sizes(kind):
                out.append((i, name, 0, kind))
        elif not hasattr(kind, "fmtstr"):
            out.append((i, name, int(kind.sizeof()), None))
    return out


# --------------------------------------------------------------------------------------------
# Replies: encoding (the server's side)


def encode_error(unique: int, errno: int) -> bytes:
    """A header-only error reply.  ``errno`` must be in (0, 512): the kernel rejects others."""
    if not 0 < errno < C.ERRNO_LIMIT:
        raise LocalProtocolError(f"errno {errno} is outside (0, {C.ERRNO_LIMIT})")
    try:
        return _out_pack(_OUT_SIZE, -errno, unique)
    except struct.error as exc:
        raise LocalProtocolError(f"unique {unique!r}: {exc}") from None


def encode_reply_parts(spec: OpSpec, unique: int, result: Any,
                       minor: int = C.KERNEL_MINOR_VERSION) -> list[Buffer]:
    """Gather list of a successful reply to ``spec``'s opcode (out_header first, len exact).

    ``result`` per the table's reply row: a struct for one-struct replies, bytes-like for
    DATA, a tuple for several parts (CREATE: ``(EntryOut, OpenOut)``; IOCTL:
    ``(IoctlOut, data)``), None for header-only replies; for XATTR rows a ``GetxattrOut`` or
    the value bytes.  Fixed structs are cut to their size at ``minor`` (FUSE_COMPAT_* sizes).
    The first element holds the out_header (and, on the fast path, the fixed structs too).
    """
    # One lookup and one call of the opcode's generated encoder, which has the table's row and
    # ``minor`` bound: two arguments instead of four (GETATTR, pinned micro-benchmark, CPU
    # time: 666 -> 603 ns for the whole call).
    try:
        encode = _ENCODERS[minor][spec.opcode]
    except KeyError:
        encode = _encoder_table(minor)[spec.opcode]
    return encode(unique, result)


def encode_reply(opcode: Opcode, unique: int, result: Any = None,
                 minor: int = C.KERNEL_MINOR_VERSION) -> bytes:
    """``encode_reply_parts`` joined into bytes."""
    spec = OPCODES.get(opcode)
    if spec is None:
        raise LocalProtocolError(f"{opcode!r} is not a request opcode")
    return b"".join(encode_reply_parts(spec, unique, result, minor))


def _encode_reply_generic(spec: OpSpec, unique: int, result: Any,
                          minor: int = C.KERNEL_MINOR_VERSION) -> list[Buffer]:
    """The careful path: type checks, every compat size, precise errors."""
    shape = spec.reply
    parts: list[Buffer] = [b""]
    if not shape:
        if result is not None:
            raise LocalProtocolError(f"{spec.name} replies carry no body")
    else:
        values = result if len(shape) > 1 else (result,)
        if not isinstance(values, tuple | list) or len(values) != len(shape):
            raise LocalProtocolError(f"{spec.name} reply has {len(shape)} parts")
        for part, value in zip(shape, values, strict=True):
            if part is DATA or (part is XATTR and not isinstance(value, S.GetxattrOut)):
                if not isinstance(value, bytes | bytearray | memoryview):
                    raise LocalProtocolError(
                        f"{spec.name} reply data must be bytes-like, not {type(value).__name__}")
                parts.append(value)
            elif part is XATTR:
                parts.append(_pack_checked(S.GetxattrOut, value))
            else:
                assert isinstance(part, type)
                if not isinstance(value, part):
                    raise LocalProtocolError(
                        f"{spec.name} reply part must be {part.__name__}, not {type(value)}")
                packed = _pack_checked(part, value)
                size = reply_struct_size(part, minor)
                parts.append(packed if size == len(packed) else packed[:size])
    total = _OUT_SIZE
    for p in parts:
        total += len(p) if not isinstance(p, memoryview) else p.nbytes
    if total > 0xFFFFFFFF:
        raise LocalProtocolError("reply longer than out_header.len can say")
    try:
        parts[0] = _out_pack(total, 0, unique)
    except struct.error as exc:
        raise LocalProtocolError(f"unique {unique!r}: {exc}") from None
    return parts


_ENCODERS: dict[int, dict[int, Callable[[int, Any], list[Buffer]]]] = {}


def _encoder_table(minor: int) -> dict[int, Callable[[int, Any], list[Buffer]]]:
    """``encode(unique, result)`` of every opcode's reply at ``minor``, keyed by opcode."""
    found = _ENCODERS.get(minor)
    if found is None:
        found = {}
        for number, spec in BY_NUMBER.items():
            found[number] = _make_encoder(spec, minor) or _bind_generic(spec, minor)
        _ENCODERS[minor] = found
    return found


def _bind_generic(spec: OpSpec, minor: int) -> Callable[[int, Any], list[Buffer]]:
    """The careful encoder of ``spec`` at ``minor`` with the table's signature."""
    def encode(unique: int, result: Any) -> list[Buffer]:
        return _encode_reply_generic(spec, unique, result, minor)
    return encode


_Term = tuple[str, str, bool]
"""``(source, struct format, is one value)``: a term of a flat tuple expression."""


def _flat_terms(cls: type[Any], expr: str, out: list[_Term]) -> None:
    """Append the terms of a tuple expression that lists instance ``expr`` of ``cls`` flat.

    A term is a plain value (``r[0]``), a slice of a run of plain fields (``r[:6]``), or a
    member struct without members of its own, whole (``r[6]``: ``tuple + NamedTuple`` is one
    C-level concatenation).  Runs of at most ``_RUN_INLINE`` fields are listed value by value.
    """
    kinds = field_types(cls)
    if not any(isinstance(kind, type) for _, kind in kinds):
        out.append((expr, struct_format(cls), False))
        return
    run: list[int] = []

    def flush() -> None:
        if len(run) > _RUN_INLINE:
            out.append((f"{expr}[{run[0]}:{run[-1] + 1}]",
                        "".join(struct_format_of(kinds[i][1]) for i in run), False))
        else:
            out.extend((f"{expr}[{i}]", struct_format_of(kinds[i][1]), True) for i in run)
        run.clear()

    for i, (_, kind) in enumerate(kinds):
        if isinstance(kind, type):
            flush()
            _flat_terms(kind, f"{expr}[{i}]", out)
        else:
            run.append(i)
    flush()


_RUN_INLINE = 3
"""Plain fields listed one by one (``r[0], r[1], r[2]``) rather than sliced (``r[:6]``)."""


def _pack_source(terms: list[_Term], env: dict[str, Any]) -> str:
    """Source of one ``struct.Struct.pack`` call of the flat ``terms`` (see ``_flat_terms``).

    Measured on the pack expressions alone (pinned, CPU time, best of 15 x 200k calls;
    hand-written floor = two packs of ready flat tuples, 299-321 ns): out_header + entry_out as
    ``pack(*((144, 0, unique) + r[:6] + r[6]))`` 465 ns, ``pack(*((144, 0, unique, r[0], …,
    r[5]) + r[6]))`` 509 ns, two packs (header with the 6 plain fields; ``*r[6][:]``) 512 ns;
    out_header + attr_out as ``pack(*((120, 0, unique, r[0], r[1], r[2]) + r[3]))`` 376 ns,
    ``(120, 0, unique) + r[:3] + r[3]`` 405 ns, three packs (the previous generator: header;
    3 plain fields; ``*r[3][:]``) 513 ns, ``pack(120, 0, unique, r[0], r[1], r[2], *r[3])``
    597 ns (a star after positional arguments builds a list, then a tuple), ``pack_into`` a
    fresh ``bytearray`` 766 ns.  A small flat struct (write_out, open_out) costs the same whole
    (``+ r``) or value by value (165-182 ns either way).  Inlining the pack into
    ``encode_reply_parts`` from a per-opcode plan (no second call) measured no faster.
    """
    name = f"_P{len(env)}"
    env[name] = struct.Struct("<" + "".join(fmt for _, fmt, _ in terms)).pack
    display: list[str] = []
    parts: list[str] = []
    for source, _, single in terms:
        if single:
            display.append(source)
            continue
        if display:
            parts.append(f"({', '.join(display)},)")
            display = []
        parts.append(source)
    if not parts:
        return f"{name}({', '.join(display)})"
    if display:
        parts.append(f"({', '.join(display)},)")
    return f"{name}(*({' + '.join(parts)}))"


def _make_encoder(spec: OpSpec, minor: int) -> Callable[[int, Any], list[Buffer]] | None:
    """Generate the fast encoder of one opcode's reply at one version (None: careful path).

    ``encode(unique, result)``; anything off the regular shape (another type, a value out of
    range) goes to the careful path with ``spec`` and ``minor`` bound, which says what is
    wrong."""
    shape = spec.reply
    structs = [p for p in shape if isinstance(p, type)]
    if any(reply_struct_size(p, minor) != codec(p).size for p in structs):
        return None  # compat-truncated replies (minor < 9 …) take the careful path
    if any(_byte_array_sizes(p) for p in structs):
        return None  # reserved byte arrays need their length checked (init_out, statx_out)
    env: dict[str, Any] = {"_slow": _encode_reply_generic, "_error": struct.error,
                           "_mv": memoryview, "_bytes": bytes, "_bytearray": bytearray,
                           "_oh": _out_pack, "spec": spec, "minor": minor}
    fixed = _OUT_SIZE + sum(codec(p).size for p in structs)
    lines = ["def encode(unique, r):"]
    if not shape:
        lines += [" if r is not None:", "  return _slow(spec, unique, r, minor)",
                  " try:", f"  return [_oh({fixed}, 0, unique)]",
                  " except _error:", "  return _slow(spec, unique, r, minor)"]
    elif structs and len(shape) == len(structs):
        values = ["r"] if len(shape) == 1 else [f"r[{i}]" for i in range(len(shape))]
        checks = []
        if len(shape) > 1:
            checks.append(f"type(r) is not tuple or len(r) != {len(shape)}")
        # out_header and every struct in one pack call of one flat tuple (_pack_source has
        # the measurements): the gather list is a single bytes.
        terms: list[_Term] = [(str(fixed), "I", True), ("0", "i", True), ("unique", "Q", True)]
        for i, (part, value) in enumerate(zip(structs, values, strict=True)):
            env[f"_T{i}"] = part
            checks.append(f"type({value}) is not _T{i}")
            _flat_terms(part, value, terms)
        # TypeError: a member struct that is not a tuple (``AttrOut(attr=None)``); the careful
        # path turns it into LocalProtocolError (or packs a list it accepts).
        lines += [f" if {' or '.join(checks)}:", "  return _slow(spec, unique, r, minor)",
                  " try:", f"  return [{_pack_source(terms, env)}]",
                  " except (_error, TypeError):", "  return _slow(spec, unique, r, minor)"]
    elif shape == (DATA,) or shape == (XATTR,):
        lines += [" t = type(r)",
                  " if t is _bytes or t is _bytearray:",
                  "  n = len(r)",
                  " elif t is _mv:",
                  "  n = r.nbytes",
                  " else:",
                  "  return _slow(spec, unique, r, minor)",
                  " try:",
                  f"  return [_oh({fixed} + n, 0, unique), r]",
                  " except _error:",
                  "  return _slow(spec, unique, r, minor)"]
    else:
        return None  # IOCTL / CUSE_INIT: struct + data, rare
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<encode {spec.name} reply 7.{minor}>", "exec"), env)
    result: Callable[[int, Any], list[Buffer]] = env["encode"]
    return result


_encoder_table(_DEFAULT_MINOR)


# --------------------------------------------------------------------------------------------
# Replies: decoding (the client's side)


def decode_reply(opcode: Opcode, buf: Buffer, *, minor: int = C.KERNEL_MINOR_VERSION,
                 xattr_size: int | None = None) -> Reply:
    """Decode a reply to a request of ``opcode`` (the client's decoder).

    Enforces what the kernel enforces on the framing (SECURITY.md B5): exact ``len``, errno
    range, no body with an error, fixed parts of the exact size for the negotiated minor.
    ``xattr_size`` is the size the GETXATTR/LISTXATTR request asked for (0 or None: a
    ``GetxattrOut`` comes back).  Content checks (dirent names, sizes against the request)
    are ``validate.validate_reply``'s.
    """
    spec = OPCODES.get(opcode)
    if spec is None:
        raise LocalProtocolError(f"{opcode!r} is not a request opcode")
    view = buf if isinstance(buf, memoryview) else memoryview(buf)
    if view.format != "B" or view.itemsize != 1:
        view = view.cast("B")
    if len(view) < _OUT_SIZE:
        raise ProtocolError(f"reply of {len(view)} bytes is shorter than out_header",
                            field="len", offset=0, opcode=opcode)
    header = _OUT.unpack(view)
    if header.len != len(view):
        raise ProtocolError(f"out_header.len {header.len} != {len(view)} bytes", field="len",
                            offset=0, opcode=opcode)
    if header.error:
        if not -C.ERRNO_LIMIT < header.error < 0:
            raise ProtocolError(f"error {header.error} outside (-512, 0)", field="error",
                                offset=4, opcode=opcode)
        if len(view) != _OUT_SIZE:
            raise ProtocolError("error reply with a body", field="len", offset=0, opcode=opcode)
        return Reply(header)
    pos = _OUT_SIZE
    parts: list[Any] = []
    for part in spec.reply:
        if part is XATTR:
            part = DATA if xattr_size else S.GetxattrOut
        if part is DATA:
            # DATA is always the last part of a row (checked at import in opcodes.py).
            parts.append(bytes(view[pos:]))
            pos = len(view)
            continue
        assert isinstance(part, type)
        size = reply_struct_size(part, minor)
        if len(view) - pos < size:
            raise ProtocolError(f"{spec.name} reply part {part.__name__} truncated",
                                opcode=opcode, field=part.__name__, offset=pos)
        parts.append(_unpack_prefix(codec(part), view, pos, size))
        pos += size
    if pos != len(view):
        raise ProtocolError(f"{spec.name} reply has {len(view) - pos} bytes too many",
                            opcode=opcode, field="len", offset=pos)
    return Reply(header, tuple(parts))
