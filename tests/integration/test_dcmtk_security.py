"""The calling-AE allow-list and DICOM over TLS, against dcmtk's tools."""

from __future__ import annotations

import logging
import socket
import subprocess
import time

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


@pytest.fixture
def tls_server(tmp_path):
    """A TLS-only SCP with a self-signed certificate: (its port, the certificate)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                           "-days", "1", "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    services = build_services(Settings(data_dir=tmp_path / "data", dicom={
        "port": free_port(), "tls_cert_file": str(cert), "tls_key_file": str(key)}))
    server = start_scp(services)
    yield str(services.settings.dicom.port), cert
    server.shutdown()
    services.close()


def test_tls_association_works_and_plain_one_fails(tls_server):
    port, cert = tls_server
    secure = run("echoscu", "+tla", "+cf", str(cert), "-aec", "PACS", "127.0.0.1", port)
    assert secure.returncode == 0, secure.stdout + secure.stderr
    plain = run("echoscu", "-to", "5", "-ta", "5", "-td", "5", "-aec", "PACS", "127.0.0.1", port)
    assert plain.returncode != 0


def test_a_silent_connection_to_the_tls_port_holds_up_no_one(tls_server, caplog):
    """A client that connects and never starts its handshake (a port scan, a load balancer's probe) is
    handshaken with on its association's thread; the port goes on accepting meanwhile."""
    port, cert = tls_server
    with socket.create_connection(("127.0.0.1", int(port))):
        secure = run("echoscu", "+tla", "+cf", str(cert), "-to", "10", "-ta", "10", "-td", "10",
                     "-aec", "PACS", "127.0.0.1", port)
        assert secure.returncode == 0, secure.stdout + secure.stderr
        with caplog.at_level(logging.WARNING, logger="pacs.net.reactor"):
            plain = run("echoscu", "-to", "5", "-ta", "5", "-td", "5", "-aec", "PACS", "127.0.0.1", port)
            assert plain.returncode != 0
            deadline = time.monotonic() + 5
            while "TLS handshake with 127.0.0.1:" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        assert "TLS handshake with 127.0.0.1:" in caplog.text and "failed" in caplog.text
