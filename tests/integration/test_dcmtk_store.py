"""dcmtk's echoscu and storescu against the archive's SCP (embedded backends)."""

from __future__ import annotations

import io
import socket
import subprocess
import time

import pydicom
import pytest

from pacs.index.repository import find_instance, location_of
from pacs.net.scp import start_scp
from pacs.synthetic import SeriesSpec, make_instance, make_series
from tests.integration.dicom_tools import DCMTK_ENV, NEEDS_DCMTK, free_port

pytestmark = NEEDS_DCMTK


@pytest.fixture
def scp(embedded):
    embedded.settings.dicom.port = free_port()
    server = start_scp(embedded)
    yield embedded
    server.shutdown()


def dataset_bytes(part10: bytes) -> bytes:
    """The bytes after the file meta group: what travelled over the association."""
    ds = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True)
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    return part10[meta_end:]


def test_echoscu(scp):
    done = subprocess.run(["echoscu", "-aec", "PACS", "127.0.0.1", str(scp.settings.dicom.port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_storescu_series_is_stored_as_sent(scp, tmp_path):
    sent = list(make_series(SeriesSpec(study_key="dcmtk", series_key="dcmtk-1", rows=64, columns=64, count=12)))
    for i, data in enumerate(sent):
        (tmp_path / f"{i:03d}.dcm").write_bytes(data)
    done = subprocess.run(
        ["storescu", "-aec", "PACS", "127.0.0.1", str(scp.settings.dicom.port), *sorted(map(str, tmp_path.glob("*.dcm")))],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with scp.db.session() as session:
        for data in sent:
            uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            row = find_instance(session, uid)
            assert row is not None, f"{uid} was not stored"
            stored = scp.objects.get(location_of(row))
            assert dataset_bytes(stored) == dataset_bytes(data)
            assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_truncated_file_gets_a_failure_and_the_server_keeps_serving(scp, tmp_path):
    good = next(make_series(SeriesSpec(study_key="dcmtk2", series_key="d2", rows=32, columns=32, count=1)))
    # A dataset whose pixel data element claims more bytes than it has: storescu
    # sends what the file holds, the SCP's structure check refuses it.
    bad = bytearray(good)
    bad[-2048 - 4: -2048] = (len(good)).to_bytes(4, "little")
    (tmp_path / "bad.dcm").write_bytes(bytes(bad[:-100]))
    subprocess.run(["storescu", "-aec", "PACS", "127.0.0.1", str(scp.settings.dicom.port), str(tmp_path / "bad.dcm")],
                   env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    with scp.db.session() as session:
        assert find_instance(session, pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID) is None
    (tmp_path / "good.dcm").write_bytes(good)
    done = subprocess.run(["storescu", "-aec", "PACS", "127.0.0.1", str(scp.settings.dicom.port), str(tmp_path / "good.dcm")],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with scp.db.session() as session:
        assert find_instance(session, pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID) is not None


# the client's own reactor thread dies of the cut, which is the point
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_association_dropped_mid_store_leaves_nothing(scp):
    """A connection that dies in the middle of a C-STORE stores nothing; the SCP serves on."""
    import threading
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    big = make_instance(SeriesSpec(study_key="cut", series_key="cut-1", rows=3000, columns=3000), 0)  # ~18 MB
    ae = AE(ae_title="CUTTER")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    ae.maximum_pdu_size = 16382  # many small PDUs, so the cut falls inside the dataset
    assoc = ae.associate("127.0.0.1", scp.settings.dicom.port, ae_title="PACS")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    real_send = assoc.dul.socket.send
    sent = 0

    def send_then_cut(data):
        # the network goes away after 4 MB of the ~18 MB dataset
        nonlocal sent
        sent += len(data)
        if sent > 4_000_000:
            sock.shutdown(socket.SHUT_RDWR)
            raise OSError("connection cut by the test")
        real_send(data)

    assoc.dul.socket.send = send_then_cut
    def send():
        try:
            assoc.send_c_store(pydicom.dcmread(io.BytesIO(big)))
        except Exception:  # noqa: BLE001 - the cut is the point
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(timeout=5)  # pynetdicom may go on waiting for the response that never comes
    time.sleep(1.0)
    assert sent > 4_000_000
    with scp.db.session() as session:
        assert find_instance(session, pydicom.dcmread(io.BytesIO(big)).SOPInstanceUID) is None
    assert list(scp.objects.blobs.list("")) == []
    done = subprocess.run(["echoscu", "-aec", "PACS", "127.0.0.1", str(scp.settings.dicom.port)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


UNKNOWN_SOP_CLASS = "1.2.826.0.1.3680043.10.1484.77.1"
# storescu proposes SOP classes it does not know only from a configuration profile
UNKNOWN_PROFILE = f"""[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[UnknownContexts]
PresentationContext1 = {UNKNOWN_SOP_CLASS}\\Uncompressed

[[Profiles]]
[Unknown]
PresentationContexts = UnknownContexts
"""


@pytest.mark.parametrize("accept", [False, True])
def test_unknown_sop_class_is_stored_only_when_the_setting_allows(embedded, tmp_path, accept):
    from pacs.index.models import RemoteAE
    from tests.integration.dicom_tools import storescp

    embedded.settings.dicom.port = free_port()
    embedded.settings.dicom.accept_unknown_sop_classes = accept
    server = start_scp(embedded)
    contexts_before = [(c.abstract_syntax, list(c.transfer_syntax), c.scu_role, c.scp_role) for c in server.contexts]
    try:
        ds = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(study_key="unknown-sop", rows=16, columns=16), 0)))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UNKNOWN_SOP_CLASS
        path = tmp_path / "unknown.dcm"
        ds.save_as(path, enforce_file_format=True)
        (tmp_path / "unknown.cfg").write_text(UNKNOWN_PROFILE)
        done = subprocess.run(["storescu", "-xf", str(tmp_path / "unknown.cfg"), "Unknown", "-aec", "PACS",
                               "127.0.0.1", str(embedded.settings.dicom.port), str(path)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        with embedded.db.session() as session:
            row = find_instance(session, ds.SOPInstanceUID)
        if not accept:
            assert done.returncode != 0 and "No Acceptable Presentation Contexts" in done.stderr
            assert row is None
            return
        assert done.returncode == 0, done.stderr
        assert row is not None and row.sop_class_uid == UNKNOWN_SOP_CLASS
        # the context added for the unknown class belonged to that association, not to the server
        assert [(c.abstract_syntax, list(c.transfer_syntax), c.scu_role, c.scp_role)
                for c in server.contexts] == contexts_before
        # and it goes out again: C-MOVE to a storescp that accepts any SOP class
        out = tmp_path / "moved"
        out.mkdir()
        with storescp("UNKDEST", out, "--promiscuous") as port:
            with embedded.db.session() as session:
                session.add(RemoteAE(ae_title="UNKDEST", host="127.0.0.1", port=port))
            moved = subprocess.run(["movescu", "-S", "-aec", "PACS", "-aem", "UNKDEST", "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "127.0.0.1",
                                    str(embedded.settings.dicom.port)], env=DCMTK_ENV, capture_output=True, text=True,
                                   timeout=60)
            assert moved.returncode == 0, moved.stderr
        (received,) = list(out.iterdir())
        assert dataset_bytes(received.read_bytes()) == dataset_bytes(path.read_bytes())
    finally:
        server.shutdown()


def test_a_move_longer_than_the_network_timeout_ends_cleanly(embedded, tmp_path):
    """The requester is silent while a C-MOVE sends; that must not count as an idle association."""
    from pacs.index.models import RemoteAE
    from tests.integration.dicom_tools import storescp

    embedded.settings.dicom.port = free_port()
    embedded.settings.dicom.network_timeout_s = 0.5
    spec = SeriesSpec(study_key="long-move", series_key="long-move-1", rows=128, columns=128, count=3000)
    for data in make_series(spec):
        embedded.ingest.store(data)
    server = start_scp(embedded)
    out = tmp_path / "moved"
    out.mkdir()
    try:
        with storescp("LONGMOVE", out) as port:
            with embedded.db.session() as session:
                session.add(RemoteAE(ae_title="LONGMOVE", host="127.0.0.1", port=port))
            started = time.monotonic()
            done = subprocess.run(["movescu", "-S", "-aec", "PACS", "-aem", "LONGMOVE", "-k", "QueryRetrieveLevel=STUDY",
                                   "-k", f"StudyInstanceUID={pydicom.dcmread(io.BytesIO(make_instance(spec, 0))).StudyInstanceUID}",
                                   "127.0.0.1", str(embedded.settings.dicom.port)],
                                  env=DCMTK_ENV, capture_output=True, text=True, timeout=300)
            took = time.monotonic() - started
        # 3.7-4.1 s on dev-2c (2 cores): the margin allows for a machine and an archive several times as fast
        assert took > 0.75, "the move must outlast the network timeout for this test to mean anything"
        assert done.returncode == 0, done.stderr
        assert "Peer aborted" not in done.stderr
        assert len(list(out.iterdir())) == 3000
    finally:
        server.shutdown()
