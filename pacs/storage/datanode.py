"""Reading file ranges straight from the DataNodes, files still being written included.

hdfs-native reads only up to the length the NameNode gives for a file's
completed blocks, so a pack that ingest is still appending to looks empty
past its last full block.  Every byte ``hsync``'ed to it is on the
DataNodes all the same, and a DataNode serves a block being written up to
the length its whole pipeline has acknowledged: this is how Hadoop's own
client reads such files.  This module does the same in two steps:

1. the block list, the last block under construction included, from the
   NameNode's WebHDFS ``GET_BLOCK_LOCATIONS`` (one small HTTP request,
   cached per file until a read goes past it);
2. each block's range from one of its DataNodes over Hadoop's data-transfer
   protocol (``READ_BLOCK``, protocol version 28, protobuf messages written
   out by hand below), received straight into the result buffer.

The DataNode is asked not to send its CRCs: the bytes go to callers that
check every object against the SHA-256 the index holds (``ObjectStore``),
which covers the same bytes end to end, and read again through the
checked client what fails.  That also makes it the cheaper way to read a
retrieve's spans of sealed packs (``NativeHdfsBlobStore.read_unverified``).
A DataNode that fails (refused, gone mid-transfer, an error status such as
a stale generation stamp after a pipeline recovery) is skipped for the next
one holding the block; the block list is fetched again once before giving
up.  One that did not answer at all is tried last for a minute.

What it does not do: encrypted or SASL-protected data transfer (a
Kerberos cluster with ``dfs.data.transfer.protection``) and erasure-coded
files; :class:`DataNodeReader` raises :class:`DataNodeReadError` there and
its caller falls back to hdfs-native and WebHDFS.  ``docs/storage.md`` has
the measurements.
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass

from pacs.errors import StorageUnavailable
from pacs.storage.protowire import (
    field_bytes,
    field_varint,
    fields,
    one,
    recv_bytes,
    recv_delimited,
    recv_into,
    varint,
)

DATA_TRANSFER_VERSION = 28
OP_READ_BLOCK = 81
# DataTransferProtos' Status
STATUS_SUCCESS = 0
# A packet is at most 16 MiB (the DataNode's own limit); its header a few dozen bytes.
MAX_PACKET_BYTES = 16 << 20
MAX_PACKET_HEADER_BYTES = 1 << 10
RECEIVE_BUFFER_BYTES = 4 << 20


class DataNodeReadError(StorageUnavailable):
    """No DataNode holding the block served the range."""


# --- block locations --------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A block access token (empty where the cluster does not check them)."""

    identifier: bytes = b""
    password: bytes = b""
    kind: str = ""
    service: str = ""

    @classmethod
    def from_url_string(cls, text: str) -> Token:
        """Decode Hadoop's URL-safe base64 of the token's Writable form (vint-prefixed fields)."""
        if not text:
            return cls()
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        parts: list[bytes] = []
        pos = 0
        for _ in range(4):
            size, pos = _read_hadoop_vint(raw, pos)
            parts.append(raw[pos:pos + size])
            pos += size
        return cls(parts[0], parts[1], parts[2].decode(), parts[3].decode())

    def encode(self) -> bytes:
        return (field_bytes(1, self.identifier) + field_bytes(2, self.password)
                + field_bytes(3, self.kind.encode()) + field_bytes(4, self.service.encode()))


def _read_hadoop_vint(raw: bytes, pos: int) -> tuple[int, int]:
    """Hadoop's WritableUtils vint: one byte from -112 to 127, else a length byte then big-endian bytes."""
    first = struct.unpack_from("b", raw, pos)[0]
    pos += 1
    if first >= -112:
        return first, pos
    negative = first < -120
    size = (-120 - first) if negative else (-112 - first)
    value = int.from_bytes(raw[pos:pos + size], "big")
    return (~value if negative else value), pos + size


