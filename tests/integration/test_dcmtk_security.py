"""The calling-AE allow-list and DICOM over TLS, against dcmtk's tools."""

from __future__ import annotations

import logging
import socket
import subprocess
import time

import pytest

from pacs.index.models import RemoteAE
from pacs.net.reactor import awaiting_request
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


def test_objects_stored_over_tls_are_found_and_retrieved_over_tls_byte_for_byte(tls_server, tmp_path):
    """storescu and findscu over TLS (dcmtk), and a C-GET over TLS (pynetdicom: getscu has no TLS):
    the archive's replies and sub-operations go out on an SSL socket, which has no sendmsg, as whole
    PDUs joined a write at a time; an image of 1 MB is several such writes."""
    import io
    import ssl

    import pydicom
    from pynetdicom import AE, build_role, evt
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from pacs.net.stored import StoredObject

    port, cert = tls_server
    folder = tmp_path / "sent"
    folder.mkdir()
    spec = SeriesSpec(patient_id="TLS1", study_key="tls", series_key="tls-1", rows=724, columns=724, count=3)
    sent = {}
    for i in range(spec.count):
        data = make_instance(spec, i)
        sent[pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID] = data
        (folder / f"{i}.dcm").write_bytes(data)
    stored = run("storescu", "+tla", "+cf", str(cert), "-aec", "PACS", "+sd", "127.0.0.1", port, str(folder))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    first = pydicom.dcmread(folder / "0.dcm", stop_before_pixels=True)
    found_dir = tmp_path / "found"
    found_dir.mkdir()
    found = run("findscu", "+tla", "+cf", str(cert), "-aec", "PACS", "-S", "-X", "-od", str(found_dir),
                "-k", "QueryRetrieveLevel=IMAGE", "-k", "PatientID=TLS1", "-k", "SOPInstanceUID",
                "-k", f"StudyInstanceUID={first.StudyInstanceUID}", "-k", f"SeriesInstanceUID={first.SeriesInstanceUID}",
                "127.0.0.1", port)
    assert found.returncode == 0, found.stdout + found.stderr
    assert {pydicom.dcmread(f).SOPInstanceUID for f in found_dir.iterdir()} == set(sent)

    received = {}

    def on_store(event):  # noqa: ANN001, ANN202
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(include_meta=False)
        return 0x0000

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="TLSGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # as stored: sent without conversion
    assoc = ae.associate("127.0.0.1", int(port), ae_title="PACS", tls_args=(context, "localhost"),
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = first.StudyInstanceUID
        statuses = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000
    for uid, data in sent.items():  # the data set as stored, byte for byte
        assert received[uid] == StoredObject(data, sop_class_uid=CTImageStorage, sop_instance_uid=uid,
                                             transfer_syntax_uid=ExplicitVRLittleEndian).dataset_bytes()


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


@pytest.fixture
def patient_server(tmp_path):
    """An SCP that gives a peer the default minute to send its association request, at most two associations."""
    services = build_services(Settings(data_dir=tmp_path / "data", dicom={
        "port": free_port(), "network_timeout_s": 60, "max_associations": 2}))
    server = start_scp(services)
    yield server, services.settings.dicom.port
    server.shutdown()
    services.close()


def _waiting_for_request(server) -> int:  # noqa: ANN001 - pynetdicom's server
    """The server's associations whose connection is open and whose A-ASSOCIATE-RQ has not come."""
    return sum(1 for assoc in server.ae.active_associations if awaiting_request(assoc))


def _until(condition, timeout_s: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _closed_reported(caplog) -> int:  # noqa: ANN001
    """How many closed waiting connections the WARNINGs so far count."""
    return sum(int(r.getMessage().split()[1]) for r in caplog.records
               if "connection(s) that sent no association request" in r.getMessage())


def test_connections_closed_before_their_request_leave_nothing_behind(patient_server):
    """What a TCP health check or a port scan does — connect, close — ends the association at once, not
    after the ACSE timeout: a hundred of them left the port rejecting every association for a minute."""
    server, port = patient_server
    for _ in range(100):
        socket.create_connection(("127.0.0.1", port)).close()
    assert _until(lambda: _waiting_for_request(server) == 0), f"{_waiting_for_request(server)} still waiting"
    echo = run("echoscu", "-aec", "PACS", "127.0.0.1", str(port))
    assert echo.returncode == 0, echo.stdout + echo.stderr


def test_connections_that_never_speak_crowd_out_no_one(patient_server, caplog, monkeypatch):
    """Connections that say nothing do not count against the association limit, and past
    MAX_WAITING_CONNECTIONS the oldest of them are closed, each counted in a WARNING."""
    from pacs.net import scp

    monkeypatch.setattr(scp, "CLOSED_REPORT_INTERVAL_S", 1.0)
    server, port = patient_server
    silent = []
    try:
        with caplog.at_level(logging.WARNING, logger="pacs.net.scp"):
            for _ in range(scp.MAX_WAITING_CONNECTIONS + 36):
                silent.append(socket.create_connection(("127.0.0.1", port)))
            assert _until(lambda: _waiting_for_request(server) == scp.MAX_WAITING_CONNECTIONS), \
                f"{_waiting_for_request(server)} waiting"
            echo = run("echoscu", "-aec", "PACS", "127.0.0.1", str(port))
            assert echo.returncode == 0, echo.stdout + echo.stderr
            time.sleep(1.0)
            socket.create_connection(("127.0.0.1", port)).close()  # tells those closed since the first WARNING
            # 36 closed for the silent ones past the cap, one more to make room for echoscu's
            assert _until(lambda: _closed_reported(caplog) == 37), caplog.text
        # The server closed the oldest: each reads as ended (b"" or a reset); the newest are still open.
        for sock in silent[:36]:
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        silent[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            silent[-1].recv(1)
    finally:
        for sock in silent:
            sock.close()


def test_associations_past_the_limit_are_rejected_as_transient(patient_server, caplog):
    """dicom.max_associations counts associations whose request came; one more is told to retry later."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    server, port = patient_server
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="PACS") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        with caplog.at_level(logging.WARNING, logger="pacs.net.access"):
            refused = run("echoscu", "-aec", "PACS", "127.0.0.1", str(port))
        assert refused.returncode != 0
        assert "Rejected Transient" in refused.stdout + refused.stderr
        assert "Local Limit Exceeded" in refused.stdout + refused.stderr
        assert "2 associations already" in caplog.text and "dicom.max_associations=2" in caplog.text
        held.pop().release()
        assert _until(lambda: sum(1 for a in server.ae.active_associations if a.is_acceptor) <= 1)
        echo = run("echoscu", "-aec", "PACS", "127.0.0.1", str(port))
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        for assoc in held:
            assoc.release()
