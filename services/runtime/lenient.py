"""Request deserializers that turn an unparsable request into INVALID_ARGUMENT naming the field.

grpc's generated handlers parse with ``Message.FromString``; a proto3 ``string`` field holding
bytes that are not UTF-8 then fails inside grpc, before any handler runs, and the caller gets a
bare INTERNAL / UNKNOWN. Here the parse failure becomes a marker request instead, and the
wrapped handler raises InvalidArgument naming the first string field (as a dotted path, e.g.
``input.text``) whose bytes are not UTF-8, found by walking the wire format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.core.errors import InvalidArgument


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    field: str  # "" when no string field is at fault (truncated or otherwise malformed bytes)
    error: str


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


def lenient_deserializer(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def parse(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(invalid_utf8_field(cls.DESCRIPTOR, data) or "", str(e))

    return parse


def refuse_undecodable(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wrap a unary handler: a request that did not parse raises InvalidArgument naming its field."""

    async def handler(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            if request.field:
                raise InvalidArgument("is not valid UTF-8", request.field)
            raise InvalidArgument(f"the request does not parse: {request.error}")
        return await behavior(request, context)

    return handler


def unary_handlers(
    methods: dict[str, tuple[Callable[[Any, Any], Any], type[Message], type[Message]]],
) -> dict[str, grpc.RpcMethodHandler]:
    """{name: (async behavior, request class, response class)} -> unary handlers that parse
    leniently (see the module docstring)."""
    return {
        name: grpc.unary_unary_rpc_method_handler(
            refuse_undecodable(behavior),
            request_deserializer=lenient_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
        for name, (behavior, request_cls, response_cls) in methods.items()
    }
