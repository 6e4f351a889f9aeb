"""The messages of the archive's HDFS pack writer, checked against the protocol definitions
(ClientNamenodeProtocol.proto, datatransfer.proto, hdfs.proto) field by field."""

from __future__ import annotations

import os
import struct

import crc32c
import pytest

from pacs.storage import hdfswriter
from pacs.storage.datanode import Token
from pacs.storage.hdfswriter import chunk_checksums, packet_header, write_block_request
from pacs.storage.namenode import NameNodeClient, parse_new_block
from pacs.storage.protowire import (
    field_bytes,
    field_str,
    field_varint,
    fields,
    read_varint,
    unzigzag,
    varint,
    zigzag,
)


@pytest.mark.parametrize("value", [0, 1, -1, -3, 2**31 - 1, -(2**31), 2**62, -(2**63)])
def test_zigzag_round_trips_and_keeps_small_magnitudes_small(value):
    assert unzigzag(zigzag(value)) == value
    if -64 <= value < 64:
        assert len(varint(zigzag(value))) == 1


def test_a_negative_int_is_sent_as_ten_bytes_of_twos_complement():
    encoded = varint(-2)
    assert len(encoded) == 10
    assert read_varint(encoded, 0) == (2**64 - 2, 10)


def test_checksums_are_crc32c_of_each_chunk_big_endian():
    chunk = hdfswriter.BYTES_PER_CHECKSUM
    data = bytes(range(256)) * (chunk * 5 // 256 // 2)  # two and a half chunks
    sums = chunk_checksums(data)
    assert len(sums) == 12
    expected = [crc32c.crc32c(data[i:i + chunk]) for i in (0, chunk, 2 * chunk)]
    assert list(struct.unpack(">3I", sums)) == expected
    assert chunk_checksums(memoryview(data)[chunk:2 * chunk]) == sums[4:8]
    assert chunk_checksums(b"") == b""


@pytest.mark.parametrize("lead, length", [(1, 10), (100, 4096 * 3 + 7), (4095, 1), (2000, 2096), (2000, 2095)])
def test_checksums_with_a_lead_are_those_of_the_lead_and_the_data_together(lead, length):
    data, before = os.urandom(length), os.urandom(lead)
    assert chunk_checksums(data, lead=before) == chunk_checksums(before + data)


def test_a_lead_of_a_whole_chunk_is_refused():
    with pytest.raises(ValueError, match="4096 bytes"):
        chunk_checksums(b"x", lead=bytes(hdfswriter.BYTES_PER_CHECKSUM))


def test_the_packet_header_has_fixed_width_offset_seqno_and_length():
    header = fields(packet_header(1_536, 41, 8_000, last=False, sync=True))
    assert struct.unpack("<q", header[1][0])[0] == 1_536  # sfixed64
    assert struct.unpack("<q", header[2][0])[0] == 41
    assert header[3] == [0] and header[5] == [1]
    assert struct.unpack("<i", header[4][0])[0] == 8_000  # sfixed32
    heartbeat = fields(packet_header(0, hdfswriter.HEARTBEAT_SEQNO, 0, last=False, sync=False))
    assert struct.unpack("<q", heartbeat[2][0])[0] == -1


def datanode_info(host: str, port: int, uuid: str) -> bytes:
    ident = field_str(1, host) + field_str(2, "localhost") + field_str(3, uuid) + field_varint(4, port)
    return field_bytes(1, ident) + field_varint(2, 10**12)  # capacity: a field the writer passes on untouched


def located_block() -> bytes:
    extended = field_str(1, "BP-7") + field_varint(2, 1_073_741_900) + field_varint(3, 1_017) + field_varint(4, 0)
    token = field_bytes(1, b"id") + field_bytes(2, b"pw") + field_str(3, "HDFS_BLOCK_TOKEN") + field_str(4, "")
    nodes = [datanode_info("127.0.0.1", port, f"dn-{port}") for port in (19866, 19876, 19886)]
    return (field_bytes(1, extended) + field_varint(2, 268_435_456)
            + b"".join(field_bytes(3, node) for node in nodes) + field_varint(4, 0) + field_bytes(5, token))


def test_a_new_block_from_the_namenode_keeps_its_pipeline_and_token():
    block = parse_new_block(located_block())
    located = block.located
    assert (located.pool_id, located.block_id, located.generation_stamp) == ("BP-7", 1_073_741_900, 1_017)
    assert located.start_offset == 268_435_456
    assert located.datanodes == (("127.0.0.1", 19866), ("127.0.0.1", 19876), ("127.0.0.1", 19886))
    assert located.token == Token(b"id", b"pw", "HDFS_BLOCK_TOKEN", "")
    assert fields(block.extended(5_000)) == {1: [b"BP-7"], 2: [1_073_741_900], 3: [1_017], 4: [5_000]}


def test_write_block_sets_up_a_new_pipeline_through_the_other_datanodes():
    block = parse_new_block(located_block())
    request = fields(write_block_request(block, "pacs-writer-1"))
    header = fields(request[1][0])
    assert header[2] == [b"pacs-writer-1"]
    assert fields(fields(header[1][0])[1][0])[2] == [1_073_741_900]
    assert request[2] == list(block.targets[1:])  # the first DataNode is the one connected to
    assert request[4] == [hdfswriter.PIPELINE_SETUP_CREATE] and request[5] == [3]
    assert request[6] == [0] and request[7] == [0] and request[8] == [1_017]
    assert fields(request[9][0]) == {1: [hdfswriter.CHECKSUM_CRC32C], 2: [hdfswriter.BYTES_PER_CHECKSUM]}


def test_the_rpc_header_carries_the_call_id_zigzagged_and_the_client_id():
    client = NameNodeClient("127.0.0.1", 1, user="pacs")
    header = fields(client._rpc_header(-3))
    assert header[1] == [2]  # RPC_PROTOCOL_BUFFER
    assert unzigzag(header[3][0]) == -3
    assert len(header[4][0]) == 16
    framed = client._frame(b"ab", b"")
    assert framed == struct.pack(">I", 4) + b"\x02ab\x00"


def test_the_pack_writer_needs_a_namenode_host_and_port():
    """A nameservice URL (HA NameNodes) leaves packs to hdfs-native's writer, which resolves it."""
    from pacs.storage.hdfs import namenode_address

    assert namenode_address("hdfs://127.0.0.1:19000") == ("127.0.0.1", 19000)
    assert namenode_address("hdfs://nn-1.example.org:8020/") == ("nn-1.example.org", 8020)
    assert namenode_address("hdfs://archive-ns") is None
    assert namenode_address("viewfs://cluster/") is None
