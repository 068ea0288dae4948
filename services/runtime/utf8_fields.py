"""Which string field of a serialized message is not UTF-8 (for an INVALID_ARGUMENT naming it).

grpc's generated handlers parse with ``Message.FromString``; a proto3 ``string`` field holding
bytes that are not UTF-8 fails that parse before any handler runs. The runtime's exception
interceptor (``services.runtime.errors``) turns the failure into INVALID_ARGUMENT and uses
:func:`invalid_utf8_field` to name the field, as a dotted path (``prompt.text``,
``input.chat.messages.content``), found by walking the wire format.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Dotted path of the first string field (nested messages included) that is not UTF-8."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                n, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + n], pos + n
                fd = descriptor.fields_by_number.get(number)
                if fd is None:
                    continue
                if fd.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + fd.name
                elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                    found = invalid_utf8_field(fd.message_type, chunk, f"{prefix}{fd.name}.")
                    if found:
                        return found
            else:
                return None  # groups or garbage: not a UTF-8 problem
    except DecodeError:
        return None
    return None
