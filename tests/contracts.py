"""Behaviour every storage backend and every index database must show.

Test classes here are abstract: a module subclasses them and provides the
``blobs`` (a BlobStore) or ``services`` fixture for one backend, so the local
filesystem and HDFS, SQLite and Postgres pass the very same checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import xxhash

from pacs.errors import ChecksumMismatch, DuplicateConflict, InvalidObject, NotFound, StorageUnavailable
from pacs.index.models import Instance, Patient, Series, Study
from pacs.index.repository import find_instance, location_of
from pacs.ingest.service import StoreOutcome
from pacs.settings import DuplicatePolicy
from pacs.storage.objects import ObjectStore, read_pack_records
from pacs.synthetic import SeriesSpec, make_instance, make_series
from sqlalchemy import func, select


class BlobStoreContract:
    def test_write_read_whole_and_range(self, blobs):
        data = bytes(range(256)) * 1000
        assert blobs.write("t/a.bin", [data[:1000], data[1000:]]) == len(data)
        assert blobs.read("t/a.bin") == data
        assert blobs.read("t/a.bin", 1000, 5000) == data[1000:6000]
        assert b"".join(blobs.iter_read("t/a.bin", 10, 100_000, chunk_size=30_000)) == data[10:100_010]
        assert blobs.size("t/a.bin") == len(data)
        assert blobs.exists("t/a.bin")

    def test_read_past_the_end_fails_clearly(self, blobs):
        blobs.write("t/short.bin", [b"abc"])
        with pytest.raises(StorageUnavailable):
            blobs.read("t/short.bin", 0, 100)

    def test_never_overwrites(self, blobs):
        blobs.write("t/once.bin", [b"first"])
        with pytest.raises(FileExistsError):
            blobs.write("t/once.bin", [b"second"])
        assert blobs.read("t/once.bin") == b"first"

    def test_failed_write_leaves_nothing(self, blobs):
        def chunks():
            yield b"x" * 1000
            raise RuntimeError("source went away")

        with pytest.raises(Exception):
            blobs.write("t/broken.bin", chunks())
        assert not blobs.exists("t/broken.bin")

    def test_delete_and_missing(self, blobs):
        blobs.write("t/gone.bin", [b"abc"])
        assert blobs.delete("t/gone.bin") is True
        assert blobs.delete("t/gone.bin") is False
        assert not blobs.exists("t/gone.bin")
        with pytest.raises(NotFound):
            blobs.read("t/gone.bin")

    def test_list(self, blobs):
        blobs.write("l/x/1.bin", [b"1"])
        blobs.write("l/y/2.bin", [b"22"])
        assert sorted((i.path, i.size) for i in blobs.list("l")) == [("l/x/1.bin", 1), ("l/y/2.bin", 2)]
        assert list(blobs.list("nothing-here")) == []

    def test_rejects_escaping_paths(self, blobs):
        with pytest.raises(ValueError):
            blobs.write("../escape.bin", [b"x"])

    def test_object_store_packs_and_verifies(self, blobs):
        objects = ObjectStore(blobs)
        payloads = [hashlib.sha256(str(i).encode()).digest() * (100 + i) for i in range(5)]
        landed = [objects.put([p]) for p in payloads]
        assert all(loc.is_landing for loc in landed)
        path, placed = objects.write_pack((str(i), loc) for i, loc in enumerate(landed))
        for i, payload in enumerate(payloads):
            assert objects.get(placed[str(i)]) == payload
            assert objects.get_range(placed[str(i)], 3, 10) == payload[3:13]
            assert objects.checksum(placed[str(i)]) == landed[i].sha256
        # the record headers hold each object's SHA-256; the XXH3-64 reads verify is the index's
        assert list(read_pack_records(blobs, path)) == [replace(placed[str(i)], xxh3=None) for i in range(5)]
        assert all(placed[str(i)].xxh3 == xxhash.xxh3_64_hexdigest(p) for i, p in enumerate(payloads))
        with pytest.raises(ChecksumMismatch, match="expected xxh3 0000000000000000"):
            objects.get(replace(placed["0"], xxh3="0" * 16))
        with pytest.raises(ChecksumMismatch, match="expected sha256"):
            objects.get(replace(placed["0"], sha256="0" * 64, xxh3=None))


def count(session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


class IngestContract:
    """Needs a ``services`` fixture (pacs.services.Services) for one backend pair."""

    def test_round_trip_byte_exact(self, services):
        spec = SeriesSpec(study_key="rt", series_key="rt-1", rows=64, columns=64, count=30)
        sent = list(make_series(spec))
        results = [services.ingest.store(b, source_ae="TEST") for b in sent]
        assert {r.outcome for r in results} == {StoreOutcome.STORED}
        services.compactor.compact(force=True)
        with services.db.session() as session:
            for data, result in zip(sent, results):
                row = find_instance(session, result.sop_instance_uid)
                assert row.packed
                assert services.objects.get(location_of(row)) == data
                assert row.sha256 == hashlib.sha256(data).hexdigest()
                assert row.xxh3 == xxhash.xxh3_64_hexdigest(data)
            series = session.scalars(select(Series).where(Series.series_instance_uid == results[0].series_instance_uid)).one()
            assert series.num_instances == 30
            assert series.study.num_instances == 30 and series.study.num_series == 1
            assert series.study.modalities_in_study == "CT"

    def test_same_instance_twice_is_one_row(self, services):
        data = make_instance(SeriesSpec(study_key="dup", series_key="dup-1", rows=32, columns=32), 0)
        first = services.ingest.store(data)
        second = services.ingest.store(data)
        assert (first.outcome, second.outcome) == (StoreOutcome.STORED, StoreOutcome.DUPLICATE)
        with services.db.session() as session:
            assert session.scalar(
                select(func.count()).select_from(Instance).where(Instance.sop_instance_uid == first.sop_instance_uid)
            ) == 1
            series = session.scalars(select(Series).where(Series.series_instance_uid == first.series_instance_uid)).one()
            assert series.num_instances == 1

    def test_different_bytes_follow_the_policy(self, services):
        spec = SeriesSpec(study_key="pol", series_key="pol-1", rows=32, columns=32)
        original = make_instance(spec, 0, seed=1)
        changed = make_instance(spec, 0, seed=1).replace(b"DOE^JANE", b"DOE^JOAN")
        services.ingest.store(original)
        assert services.ingest.store(changed).outcome is StoreOutcome.KEPT_EXISTING
        services.ingest.settings.duplicate_policy = DuplicatePolicy.REJECT
        with pytest.raises(DuplicateConflict):
            services.ingest.store(changed)
        services.ingest.settings.duplicate_policy = DuplicatePolicy.OVERWRITE
        result = services.ingest.store(changed)
        assert result.outcome is StoreOutcome.OVERWRITTEN
        assert services.objects.get(result.location) == changed

    @pytest.mark.parametrize(
        "mutilate, message",
        [
            (lambda b: b[: len(b) - 700], "truncated"),
            (lambda b: b"this is not DICOM at all" * 20, "not a DICOM Part 10 file"),
            (lambda b: b[:100], "not a DICOM Part 10 file"),
        ],
        ids=["truncated", "not-dicom", "tiny"],
    )
    def test_malformed_is_rejected_and_nothing_written(self, services, mutilate, message):
        data = make_instance(SeriesSpec(study_key="bad", series_key="bad-1", rows=32, columns=32), 0)
        before = sorted(i.path for i in services.objects.blobs.list(""))
        with pytest.raises(InvalidObject, match=message):
            services.ingest.store(mutilate(data))
        assert sorted(i.path for i in services.objects.blobs.list("")) == before
        with services.db.session() as session:
            assert count(session, Instance) == 0 and count(session, Patient) == 0

    def test_missing_sop_instance_uid_is_rejected(self, services):
        import io

        import pydicom

        ds = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(rows=16, columns=16), 0)))
        del ds.SOPInstanceUID
        del ds.file_meta.MediaStorageSOPInstanceUID
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        with pytest.raises(InvalidObject, match="missing required SOPInstanceUID"):
            services.ingest.store(buf.getvalue())
        assert list(services.objects.blobs.list("")) == []
        with services.db.session() as session:
            assert count(session, Study) == 0
