"""BufferChain: a received object stored without joining its parts into a new copy."""

from __future__ import annotations

import io
import random

from pacs.index.repository import find_instance, location_of
from pacs.ingest.service import BufferChain
from pacs.synthetic import SeriesSpec, make_instance


def test_reads_and_seeks_like_the_joined_bytes() -> None:
    rng = random.Random(7)
    head, body = rng.randbytes(132), io.BytesIO(rng.randbytes(5000))
    whole = head + body.getvalue()
    with body.getbuffer() as view, BufferChain(head, view) as chain:
        for _ in range(500):
            start, count = rng.randrange(len(whole) + 50), rng.randrange(3000)
            chain.seek(start)
            assert chain.read(count) == whole[start:start + count]
        chain.seek(-10, io.SEEK_END)
        assert chain.read() == whole[-10:]
    body.write(b"more")  # the views are released: the owner may resize its buffer again


def test_ingest_stores_a_chain_byte_for_byte(embedded) -> None:
    data = make_instance(SeriesSpec(study_key="chain", rows=32, columns=32), 0)
    with BufferChain(data[:200], memoryview(data)[200:]) as chain:
        result = embedded.ingest.store(chain)
    with embedded.db.session() as session:
        stored = embedded.objects.get(location_of(find_instance(session, result.sop_instance_uid)))
    assert stored == data
