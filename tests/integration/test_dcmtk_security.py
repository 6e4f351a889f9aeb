"""The calling-AE allow-list and DICOM over TLS, against dcmtk's tools."""

from __future__ import annotations

import subprocess

import pytest

from pacs.index.models import RemoteAE
from pacs.net.scp import start_scp
from pacs.services import build_services
from pacs.settings import Settings
from pacs.synthetic import SeriesSpec, make_instance
from tests.integration.dicom_tools import DCMTK_ENV, NEEDS_DCMTK, free_port

pytestmark = NEEDS_DCMTK


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


@pytest.fixture
def guarded(tmp_path):
    services = build_services(Settings(data_dir=tmp_path / "data", dicom={"port": free_port(), "require_known_ae": True}))
    with services.db.session() as session:
        session.add(RemoteAE(ae_title="MODALITY", host="127.0.0.1", port=104))
        session.add(RemoteAE(ae_title="VIEWER", host="localhost", port=105, may_store=False))
        session.add(RemoteAE(ae_title="ELSEWHERE", host="192.0.2.10", port=104))
    server = start_scp(services)
    yield services
    server.shutdown()
    services.close()


def test_unknown_calling_ae_is_rejected(guarded):
    port = str(guarded.settings.dicom.port)
    rejected = run("echoscu", "-aet", "STRANGER", "-aec", "PACS", "127.0.0.1", port)
    assert rejected.returncode != 0
    assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
    assert run("echoscu", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", port).returncode == 0
    assert run("echoscu", "-aet", "VIEWER", "-aec", "PACS", "127.0.0.1", port).returncode == 0  # localhost resolves
    wrong_host = run("echoscu", "-aet", "ELSEWHERE", "-aec", "PACS", "127.0.0.1", port)
    assert wrong_host.returncode != 0


def test_an_ae_without_store_permission_cannot_store(guarded, tmp_path):
    port = str(guarded.settings.dicom.port)
    path = tmp_path / "x.dcm"
    path.write_bytes(make_instance(SeriesSpec(rows=8, columns=8), 0))
    refused = run("storescu", "-v", "-aet", "VIEWER", "-aec", "PACS", "127.0.0.1", port, str(path))
    assert "Status: 0x124" in refused.stdout + refused.stderr  # refused: not authorised
    accepted = run("storescu", "-v", "-aet", "MODALITY", "-aec", "PACS", "127.0.0.1", port, str(path))
    assert "Success" in accepted.stdout + accepted.stderr


def test_tls_association_works_and_plain_one_fails(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                           "-days", "1", "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    services = build_services(Settings(data_dir=tmp_path / "data", dicom={
        "port": free_port(), "tls_cert_file": str(cert), "tls_key_file": str(key)}))
    server = start_scp(services)
    try:
        port = str(services.settings.dicom.port)
        secure = run("echoscu", "+tla", "+cf", str(cert), "-aec", "PACS", "127.0.0.1", port)
        assert secure.returncode == 0, secure.stdout + secure.stderr
        plain = run("echoscu", "-to", "5", "-ta", "5", "-td", "5", "-aec", "PACS", "127.0.0.1", port)
        assert plain.returncode != 0
    finally:
        server.shutdown()
        services.close()