@dataclass(frozen=True)
class LocatedBlock:
    pool_id: str
    block_id: int
    generation_stamp: int
    num_bytes: int
    start_offset: int  # of the block in the file
    token: Token
    datanodes: tuple[tuple[str, int], ...]  # (host, data-transfer port), the NameNode's order

    def extended(self, num_bytes: int | None = None) -> bytes:
        """ExtendedBlockProto of this block, holding ``num_bytes`` (default: what the NameNode said)."""
        return (field_bytes(1, self.pool_id.encode()) + field_varint(2, self.block_id)
                + field_varint(3, self.generation_stamp)
                + field_varint(4, self.num_bytes if num_bytes is None else num_bytes))

    def header(self, client_name: str) -> bytes:
        """ClientOperationHeaderProto for this block."""
        base = field_bytes(1, self.extended()) + field_bytes(2, self.token.encode())
        return field_bytes(1, base) + field_bytes(2, client_name.encode())


def _located(item: dict) -> LocatedBlock:
    block = item["block"]
    return LocatedBlock(
        pool_id=block["blockPoolId"],
        block_id=int(block["blockId"]),
        generation_stamp=int(block["generationStamp"]),
        num_bytes=int(block.get("numBytes", 0)),
        start_offset=int(item["startOffset"]),
        token=Token.from_url_string((item.get("blockToken") or {}).get("urlString", "")),
        datanodes=tuple((node.get("ipAddr") or node["hostName"], int(node["xferPort"]))
                        for node in item.get("locations", ())),
    )


@dataclass(frozen=True)
class BlockList:
    blocks: tuple[LocatedBlock, ...]
    # The file is being written: its last block's DataNodes, not the
    # NameNode, know where it ends (the pack writer never tells the NameNode).
    open_last: bool = False

    @property
    def known_end(self) -> float:
        """Where the file's blocks end as far as the list says: no end while the last one is being written."""
        if not self.blocks:
            return 0
        if self.open_last:
            return math.inf
        last = self.blocks[-1]
        return last.start_offset + last.num_bytes

    def covering(self, offset: int, length: int) -> list[tuple[LocatedBlock, int, int]]:
        """(block, offset in block, length) for each block the file range touches.

        A range in the block being written is asked of its DataNodes whatever
        the NameNode knows of it: a DataNode serves such a block up to what
        its whole pipeline acknowledged, which covers every byte a caller can
        know of (the index references a record once its append was
        acknowledged).  Past that, the DataNode waits a few seconds for the
        bytes before refusing.
        """
        end = offset + length
        if offset < 0 or length < 0 or end > self.known_end:
            raise DataNodeReadError(f"bytes {offset}-{end} are past the {self.known_end} the NameNode knows of")
        pieces = []
        for index, block in enumerate(self.blocks):
            block_end = end if self.open_last and index == len(self.blocks) - 1 else block.start_offset + block.num_bytes
            lo, hi = max(offset, block.start_offset), min(end, block_end)
            if lo < hi:
                pieces.append((block, lo - block.start_offset, hi - lo))
        if sum(piece[2] for piece in pieces) != length:
            raise DataNodeReadError(f"bytes {offset}-{end}: the block list has a gap")
        return pieces


