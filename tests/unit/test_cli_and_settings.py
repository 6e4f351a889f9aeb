from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pacs.cli.main import app
from pacs.settings import DuplicatePolicy, Settings, StorageBackend
from pacs.synthetic import SeriesSpec, make_series

runner = CliRunner()


def test_help_lists_the_subcommands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "store", "ls", "info", "db", "storage", "synth"):
        assert command in result.output


def test_store_ls_info_verify(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, data in enumerate(make_series(SeriesSpec(patient_id="CLI01", patient_name="CLI^TEST", rows=16,
                                                    columns=16, count=4))):
        (src / f"{i}.dcm").write_bytes(data)
    (src / "notes.txt").write_text("not dicom")
    data_dir = tmp_path / "data"
    result = runner.invoke(app, ["store", "--data-dir", str(data_dir), str(src)])
    assert result.exit_code == 1  # one file failed
    assert "4 stored; 1 failed" in result.output
    assert "not a DICOM Part 10 file" in result.output
    assert (data_dir / "index.sqlite").is_file()

    result = runner.invoke(app, ["ls", "--data-dir", str(data_dir)])
    assert result.exit_code == 0
    assert "CLI01" in result.output and "CLI^TEST" in result.output

    result = runner.invoke(app, ["info", "--data-dir", str(data_dir)])
    assert "instances: 4" in result.output

    # The embedded default appends objects straight into one pack: nothing lands, nothing to compact.
    assert [p.relative_to(data_dir / "store").parts[0] for p in (data_dir / "store").rglob("*") if p.is_file()] == ["packs"]
    result = runner.invoke(app, ["storage", "compact", "--all", "--data-dir", str(data_dir)])
    assert result.exit_code == 0 and "0 objects" in result.output
    result = runner.invoke(app, ["storage", "verify", "--data-dir", str(data_dir)])
    assert result.exit_code == 0 and "4 objects checked, 0 problems" in result.output


def test_verify_reports_a_corrupted_pack(tmp_path):
    data_dir = tmp_path / "data"
    runner.invoke(app, ["synth", str(tmp_path / "in"), "--studies", "1", "--series", "1", "--instances", "3",
                        "--size", "16"])
    runner.invoke(app, ["store", "--data-dir", str(data_dir), str(tmp_path / "in")])
    runner.invoke(app, ["storage", "compact", "--all", "--data-dir", str(data_dir)])
    pack = next((data_dir / "store" / "packs").rglob("*.pack"))
    raw = bytearray(pack.read_bytes())
    raw[-10] ^= 0xFF
    pack.chmod(0o640)
    pack.write_bytes(bytes(raw))
    result = runner.invoke(app, ["storage", "verify", "--data-dir", str(data_dir)])
    assert result.exit_code == 1
    assert "1 problems" in result.output and "expected sha256" in result.output


def test_store_of_a_missing_path_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["store", "--data-dir", str(tmp_path), str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such file or folder" in result.output


def test_db_upgrade_and_current(tmp_path):
    from pacs.index.migrate import head_revision

    head = head_revision()
    result = runner.invoke(app, ["db", "upgrade", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and f"revision {head}" in result.output
    result = runner.invoke(app, ["db", "current", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0 and result.output.startswith(head)


def test_migrations_build_the_schema_of_the_models(tmp_path):
    from pacs.index.database import Database
    from pacs.index.migrate import drift, upgrade

    older = Database(f"sqlite:///{tmp_path / 'older.sqlite'}")
    db = Database(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        upgrade(older, "0003")  # a schema from before migration 0004: the comparison sees what 0004 changes
        differences = drift(older)
        assert [d[0] for d in differences] == ["remove_index"] and "ix_series_updated_at" in str(differences)
        upgrade(db)
        assert drift(db) == []
    finally:
        older.dispose()
        db.dispose()


def test_settings_from_environment_and_file(tmp_path, monkeypatch):
    config = tmp_path / "pacs.toml"
    config.write_text('[storage]\nbackend = "hdfs"\nreplication = 2\nduplicate_policy = "reject"\n')
    monkeypatch.setenv("PACS_CONFIG", str(config))
    monkeypatch.setenv("PACS_INDEX_URL", "postgresql+psycopg2://u:p@db:5432/pacs")
    monkeypatch.setenv("PACS_STORAGE__HDFS_ROOT", "/archive")
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "d"))
    settings = Settings()
    assert settings.storage.backend is StorageBackend.HDFS
    assert settings.storage.replication == 2
    assert settings.storage.duplicate_policy is DuplicatePolicy.REJECT
    assert settings.storage.hdfs_root == "/archive"
    assert settings.index_url == "postgresql+psycopg2://u:p@db:5432/pacs"
    assert settings.data_dir == Path(tmp_path / "d")
    monkeypatch.setenv("PACS_REPLICATION", "1")  # the environment beats the file
    assert Settings().storage.replication == 1


def test_bad_settings_name_the_value(monkeypatch):
    monkeypatch.setenv("PACS_STORAGE_BACKEND", "s3")
    with pytest.raises(Exception, match="s3"):
        Settings()
    monkeypatch.delenv("PACS_STORAGE_BACKEND")
    monkeypatch.setenv("PACS_CONFIG", "/nonexistent/pacs.toml")
    with pytest.raises(Exception, match="/nonexistent/pacs.toml"):
        Settings()


def test_embedded_default_lives_under_one_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path / "fresh")
    assert settings.index_url == f"sqlite:///{tmp_path / 'fresh' / 'index.sqlite'}"
    assert settings.local_store_root == tmp_path / "fresh" / "store"


def test_serve_workers_on_a_port_in_use_fails_with_the_address(tmp_path, monkeypatch):
    import socket

    for key in ("PACS_AET", "PACS_DICOM_PORT", "PACS_DICOM__HOST", "PACS_DATA_DIR"):
        monkeypatch.setenv(key, "")  # recorded, so that what serve sets for its workers is undone
        monkeypatch.delenv(key)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--data-dir", str(tmp_path / "data"), "--dicom-port", str(port),
                                     "--workers", "2"])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
