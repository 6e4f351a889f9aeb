"""The data-transfer messages of pacs.storage.datanode, without a cluster (the real DataNodes are in
tests/integration/test_hdfs_backends.py): tokens, block headers, ranges over blocks, and the
replies a DataNode can send that a healthy one rarely does."""

from __future__ import annotations

import base64
import socket
import struct
import threading

import pytest

from pacs.storage.datanode import (
    BlockList,
    DataNodeReadError,
    LocatedBlock,
    Token,
    read_block,
)
from pacs.storage.protowire import field_bytes, field_varint, fields, varint


def hadoop_vint(value: int) -> bytes:
    """WritableUtils.writeVInt, written out for the test from Hadoop's description."""
    if -112 <= value <= 127:
        return struct.pack("b", value)
    size_code = -112
    if value < 0:
        value = ~value
        size_code = -120
    body = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return struct.pack("b", size_code - len(body)) + body


def test_an_empty_block_token_decodes_to_emptyfields():
    assert Token.from_url_string("AAAAAA") == Token()
    assert Token.from_url_string("") == Token()


def test_a_block_token_decodes_from_its_writable_form():
    identifier, password = bytes(range(200)), b"\x01" * 20  # 200 needs a two-byte vint
    raw = (hadoop_vint(len(identifier)) + identifier + hadoop_vint(len(password)) + password
           + hadoop_vint(16) + b"HDFS_BLOCK_TOKEN" + hadoop_vint(14) + b"127.0.0.1:9866")
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    token = Token.from_url_string(text)
    assert token == Token(identifier, password, "HDFS_BLOCK_TOKEN", "127.0.0.1:9866")
    decoded = fields(token.encode())
    assert decoded[1] == [identifier] and decoded[3] == [b"HDFS_BLOCK_TOKEN"]


def block(start: int, size: int, block_id: int = 7) -> LocatedBlock:
    return LocatedBlock("BP-1", block_id, 1001, size, start, Token(), (("127.0.0.1", 1),))


def test_the_operation_header_carries_the_block_and_the_client():
    header = fields(block(0, 300_000, block_id=2**40).header("reader-1"))
    assert header[2] == [b"reader-1"]
    base = fields(header[1][0])
    extended = fields(base[1][0])
    assert extended == {1: [b"BP-1"], 2: [2**40], 3: [1001], 4: [300_000]}


def test_a_range_is_cut_at_block_boundaries_and_stops_at_the_known_length():
    blocks = BlockList((block(0, 100, 1), block(100, 100, 2), block(200, 30, 3)))
    assert blocks.known_end == 230
    assert [(b.block_id, o, n) for b, o, n in blocks.covering(90, 130)] == [(1, 90, 10), (2, 0, 100), (3, 0, 20)]
    assert [(b.block_id, o, n) for b, o, n in blocks.covering(200, 30)] == [(3, 0, 30)]
    with pytest.raises(DataNodeReadError, match="past the 230"):
        blocks.covering(200, 31)


def test_the_block_being_written_is_asked_for_whatever_the_namenode_knows_of_its_length():
    """The pack writer never tells the NameNode how long the last block is: its DataNodes know."""
    blocks = BlockList((block(0, 100, 1), block(100, 0, 2)), open_last=True)
    assert blocks.known_end == float("inf")
    assert [(b.block_id, o, n) for b, o, n in blocks.covering(90, 5_000)] == [(1, 90, 10), (2, 0, 4_990)]
    assert [(b.block_id, o, n) for b, o, n in blocks.covering(40, 20)] == [(1, 40, 20)]


class ScriptedDataNode:
    """Answers one READ_BLOCK with the given bytes after checking the request's framing."""

    def __init__(self, reply: bytes) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()
        self.reply = reply
        self.request = b""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(5)
            self.request = conn.recv(65536)
            conn.sendall(self.reply)
            try:
                conn.shutdown(socket.SHUT_WR)  # a reply cut short ends here, as when a DataNode dies
                conn.recv(64)
            except OSError:
                pass  # the reader hung up first: it had what it wanted (or gave up), either way fine
        self.server.close()


def delimited(message: bytes) -> bytes:
    return varint(len(message)) + message


def packet(offset: int, seqno: int, data: bytes, *, last: bool = False, checksums: bytes = b"") -> bytes:
    header = (varint(1 << 3 | 1) + struct.pack("<q", offset) + varint(2 << 3 | 1) + struct.pack("<q", seqno)
              + field_varint(3, int(last)) + varint(4 << 3 | 5) + struct.pack("<i", len(data)))
    return struct.pack(">iH", 4 + len(checksums) + len(data), len(header)) + header + checksums + data


def test_a_read_keeps_only_the_asked_range_of_whole_checksum_chunks():
    content = bytes(range(256)) * 8  # 2,048 bytes: four chunks of 512
    checksum_info = field_bytes(1, field_varint(1, 2) + field_varint(2, 512)) + field_varint(2, 512)
    reply = (delimited(field_varint(1, 0) + field_bytes(4, checksum_info))
             + packet(512, 0, content[512:1024], checksums=b"\0" * 4)
             + packet(1024, 1, content[1024:1536], checksums=b"\0" * 4)
             + packet(1536, 2, b"", last=True))
    node = ScriptedDataNode(reply)
    out = bytearray(700)
    read_block(node.address, block(0, 2048), 600, memoryview(out), client_name="t", timeout_s=5)
    assert bytes(out) == content[600:1300]
    node.thread.join(5)
    assert node.request[:3] == struct.pack(">hB", 28, 81)  # version 28, READ_BLOCK


def test_an_error_status_is_reported_with_the_datanodes_message():
    node = ScriptedDataNode(delimited(field_varint(1, 1) + field_bytes(5, b"Replica gen stamp < block genstamp")))
    with pytest.raises(DataNodeReadError, match="status 1.*gen stamp"):
        read_block(node.address, block(0, 100), 0, memoryview(bytearray(10)), client_name="t", timeout_s=5)


@pytest.mark.parametrize("bad", [
    packet(0, 0, b"x" * 10)[:-4],  # cut off mid-packet
    struct.pack(">iH", 64 << 20, 10),  # a packet larger than any DataNode sends
    packet(0, 0, b"x" * 10, last=True)[:6] + b"\xff" * 30,  # a header that is not protobuf
    struct.pack(">iH", 14, 2) + field_varint(4, 10) + b"x" * 10,  # dataLen with the wrong wire type
])
def test_a_broken_or_malformed_transfer_fails_cleanly(bad):
    node = ScriptedDataNode(delimited(field_varint(1, 0)) + bad)
    with pytest.raises((OSError, ValueError)):
        read_block(node.address, block(0, 100), 0, memoryview(bytearray(10)), client_name="t", timeout_s=5)
