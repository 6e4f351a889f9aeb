"""Protocol-buffer wire format, the little of it Hadoop's RPC and data-transfer messages need.

The messages are few and small, so they are written and read by hand
(field number, wire type, value) rather than through generated classes:
:func:`fields` decodes a message into ``{number: [values]}`` with varints
as ints and everything else as bytes; the ``field_*`` functions encode one
field each.  Signed ``sint`` fields use zigzag (:func:`zigzag`,
:func:`unzigzag`); ``sfixed`` ones are little-endian (:func:`field_sfixed64`).
"""

from __future__ import annotations

import socket
import struct

# The most a delimited reply (a status, an acknowledgement) may take.
MAX_DELIMITED_BYTES = 1 << 16


def varint(value: int) -> bytes:
    """An unsigned varint; a negative int32/int64 is sent as its 64-bit two's complement."""
    if value < 0:
        value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_str(number: int, value: str) -> bytes:
    return field_bytes(number, value.encode())


def field_sfixed64(number: int, value: int) -> bytes:
    return varint(number << 3 | 1) + struct.pack("<q", value)


def field_sfixed32(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<i", value)


def delimited(message: bytes) -> bytes:
    """``message`` prefixed with its length as a varint (Java's ``writeDelimitedTo``)."""
    return varint(len(message)) + message


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def fields(data: bytes | memoryview) -> dict[int, list[int | bytes]]:
    """Decode one message's fields: varints as ints, length-delimited and fixed-width ones as bytes."""
    decoded: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 2:
            size, pos = read_varint(data, pos)
            value = bytes(data[pos:pos + size])
            pos += size
        elif wire == 1:
            value = bytes(data[pos:pos + 8])
            pos += 8
        elif wire == 5:
            value = bytes(data[pos:pos + 4])
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf field")
        decoded.setdefault(number, []).append(value)
    return decoded


def one(decoded: dict[int, list[int | bytes]], number: int, default: int | bytes | None = None) -> int | bytes | None:
    """The last value of a field (protobuf's rule for a repeated non-repeated field), or ``default``."""
    values = decoded.get(number)
    return values[-1] if values else default


def one_int(decoded: dict[int, list[int | bytes]], number: int, default: int = 0) -> int:
    value = one(decoded, number, default)
    if not isinstance(value, int):
        raise ValueError(f"protobuf field {number}: expected a varint")
    return value


def one_bytes(decoded: dict[int, list[int | bytes]], number: int, default: bytes = b"") -> bytes:
    value = one(decoded, number, default)
    if not isinstance(value, bytes):
        raise ValueError(f"protobuf field {number}: expected a length-delimited value")
    return value


def one_str(decoded: dict[int, list[int | bytes]], number: int, default: str = "") -> str:
    return one_bytes(decoded, number, default.encode()).decode(errors="replace")


# --- reading them off a socket ------------------------------------------------


def recv_into(sock: socket.socket, view: memoryview, peer: str) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if ``peer`` closes the connection first."""
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError(f"the {peer} closed the connection")
        view = view[got:]


def recv_bytes(sock: socket.socket, size: int, peer: str) -> bytes:
    buffer = bytearray(size)
    recv_into(sock, memoryview(buffer), peer)
    return bytes(buffer)


def recv_delimited(sock: socket.socket, peer: str) -> bytes:
    """A varint-length-prefixed message (Java's ``parseDelimitedFrom``), at most ``MAX_DELIMITED_BYTES``."""
    size = shift = 0
    while True:
        byte = recv_bytes(sock, 1, peer)[0]
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 35:
            raise ValueError(f"bad message length from the {peer}")
    if size > MAX_DELIMITED_BYTES:
        raise ValueError(f"a {size}-byte reply from the {peer}: expected a small message")
    return recv_bytes(sock, size, peer)
