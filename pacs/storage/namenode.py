"""The few NameNode calls a pack writer makes, over Hadoop's RPC protocol.

Hadoop IPC (protocol version 9) on one TCP connection: the ``hrpc`` preamble
with no SASL (a cluster without Kerberos), a connection context naming the
user and ``ClientProtocol``, then one framed call at a time, each a
``RpcRequestHeaderProto``, a ``RequestHeaderProto`` (method, protocol) and the
request, answered by a ``RpcResponseHeaderProto`` and the response.  The
messages (``ClientNamenodeProtocol.proto``, ``hdfs.proto``) are written out by
hand with :mod:`pacs.storage.protowire`.

Calls: ``create``, ``addBlock``, ``complete``, ``renewLease``,
``recoverLease``, ``abandonBlock``.  What :class:`pacs.storage.hdfswriter.
PackWriter` does with them is described there.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass

from pacs.errors import StorageUnavailable
from pacs.storage.datanode import LocatedBlock, Token
from pacs.storage.protowire import (
    delimited,
    field_bytes,
    field_str,
    field_varint,
    fields,
    one_bytes,
    one_int,
    one_str,
    read_varint,
    recv_bytes,
    zigzag,
)

PROTOCOL = "org.apache.hadoop.hdfs.protocol.ClientProtocol"
IPC_VERSION = 9
RPC_PROTOCOL_BUFFER = 2
CONNECTION_CONTEXT_CALL_ID = -3
MAX_RESPONSE_BYTES = 64 << 20
# The NameNode drops connections idle for twice ipc.client.connection.maxidletime
# (20 s by default); one idle for this long is replaced before a call rather
# than found closed by it.
IDLE_RECONNECT_S = 8.0
# CreateFlagProto
CREATE = 0x01
# CryptoProtocolVersionProto.ENCRYPTION_ZONES: what the client understands
ENCRYPTION_ZONES = 2


class NameNodeError(StorageUnavailable):
    """The NameNode answered a call with an exception (its class and message are in ``str()``)."""

    def __init__(self, method: str, exception_class: str, message: str) -> None:
        self.method = method
        self.exception_class = exception_class
        self.remote_message = message
        super().__init__(f"NameNode {method}: {exception_class}: {message.splitlines()[0] if message else ''}")


@dataclass(frozen=True)
class NewBlock:
    """A block the NameNode allocated: where it is, and the raw DatanodeInfoProto of each target."""

    located: LocatedBlock
    targets: tuple[bytes, ...]  # DatanodeInfoProto, in pipeline order

    def extended(self, num_bytes: int) -> bytes:
        """ExtendedBlockProto of this block holding ``num_bytes``."""
        return self.located.extended(num_bytes)


def _datanode_address(info: bytes) -> tuple[str, int]:
    ident = fields(one_bytes(fields(info), 1))
    host = one_str(ident, 1) or one_str(ident, 2)
    return host, one_int(ident, 4)


def _token(raw: bytes) -> Token:
    if not raw:
        return Token()
    token = fields(raw)
    return Token(one_bytes(token, 1), one_bytes(token, 2), one_str(token, 3), one_str(token, 4))


def parse_new_block(raw: bytes) -> NewBlock:
    """A LocatedBlockProto as the NameNode returns it from addBlock."""
    located = fields(raw)
    block = fields(one_bytes(located, 1))
    targets = tuple(value for value in located.get(3, ()) if isinstance(value, bytes))
    return NewBlock(
        LocatedBlock(
            pool_id=one_str(block, 1),
            block_id=one_int(block, 2),
            generation_stamp=one_int(block, 3),
            num_bytes=one_int(block, 4),
            start_offset=one_int(located, 2),
            token=_token(one_bytes(located, 5)),
            datanodes=tuple(_datanode_address(info) for info in targets),
        ),
        targets,
    )


class NameNodeClient:
    """One RPC connection to a NameNode; thread-safe (one call at a time), reconnects once on a broken one."""

    def __init__(self, host: str, port: int, *, user: str, timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.timeout_s = timeout_s
        # One client name per process: the lease of every file it writes.
        self.client_name = f"pacs-writer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._client_id = uuid.uuid4().bytes
        self._call_id = 0
        self._sock: socket.socket | None = None
        self._last_call = 0.0
        self._lock = threading.Lock()

    # --- connection ---------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise StorageUnavailable(f"cannot reach the NameNode at {self.host}:{self.port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = (field_bytes(2, field_str(1, self.user)) + field_str(3, PROTOCOL))
        sock.sendall(b"hrpc" + bytes((IPC_VERSION, 0, 0))  # version, service class, no SASL
                     + self._frame(self._rpc_header(CONNECTION_CONTEXT_CALL_ID), context))
        return sock

    def _rpc_header(self, call_id: int) -> bytes:
        return (field_varint(1, RPC_PROTOCOL_BUFFER) + field_varint(2, 0)  # RPC_FINAL_PACKET
                + field_varint(3, zigzag(call_id)) + field_bytes(4, self._client_id)
                + field_varint(5, zigzag(0)))

    @staticmethod
    def _frame(*messages: bytes) -> bytes:
        body = b"".join(delimited(message) for message in messages)
        return struct.pack(">I", len(body)) + body

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # --- calls --------------------------------------------------------------

    def call(self, method: str, request: bytes) -> bytes:
        """Send one call and return its response message; NameNodeError if the NameNode raised."""
        with self._lock:
            if self._sock is not None and time.monotonic() - self._last_call > IDLE_RECONNECT_S:
                self._sock.close()
                self._sock = None
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._sock = self._connect()
                    response = self._exchange(self._sock, method, request)
                    self._last_call = time.monotonic()
                    return response
                except (OSError, ValueError) as exc:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    # Once more on a new connection: the NameNode may have
                    # restarted or dropped this one (the idle check above
                    # makes that rare).
                    if attempt == 2:
                        raise StorageUnavailable(
                            f"NameNode {self.host}:{self.port} {method} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _exchange(self, sock: socket.socket, method: str, request: bytes) -> bytes:
        self._call_id = (self._call_id + 1) & 0x3FFFFFFF
        call_id = self._call_id
        header = (field_str(1, method) + field_str(2, PROTOCOL) + field_varint(3, 1))
        sock.sendall(self._frame(self._rpc_header(call_id), header, request))
        size = struct.unpack(">I", recv_bytes(sock, 4, "NameNode"))[0]
        if size > MAX_RESPONSE_BYTES:
            raise ValueError(f"a {size}-byte response to {method}")
        body = recv_bytes(sock, size, "NameNode")
        length, pos = read_varint(body, 0)
        response = fields(body[pos:pos + length])
        pos += length
        if one_int(response, 1, -1) != call_id:
            raise ValueError(f"response to call {one_int(response, 1, -1)}, expected {call_id}")
        status = one_int(response, 2, 0)
        if status != 0:
            raise NameNodeError(method, one_str(response, 4), one_str(response, 5))
        if pos >= len(body):
            return b""
        length, pos = read_varint(body, pos)
        return body[pos:pos + length]

    def create(self, src: str, *, replication: int, block_size: int, permission: int = 0o644) -> int:
        """Create ``src`` (and its parents) for writing; its file id.  FileExistsError if it exists."""
        request = (field_str(1, src) + field_bytes(2, field_varint(1, permission))
                   + field_str(3, self.client_name) + field_varint(4, CREATE) + field_varint(5, 1)
                   + field_varint(6, replication) + field_varint(7, block_size)
                   + field_varint(8, ENCRYPTION_ZONES))
        try:
            response = fields(self.call("create", request))
        except NameNodeError as exc:
            if exc.exception_class.endswith("FileAlreadyExistsException"):
                raise FileExistsError(src) from exc
            raise
        status = fields(one_bytes(response, 1))
        return one_int(status, 13)

    def add_block(self, src: str, file_id: int, previous: bytes | None = None,
                  exclude: tuple[bytes, ...] = ()) -> NewBlock:
        """A new last block for ``src``; ``previous`` (ExtendedBlockProto) is the block before it, complete."""
        request = field_str(1, src) + field_str(2, self.client_name)
        if previous is not None:
            request += field_bytes(3, previous)
        request += b"".join(field_bytes(4, node) for node in exclude) + field_varint(5, file_id)
        return parse_new_block(one_bytes(fields(self.call("addBlock", request)), 1))

    def abandon_block(self, src: str, file_id: int, block: bytes) -> None:
        self.call("abandonBlock", field_bytes(1, block) + field_str(2, src) + field_str(3, self.client_name)
                  + field_varint(4, file_id))

    def complete(self, src: str, file_id: int, last: bytes | None) -> bool:
        """Close ``src`` with ``last`` as its last block; False while the DataNodes have not reported it yet."""
        request = field_str(1, src) + field_str(2, self.client_name)
        if last is not None:
            request += field_bytes(3, last)
        request += field_varint(4, file_id)
        return bool(one_int(fields(self.call("complete", request)), 1))

    def renew_lease(self) -> None:
        self.call("renewLease", field_str(1, self.client_name))

    def recover_lease(self, src: str) -> bool:
        """Have the NameNode close ``src`` now with what its DataNodes hold; True once it is closed."""
        return bool(one_int(fields(self.call("recoverLease", field_str(1, src) + field_str(2, self.client_name))), 1))
