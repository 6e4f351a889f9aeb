"""Landing area, packing and the crash-safety of compaction (embedded backends)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from pacs.errors import IndexUnavailable
from pacs.index.models import Container, ContainerState, Instance
from pacs.index.repository import find_instance, location_of
from pacs.ingest.service import StoreOutcome
from pacs.services import build_services
from pacs.settings import Settings
from pacs.synthetic import SeriesSpec, make_series


def small_settings(tmp_path, **storage) -> Settings:
    """The local backend with objects landing one file each (as on HDFS), and small thresholds."""
    base = dict(append_packs=False, landing_compact_at=20, landing_max_files=40, pack_target_mb=1)
    base.update(storage)
    return Settings(data_dir=tmp_path / "data", storage=base)


def blob_paths(services) -> list[str]:
    return sorted(i.path for i in services.objects.blobs.list(""))


def test_landing_area_stays_bounded_and_packs_hold_everything(tmp_path):
    services = build_services(small_settings(tmp_path))
    sent = list(make_series(SeriesSpec(study_key="b", series_key="b1", rows=64, columns=64, count=200)))
    peak = 0
    for data in sent:
        services.ingest.store(data)
        peak = max(peak, sum(1 for p in blob_paths(services) if p.startswith("landing/")))
    services.compactor.wait()
    services.compactor.compact(force=True)
    assert peak <= 40 + 1  # landing_max_files, plus the one being stored
    paths = blob_paths(services)
    assert all(p.startswith("packs/") for p in paths)
    # one pack per compaction trigger (every ~20 objects here), never one file per object
    assert len(paths) <= len(sent) // 20 + 2


def test_packs_fill_to_the_target_size(tmp_path):
    services = build_services(small_settings(tmp_path, landing_compact_at=1000, landing_max_files=2000))
    sent = list(make_series(SeriesSpec(study_key="f", series_key="f1", rows=128, columns=128, count=100)))
    for data in sent:
        services.ingest.store(data)
    services.compactor.wait()
    services.compactor.compact(force=True)
    sizes = sorted(i.size for i in services.objects.blobs.list("packs"))
    total = sum(len(d) for d in sent)
    assert sum(sizes) == total + 48 * len(sent)
    assert len(sizes) <= total // (1 << 20) + 2
    services.close()
    with services.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert [services.objects.get(location_of(r)) for r in rows] == sent
    services.close()


def test_crash_before_switch_leaves_an_abandoned_pack_that_is_removed(tmp_path):
    services = build_services(small_settings(tmp_path, landing_compact_at=1000, landing_max_files=2000))
    sent = list(make_series(SeriesSpec(study_key="c", series_key="c1", rows=32, columns=32, count=5)))
    for data in sent:
        services.ingest.store(data)
    # Simulate a compactor that wrote its pack and died before switching the index.
    with services.db.session() as session:
        picked = [(str(r.id), location_of(r)) for r in session.scalars(select(Instance))]
    path, _placed = services.objects.write_pack(picked)
    with services.db.session() as session:
        session.add(Container(path=path, state=ContainerState.WRITING))
    report = services.compactor.compact(force=True)
    assert report.abandoned_packs_removed == 1
    assert path not in blob_paths(services)
    with services.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert all(r.packed for r in rows)
        assert [services.objects.get(location_of(r)) for r in rows] == sent
    services.close()


def test_switch_skips_rows_that_changed_meanwhile(tmp_path):
    services = build_services(small_settings(tmp_path, landing_compact_at=1000, landing_max_files=2000))
    data = next(make_series(SeriesSpec(study_key="d", series_key="d1", rows=16, columns=16, count=1)))
    result = services.ingest.store(data)
    original = services.objects.write_pack  # a concurrent overwrite lands while the pack is written

    def write_pack_then_move(objects, path=None):
        out = original(objects, path)
        with services.db.session() as session:
            session.execute(update(Instance).values(container="landing/20990101/000000-moved.dcm"))
        return out

    services.objects.write_pack = write_pack_then_move
    services.compactor.compact(force=True)
    with services.db.session() as session:
        row = find_instance(session, result.sop_instance_uid)
        assert row.container == "landing/20990101/000000-moved.dcm" and not row.packed
    # the landing file the row pointed to before was not removed: nothing switched away from it
    assert result.location.container in blob_paths(services)
    services.close()


def test_index_failure_removes_the_written_bytes(tmp_path, monkeypatch):
    services = build_services(small_settings(tmp_path))
    data = next(make_series(SeriesSpec(study_key="e", series_key="e1", rows=16, columns=16, count=1)))

    def broken(*args, **kwargs):
        raise IndexUnavailable("index database unavailable: simulated")

    monkeypatch.setattr("pacs.ingest.service.add_instance", broken)
    with pytest.raises(IndexUnavailable):
        services.ingest.store(data)
    assert blob_paths(services) == []
    monkeypatch.undo()
    assert services.ingest.store(data).outcome.value == "stored"
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    services.close()


def test_one_compactor_at_a_time(tmp_path):
    settings = small_settings(tmp_path)
    first, second = build_services(settings), build_services(settings)
    assert first.compactor._acquire_lease()
    assert not second.compactor._acquire_lease()
    first.compactor._release_lease()
    assert second.compactor._acquire_lease()
    second.compactor._release_lease()
    first.close()
    second.close()


def test_a_corrupt_landed_object_is_left_in_place_and_the_rest_packed(tmp_path):
    services = build_services(small_settings(tmp_path, landing_compact_at=1000, landing_max_files=2000))
    sent = list(make_series(SeriesSpec(study_key="g", series_key="g1", rows=16, columns=16, count=4)))
    results = [services.ingest.store(data) for data in sent]
    bad = services.objects.blobs.root / results[1].location.container
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    report = services.compactor.compact(force=True)
    assert report.objects_packed == 3 and report.unreadable == [results[1].location.container]
    with services.db.session() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance))}
    assert not rows[results[1].sop_instance_uid].packed
    assert all(rows[r.sop_instance_uid].packed for r in results if r is not results[1])
    services.close()


def test_concurrent_compactions_in_one_process_do_not_collide(tmp_path):
    import threading

    services = build_services(small_settings(tmp_path, landing_compact_at=1000, landing_max_files=2000))
    sent = list(make_series(SeriesSpec(study_key="h", series_key="h1", rows=32, columns=32, count=60)))
    for data in sent:
        services.ingest.store(data)
    errors = []

    def run():
        try:
            services.compactor.compact(force=True, wait_for_lease=True)
        except Exception as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with services.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert all(r.packed for r in rows)
        assert [services.objects.get(location_of(r)) for r in rows] == sent
    services.close()


def test_a_pack_that_cannot_be_written_leaves_everything_in_place(tmp_path, monkeypatch):
    """The store failing in the middle of a pack (a DataNode gone): nothing moves, the next compaction packs."""
    from pacs.errors import StorageUnavailable

    services = build_services(small_settings(tmp_path, landing_compact_at=1000, landing_max_files=2000))
    sent = list(make_series(SeriesSpec(study_key="w", series_key="w1", rows=32, columns=32, count=30)))
    for data in sent:
        services.ingest.store(data)
    blobs = services.objects.blobs
    real_write = blobs.write

    def failing_write(path, chunks):
        def some_then_fail():
            for n, chunk in enumerate(chunks):
                if n == 5:
                    raise StorageUnavailable(f"write of {path} failed: DataNode gone")
                yield chunk
        return real_write(path, some_then_fail())

    monkeypatch.setattr(blobs, "write", failing_write)
    before = blob_paths(services)
    report = services.compactor.compact(force=True)
    assert report.write_failed and "DataNode gone" in report.write_failed and report.packs_written == 0
    assert blob_paths(services) == before  # no partial pack left, every landing file still there
    with services.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Container)) == 0
        assert session.scalar(select(func.count()).where(Instance.packed.is_(True))) == 0
    monkeypatch.setattr(blobs, "write", real_write)
    report = services.compactor.compact(force=True)
    assert report.objects_packed == len(sent) and report.write_failed is None
    with services.db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
        assert [services.objects.get(location_of(r)) for r in rows] == sent
    services.close()


def test_a_store_that_committed_is_not_failed_by_the_landing_count_after_it(tmp_path, monkeypatch, caplog):
    """The count after a store runs on another connection; the index going away between the two must
    not turn a stored, indexed instance into a reported failure (the sender would be told to retry)."""
    import pacs.storage.compaction as compaction

    services = build_services(small_settings(tmp_path))
    data = next(iter(make_series(SeriesSpec(study_key="g", series_key="g1", rows=32, columns=32, count=1))))

    def index_gone(session):
        raise IndexUnavailable("index database unavailable: server closed the connection unexpectedly")

    monkeypatch.setattr(compaction, "landing_totals", index_gone)
    result = services.ingest.store(data)
    assert result.outcome is StoreOutcome.STORED
    with services.db.session() as session:
        assert find_instance(session, result.sop_instance_uid) is not None
    assert "could not count the landing area after a store" in caplog.text
    services.close()
