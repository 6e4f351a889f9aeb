"""Reading many objects at once: objects lying together in a pack are read with one range read per span."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import xxhash
from sqlalchemy import select

from pacs.errors import ChecksumMismatch, StorageUnavailable
from pacs.index.models import Instance
from pacs.index.repository import location_of
from pacs.net import qr
from pacs.services import build_services
from pacs.settings import Settings
from pacs.storage.objects import RECORD_HEADER, Location, in_planned_order, plan_spans
from pacs.storage.scrub import scrub
from pacs.synthetic import SeriesSpec, make_series


def loc(offset: int, length: int, container: str = "packs/a.pack") -> Location:
    return Location(container, offset, length, "0" * 64)


def test_objects_next_to_each_other_form_one_span_in_their_order():
    h = RECORD_HEADER.size
    objects = [loc(h, 100), loc(2 * h + 100, 100), loc(3 * h + 200, 100)]
    (span,) = plan_spans(objects, max_bytes=1 << 20)
    assert span.locations == tuple(objects)
    assert (span.start, span.end, span.size) == (h, 3 * h + 300, 2 * h + 300)


@pytest.mark.parametrize("second, why", [
    (loc(148, 100, "packs/b.pack"), "another container"),
    (loc(0, 100), "lies before the first"),
    (loc(100 + 48 + (64 << 10) + 1, 100), "gap over 64 KiB"),
    (loc(148, 1000), "span over max_bytes"),
])
def test_a_span_ends_where_the_next_object_is_not_close_behind(second, why):
    first = loc(0, 100)
    spans = list(plan_spans([first, second], max_bytes=1000))
    assert [s.locations for s in spans] == [(first,), (second,)], why


def test_an_object_larger_than_a_span_is_read_alone_and_zero_means_one_read_each():
    big, small = loc(0, 5000), loc(5048, 10)
    assert [s.locations for s in plan_spans([big, small], max_bytes=1000)] == [(big,), (small,)]
    objects = [loc(i * 148, 100) for i in range(5)]
    assert [s.locations for s in plan_spans(objects, max_bytes=0)] == [(o,) for o in objects]


def test_a_series_interleaved_across_two_packs_is_read_a_pack_run_at_a_time_and_put_back_in_order():
    """Four associations into two serving processes: instance i lies in pack a or b, each pack in arrival order."""
    step = RECORD_HEADER.size + 100
    objects = [loc((i // 2) * step, 100, "packs/a.pack" if i % 2 == 0 else "packs/b.pack") for i in range(12)]
    assert len(list(plan_spans(objects, max_bytes=1 << 20))) == 12  # in series order: one object per span
    spans = list(plan_spans(objects, max_bytes=1 << 20, window=600))  # runs of 6 objects
    assert [(s.container, s.positions) for s in spans] == [
        ("packs/a.pack", (0, 2, 4)), ("packs/b.pack", (1, 3, 5)),
        ("packs/a.pack", (6, 8, 10)), ("packs/b.pack", (7, 9, 11))]
    assert all(s.locations == tuple(objects[i] for i in s.positions) for s in spans)
    read = [(s, [f"object {i}" for i in s.positions]) for s in spans]
    assert list(in_planned_order(read)) == [f"object {i}" for i in range(12)]


def test_within_a_run_objects_are_read_in_pack_order_whatever_order_they_are_asked_in():
    h = RECORD_HEADER.size
    objects = [loc(i * (h + 100), 100) for i in range(5)][::-1]
    (span,) = plan_spans(objects, max_bytes=1 << 20, window=1 << 20)
    assert span.positions == (4, 3, 2, 1, 0) and span.start == 0
    assert [s.positions for s in plan_spans(objects, max_bytes=1 << 20)] == [(0,), (1,), (2,), (3,), (4,)]


@pytest.fixture
def stored(tmp_path):
    """An embedded archive holding one 40-instance series in one pack, its span size set to 64 KiB."""
    services = build_services(Settings(data_dir=tmp_path / "data"))
    sent = list(make_series(SeriesSpec(study_key="spans", series_key="spans-1", rows=32, columns=32, count=40)))
    for data in sent:
        services.ingest.store(data)
    with services.db.session() as session:
        locations = [location_of(r) for r in session.scalars(select(Instance).order_by(Instance.id))]
    services.objects.blobs.span_bytes = 64 << 10
    reads: list[tuple[str, int, int]] = []
    read = services.objects.blobs.read
    services.objects.blobs.read = lambda path, offset=0, length=None: reads.append((path, offset, length)) or read(
        path, offset, length)
    yield services, sent, locations, reads
    services.close()


def test_read_many_reads_a_span_at_a_time_and_verifies_each_object(stored):
    services, sent, locations, reads = stored
    assert list(services.objects.read_many(locations)) == sent
    spans = list(services.objects.plan_spans(locations))
    assert 1 < len(spans) < len(locations) // 5  # 40 objects of ~2.4 kB, 64 KiB spans
    assert reads == [(s.container, s.start, s.size) for s in spans]


def test_a_retrieve_gets_each_object_of_a_span_as_a_view_of_the_one_buffer_read(stored):
    """A retrieve sends each object and drops it: the objects of a span read whole are views of its
    buffer, not copies; every other reader gets bytes of their own."""
    services, sent, locations, reads = stored
    (span, *_) = list(services.objects.plan_spans(locations))
    assert len(span.locations) > 1
    viewed = services.objects.read_span(span, views=True)
    assert all(isinstance(data, memoryview) for data in viewed)
    assert len({id(data.obj) for data in viewed}) == 1  # one buffer under them all
    assert [bytes(data) for data in viewed] == sent[:len(span.locations)]
    assert all(type(data) is bytes for data in services.objects.read_span(span))
    items = [qr._ToSend(f"uid{i}", "1.2", "1.2.840.10008.1.2.1", location) for i, location in enumerate(locations)]
    assert [bytes(data) for _, data in qr._read_ahead(services.objects, items)] == sent


def test_an_object_whose_bytes_changed_fails_alone(stored):
    services, sent, locations, reads = stored
    victim = locations[3]
    path = services.objects.blobs.root / victim.container
    with open(path, "r+b") as f:
        f.seek(victim.offset + victim.length - 1)
        last = f.read(1)
        f.seek(victim.offset + victim.length - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    results = list(services.objects.read_many(locations))
    assert isinstance(results[3], ChecksumMismatch) and f"expected xxh3 {victim.xxh3}" in str(results[3])
    assert results[:3] + results[4:] == sent[:3] + sent[4:]
    with pytest.raises(ChecksumMismatch):
        list(services.objects.get_many(locations))
    # a row from before reads had an XXH3-64 to check: its SHA-256 catches the same flip
    results = list(services.objects.read_many(replace(location, xxh3=None) for location in locations))
    assert isinstance(results[3], ChecksumMismatch) and f"expected sha256 {victim.sha256}" in str(results[3])
    assert results[:3] + results[4:] == sent[:3] + sent[4:]


def test_reads_verify_the_xxh3_and_the_scrub_both_checksums(stored):
    services, sent, locations, reads = stored
    assert all(location.xxh3 == xxhash.xxh3_64_hexdigest(data) for location, data in zip(locations, sent))
    # a wrong SHA-256 beside the right XXH3-64 still reads: the read checks the XXH3-64 only
    assert list(services.objects.read_many(replace(location, sha256="0" * 64) for location in locations)) == sent
    assert scrub(services.db, services.objects).problems == []
    with services.db.session() as session:
        victim = session.scalars(select(Instance).order_by(Instance.id).offset(5).limit(1)).one()
        victim.xxh3, uid = "0" * 16, victim.sop_instance_uid
    report = scrub(services.db, services.objects)
    assert report.checked == len(sent)
    assert [(problem_uid, "not the xxh3 0000000000000000" in problem) for problem_uid, problem in report.problems] == [
        (uid, True)]


def test_a_span_that_cannot_be_read_is_read_object_by_object(stored, monkeypatch):
    services, sent, locations, reads = stored
    longest = max(location.length for location in locations)
    read = services.objects.blobs.read

    def no_long_reads(path, offset=0, length=None):  # noqa: ANN001, ANN202 - a store failing large reads only
        if length > longest:
            raise StorageUnavailable(f"cannot read {length} bytes of {path}")
        return read(path, offset, length)

    services.objects.blobs.read = no_long_reads
    monkeypatch.setattr("pacs.storage.objects.time.sleep", lambda s: None)  # the retries' pauses
    assert list(services.objects.read_many(locations)) == sent
    assert [length for _, _, length in reads] == [location.length for location in locations]


def test_a_retrieve_reads_ahead_a_bounded_number_of_spans_and_keeps_the_order(stored):
    services, sent, locations, reads = stored
    services.objects.blobs.span_bytes = 0  # one object per span: count the spans read ahead
    services.objects.blobs.read_ahead = depth = 2  # as on HDFS
    released = threading.Event()
    started: list[Location] = []
    read_span = services.objects.read_span

    def gated(span, **kwargs):  # noqa: ANN001, ANN202
        started.append(span.locations[0])
        if len(started) > 1:
            released.wait(10)
        return read_span(span, **kwargs)

    services.objects.read_span = gated
    items = [qr._ToSend(f"uid{i}", "1.2", "1.2.840.10008.1.2.1", location) for i, location in enumerate(locations)]
    ahead = qr._read_ahead(services.objects, items)
    first, data = next(ahead)
    assert (first, data) == (items[0], sent[0])
    deadline = time.monotonic() + 10
    while len(started) < 1 + depth and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time enough to start more reads, if it would
    assert len(started) == 1 + depth  # the one handed out and read_ahead behind it, no more
    released.set()
    rest = list(ahead)
    assert [item for item, _ in rest] == items[1:] and [data for _, data in rest] == sent[1:]


def test_a_retrieve_from_the_local_store_reads_each_span_on_the_sending_thread_when_needed(stored):
    services, sent, locations, reads = stored
    assert services.objects.blobs.read_ahead == 0
    readers: list[threading.Thread] = []
    read_span = services.objects.read_span

    def recorded(span, **kwargs):  # noqa: ANN001, ANN202
        readers.append(threading.current_thread())
        return read_span(span, **kwargs)

    services.objects.read_span = recorded
    items = [qr._ToSend(f"uid{i}", "1.2", "1.2.840.10008.1.2.1", location) for i, location in enumerate(locations)]
    ahead = qr._read_ahead(services.objects, items)
    assert next(ahead) == (items[0], sent[0]) and len(readers) == 1  # nothing read before it is asked for
    rest = list(ahead)
    assert [item for item, _ in rest] == items[1:] and [data for _, data in rest] == sent[1:]
    assert set(readers) == {threading.current_thread()}


def test_objects_asked_for_against_their_pack_order_are_read_in_spans_and_come_back_in_the_asked_order(stored):
    services, sent, locations, reads = stored
    backwards = locations[::-1]
    assert list(services.objects.read_many(backwards)) == sent[::-1]
    assert 1 < len(reads) < len(locations) // 5  # spans of 64 KiB planned over runs of 128 KiB, not 40 reads
    reads.clear()
    items = [qr._ToSend(f"uid{i}", "1.2", "1.2.840.10008.1.2.1", location) for i, location in enumerate(backwards)]
    got = list(qr._read_ahead(services.objects, items))
    assert [item for item, _ in got] == items and [data for _, data in got] == sent[::-1]
    assert 1 < len(reads) < len(locations) // 5