def fetch_block_list(webhdfs_url: str, full_path: str, user: str, timeout_s: float) -> BlockList:
    """Every block of ``full_path``, the one being written included, from WebHDFS's GET_BLOCK_LOCATIONS."""
    query = urllib.parse.urlencode({"op": "GET_BLOCK_LOCATIONS", "user.name": user, "offset": 0,
                                    "length": 1 << 62})
    url = f"{webhdfs_url.rstrip('/')}/webhdfs/v1{urllib.parse.quote(full_path)}?{query}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:  # 404 too: the caller's checked read tells a missing file
        raise DataNodeReadError(f"block locations of {full_path} from {webhdfs_url}: HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise DataNodeReadError(f"block locations of {full_path} from {webhdfs_url}: {exc}") from exc
    try:
        located = answer["LocatedBlocks"]
        items = list(located.get("locatedBlocks") or [])
        last = located.get("lastLocatedBlock")
        if last and (not items or items[-1]["block"]["blockId"] != last["block"]["blockId"]):
            items.append(last)
        blocks = tuple(_located(item) for item in items)
        open_last = bool(located.get("isUnderConstruction")) and not located.get("isLastBlockComplete", True)
        return BlockList(blocks, open_last=open_last and bool(blocks) and last is not None)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataNodeReadError(f"unexpected block locations of {full_path}: {exc}") from exc


# --- READ_BLOCK -------------------------------------------------------------


def _connect(address: tuple[str, int], timeout_s: float) -> socket.socket:
    """A TCP connection with a receive buffer set before the handshake (so the window can grow to it)."""
    error: OSError | None = None
    for family, kind, protocol, _, target in socket.getaddrinfo(*address, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(timeout_s)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
            sock.connect(target)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error if error is not None else OSError(f"no address for {address[0]}:{address[1]}")


def read_block(address: tuple[str, int], block: LocatedBlock, offset: int, out: memoryview,
               *, client_name: str, timeout_s: float) -> None:
    """Fill ``out`` with the block's bytes from ``offset`` on, from the DataNode at ``address``.

    Raises OSError/ValueError on a broken connection or a malformed reply and
    DataNodeReadError on an error status (the DataNode's message in it).
    """
    length = len(out)
    request = (field_bytes(1, block.header(client_name)) + field_varint(2, offset)
               + field_varint(3, length) + field_varint(4, 0))  # sendChecksums = false
    with _connect(address, timeout_s) as sock:
        sock.sendall(struct.pack(">hB", DATA_TRANSFER_VERSION, OP_READ_BLOCK) + varint(len(request)) + request)
        reply = fields(recv_delimited(sock, "DataNode"))
        status = one(reply, 1, -1)
        if status != STATUS_SUCCESS:
            message = one(reply, 5, b"")
            raise DataNodeReadError(
                f"DataNode {address[0]}:{address[1]} refused block {block.block_id} "
                f"(status {status}): {message.decode(errors='replace') if isinstance(message, bytes) else message}"
            )
        checksum_info = one(reply, 4)
        chunk_offset = offset
        if isinstance(checksum_info, bytes):
            chunk_offset = one(fields(checksum_info), 2, offset)
            if not isinstance(chunk_offset, int):
                raise ValueError("bad reply from the DataNode: chunkOffset is not a varint")
        # Data starts at a checksum-chunk boundary at or before ``offset`` and
        # ends at one at or after the end asked for.
        skip = offset - chunk_offset
        if not 0 <= skip < 1 << 20:
            raise ValueError(f"DataNode starts at {chunk_offset} for a read at {offset}")
        filled = 0
        header = bytearray(6)
        while True:
            recv_into(sock, memoryview(header), "DataNode")
            payload_len, header_len = struct.unpack(">iH", header)
            if not 4 <= payload_len <= MAX_PACKET_BYTES or header_len > MAX_PACKET_HEADER_BYTES:
                raise ValueError(f"bad packet from the DataNode: payload {payload_len}, header {header_len}")
            packet = fields(recv_bytes(sock, header_len, "DataNode"))
            data_len_field = one(packet, 4, b"\0\0\0\0")
            if not isinstance(data_len_field, bytes) or len(data_len_field) != 4:
                raise ValueError("bad packet header from the DataNode: dataLen is not a fixed 32-bit field")
            data_len = struct.unpack("<i", data_len_field)[0]
            checksum_len = payload_len - 4 - data_len
            if data_len < 0 or checksum_len < 0:
                raise ValueError(f"bad packet from the DataNode: payload {payload_len}, data {data_len}")
            if checksum_len:
                recv_bytes(sock, checksum_len, "DataNode")
            if data_len:
                take = min(skip, data_len)
                if take:
                    recv_bytes(sock, take, "DataNode")
                    skip -= take
                rest = data_len - take
                keep = min(rest, length - filled)
                recv_into(sock, out[filled:filled + keep], "DataNode")
                filled += keep
                if rest > keep:  # the end of the last checksum chunk
                    if rest - keep >= 1 << 20:
                        raise ValueError(f"the DataNode sent {rest - keep} bytes more than the {length} asked for")
                    recv_bytes(sock, rest - keep, "DataNode")
            if one(packet, 3, 0):  # lastPacketInBlock
                break
        if filled != length:
            raise ValueError(f"the DataNode sent {filled} of {length} bytes")
        # ClientReadStatusProto: the bytes arrived (not checksummed here; see the module's docstring).
        ack = field_varint(1, STATUS_SUCCESS)
        sock.sendall(varint(len(ack)) + ack)


class DataNodeReader:
    """Reads file ranges from the DataNodes, files being written included; block lists cached per file."""

    CACHED_FILES = 64
    # A DataNode that did not answer (refused, timed out, cut off, garbled) is
    # tried last for this long, so that a hung one costs one timeout, not one
    # per range read (the NameNode lists it first until it is declared dead).
    SUSPECT_S = 60.0

    def __init__(self, webhdfs_url: str, user: str = "pacs", timeout_s: float = 30.0) -> None:
        self.webhdfs_url = webhdfs_url
        self.user = user
        self.timeout_s = timeout_s
        self.client_name = f"pacs-datanode-reader-{os.getpid()}"
        self._lists: OrderedDict[str, BlockList] = OrderedDict()
        self._suspects: dict[tuple[str, int], float] = {}  # DataNode -> monotonic time it is trusted again
        self._lock = threading.Lock()

    def _block_list(self, full_path: str, end: int, *, fresh: bool) -> BlockList:
        with self._lock:
            cached = None if fresh else self._lists.get(full_path)
        if cached is not None and end <= cached.known_end:
            return cached
        blocks = fetch_block_list(self.webhdfs_url, full_path, self.user, self.timeout_s)
        with self._lock:
            self._lists[full_path] = blocks
            self._lists.move_to_end(full_path)
            while len(self._lists) > self.CACHED_FILES:
                self._lists.popitem(last=False)
        return blocks

    def forget(self, full_path: str) -> None:
        with self._lock:
            self._lists.pop(full_path, None)

    def read(self, full_path: str, offset: int, length: int) -> bytearray:
        """``length`` bytes of ``full_path`` from ``offset``; DataNodeReadError if no DataNode serves them."""
        out = bytearray(length)
        errors: list[str] = []
        for fresh in (False, True):
            try:
                pieces = self._block_list(full_path, offset + length, fresh=fresh).covering(offset, length)
            except DataNodeReadError as exc:
                errors.append(str(exc))
                continue
            if self._read_pieces(pieces, memoryview(out), errors):
                return out
        self.forget(full_path)
        raise DataNodeReadError(f"cannot read {length} bytes at {offset} of {full_path} from its DataNodes: "
                                + "; ".join(errors[-4:]))

    def _in_order(self, datanodes: tuple[tuple[str, int], ...]) -> list[tuple[str, int]]:
        """The NameNode's order, with DataNodes that lately did not answer moved last."""
        now = time.monotonic()
        with self._lock:
            suspect = {address for address, until in self._suspects.items() if until > now}
        return sorted(datanodes, key=lambda address: address in suspect)

    def _read_pieces(self, pieces: list[tuple[LocatedBlock, int, int]], out: memoryview, errors: list[str]) -> bool:
        filled = 0
        for block, offset_in_block, size in pieces:
            for address in self._in_order(block.datanodes):
                try:
                    read_block(address, block, offset_in_block, out[filled:filled + size],
                               client_name=self.client_name, timeout_s=self.timeout_s)
                except DataNodeReadError as exc:  # it answered: the replica, not the node, is the problem
                    errors.append(f"{address[0]}:{address[1]}: {exc}")
                    continue
                except (OSError, ValueError) as exc:
                    errors.append(f"{address[0]}:{address[1]}: {exc}")
                    with self._lock:
                        self._suspects[address] = time.monotonic() + self.SUSPECT_S
                    continue
                with self._lock:
                    self._suspects.pop(address, None)
                break
            else:
                return False
            filled += size
        return True
