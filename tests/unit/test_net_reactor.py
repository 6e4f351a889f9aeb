"""The event-driven association threads (pacs.net.reactor) against pynetdicom peers, in process."""

from __future__ import annotations

import hashlib
import io
import logging
import re
import socket
import struct
import threading
import time

import pydicom
import pytest
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification

from pacs.index.repository import find_instance, location_of
from pacs.net import reactor
from pacs.net.reactor import (
    MAX_OTHER_DATA_SET_BYTES,
    EventDrivenAE,
    EventDrivenDUL,
    _recv_exactly,
    make_event_driven,
)
from pacs.net.scp import MAX_PDU_LENGTH
from pacs.net.transport import REQUESTOR_HANDLERS
from pacs.synthetic import SeriesSpec, make_instance, make_series
from tests.conftest import start_recorded_scp


def _associate(services, *contexts, ae_cls=EventDrivenAE):
    ae = ae_cls(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts:
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", services.settings.dicom.port, ae_title="PACS", evt_handlers=REQUESTOR_HANDLERS)
    assert assoc.is_established
    return assoc


def _store_each(services, blobs) -> list[int]:
    """The C-STORE status of each object, sent over one association of its own."""
    assoc = _associate(services, CTImageStorage)
    try:
        return [assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status for data in blobs]
    finally:
        assoc.release()


def test_both_sides_run_the_event_driven_threads(scp):
    services, accepted = scp
    assoc = _associate(services, Verification)
    try:
        assert isinstance(assoc.dul, EventDrivenDUL)
        assert assoc.send_c_echo().Status == 0
        assert len(accepted) == 1 and isinstance(accepted[0].dul, EventDrivenDUL)
        for side in (assoc, accepted[0]):  # PDUs read into one buffer on both sides
            assert side.dul.socket.recv.__func__ is _recv_exactly
    finally:
        assoc.release()
    assert assoc.is_released
    deadline = time.monotonic() + 5
    while accepted[0].is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted[0].is_released and not accepted[0].is_alive()


def test_many_stores_back_to_back_get_every_response(scp):
    """The requestor's reactor must never take a C-STORE response meant for the sender."""
    services, _ = scp
    blobs = list(make_series(SeriesSpec(study_key="reactor", series_key="r1", rows=16, columns=16, count=150)))
    assoc = _associate(services, CTImageStorage)
    statuses = []
    try:
        for data in blobs:
            statuses.append(assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).get("Status"))
    finally:
        assoc.release()
    assert statuses == [0] * len(blobs)
    with services.db.session() as session:
        for data in blobs:
            uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            assert find_instance(session, uid) is not None


def test_a_silent_peer_is_aborted_after_the_network_timeout(scp):
    services, accepted = scp
    aborted = threading.Event()
    started = time.monotonic()  # before the association: the archive's idle timer starts during its set-up
    assoc = _associate(services, Verification)
    assoc.bind(evt.EVT_ABORTED, lambda event: aborted.set())
    assert aborted.wait(10), "the archive did not abort an association silent past its network timeout"
    waited = time.monotonic() - started
    assert 0.8 < waited < 5, f"expected an abort after about 1 s (the network timeout), got {waited:.1f} s"
    # the archive sends its A-ABORT before it marks its side aborted: the peer can see it first
    deadline = time.monotonic() + 5
    while not accepted[0].is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted[0].is_aborted


def _read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU from a raw socket (header and body), or what came before the connection closed."""
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack_from(">L", data, 2)[0]:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return data


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_a_pdu_announced_longer_than_the_archive_takes_is_refused_unread(scp, caplog, pdu_type):
    """Six bytes from anyone who can connect no longer make the archive allocate what they claim."""
    services, accepted = scp
    with socket.create_connection(("127.0.0.1", services.settings.dicom.port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0) + b"\0" * 1024)
        answer = _read_pdu(sock)
        assert answer == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])  # A-ABORT: provider, invalid parameter
        assert sock.recv(1) == b""  # and the connection closed, not left to the ACSE timeout
    assert f"a PDU of type 0x{pdu_type:02X} announced 4294967280 bytes" in caplog.text


def test_an_undecodable_association_request_is_logged_in_one_line(scp, caplog):
    """A malformed A-ASSOCIATE-RQ (AE titles that are not text) is aborted and logged as one line naming
    the peer, without pynetdicom's tracebacks (one per codec tried, one for the PDU)."""
    services, _accepted = scp
    body = struct.pack(">HH", 1, 0) + bytes(range(0xC0, 0xE0)) + b"\0" * 32  # version, reserved, called, calling
    with caplog.at_level(logging.DEBUG, logger="pynetdicom"), \
            socket.create_connection(("127.0.0.1", services.settings.dicom.port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
        answer = _read_pdu(sock)
    assert answer[0] == 0x07  # an A-ABORT
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    message = lines[0].getMessage()
    assert message.startswith("association with 127.0.0.1:") and "a PDU of type 0x01 (74 bytes) could not be decoded" \
        in message, message
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


def test_a_pdu_of_unknown_type_is_aborted_and_logged_with_the_peer(scp, caplog):
    services, _accepted = scp
    with socket.create_connection(("127.0.0.1", services.settings.dicom.port), timeout=5) as sock:
        sock.sendall(bytes([0x09, 0, 0, 0, 0, 4]) + b"abcd")
        answer = _read_pdu(sock)
    assert answer[0] == 0x07  # an A-ABORT
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("association with 127.0.0.1:") \
        and "a PDU of unknown type 0x09 (10 bytes)" in errors[0], errors


def test_a_data_pdu_longer_than_announced_aborts_an_established_association(scp, caplog):
    services, accepted = scp
    aborted = threading.Event()
    assoc = _associate(services, Verification)
    assoc.bind(evt.EVT_ABORTED, lambda event: aborted.set())
    assert assoc.acceptor.maximum_length == MAX_PDU_LENGTH  # what the archive announced
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, MAX_PDU_LENGTH + (1 << 20)))
    assert aborted.wait(5)
    deadline = time.monotonic() + 5
    while not accepted[0].is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted[0].is_aborted
    assert f"announced {MAX_PDU_LENGTH + (1 << 20)} bytes, more than the {MAX_PDU_LENGTH} bytes" in caplog.text


@pytest.fixture
def kept(monkeypatch) -> list[int]:
    """The size of the receiver's in-memory data set buffer after each write to it."""
    sizes: list[int] = []

    class Recording(io.BytesIO):
        def write(self, data) -> int:  # noqa: ANN001
            written = super().write(data)
            sizes.append(self.tell())
            return written

    monkeypatch.setattr(reactor, "BytesIO", Recording)
    return sizes


def test_a_data_set_past_the_object_limit_is_refused_without_being_kept(embedded, caplog, kept):
    """One peer sending more than the archive would store cannot fill its memory: the data set is no
    longer kept once past storage.max_object_mb, the store is refused (A700), the association goes on."""
    embedded.settings.storage.max_object_mb = 1
    server, _accepted = start_recorded_scp(embedded, network_timeout_s=10.0)
    try:
        big = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(rows=2048, columns=2048, series_key="big"), 0)))
        small = pydicom.dcmread(io.BytesIO(make_instance(SeriesSpec(rows=8, columns=8, series_key="small"), 0)))
        assoc = _associate(embedded, CTImageStorage)
        try:
            statuses = [assoc.send_c_store(big).Status, assoc.send_c_store(small).Status]
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0xA700, 0x0000]
    assert f"C-STORE of {big.SOPInstanceUID} from TESTSCU refused: its data set passed 1 MB" in caplog.text
    received = int(re.search(r"; (\d+) bytes received", caplog.text).group(1))
    assert max(kept) <= MAX_PDU_LENGTH < received  # of all that came, one PDU's worth was held at most
    with embedded.db.session() as session:
        assert find_instance(session, big.SOPInstanceUID) is None
        assert find_instance(session, small.SOPInstanceUID) is not None


def test_a_large_data_set_goes_on_in_a_file_and_is_stored_whole(embedded, kept):
    """Past the AE's spool_received_bytes a data set being received is held in an unnamed file, not in
    memory; the object stored is the bytes sent, under the SHA-256 of those bytes."""
    server, _accepted = start_recorded_scp(embedded, network_timeout_s=10.0)
    server.ae.spool_received_bytes = 1 << 20
    try:
        big = make_instance(SeriesSpec(rows=2048, columns=2048, series_key="big"), 0)
        small = make_instance(SeriesSpec(rows=8, columns=8, series_key="small"), 0)
        assoc = _associate(embedded, CTImageStorage)
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).Status for data in (big, small)]
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0x0000, 0x0000]
    assert max(kept) <= (1 << 20) + MAX_PDU_LENGTH  # of the 8 MiB of pixels, the spool limit and a PDU at most
    for data in (big, small):
        sent = pydicom.dcmread(io.BytesIO(data))
        with embedded.db.session() as session:
            instance = find_instance(session, sent.SOPInstanceUID)
        stored = embedded.objects.get(location_of(instance))
        assert hashlib.sha256(stored).hexdigest() == instance.sha256
        received = pydicom.dcmread(io.BytesIO(stored))
        assert received.PixelData == sent.PixelData and received.SOPInstanceUID == sent.SOPInstanceUID


def test_a_query_whose_identifier_passes_the_limit_aborts_the_association(scp, caplog):
    """pynetdicom assembles the messages the archive does not decode itself with no limit of its own."""
    services, accepted = scp
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.add_new(0x00091010, "OB", b"\0" * (MAX_OTHER_DATA_SET_BYTES + 2 * MAX_PDU_LENGTH))
    assoc = _associate(services, StudyRootQueryRetrieveInformationModelFind)
    aborted = threading.Event()
    assoc.bind(evt.EVT_ABORTED, lambda event: aborted.set())
    responses = list(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind))
    assert aborted.wait(5)
    assert all(status is None or not status for status, _ in responses)  # no answer came
    assert f"a C-FIND-RQ passed the {MAX_OTHER_DATA_SET_BYTES} bytes taken for its data set" in caplog.text
    deadline = time.monotonic() + 5
    while not accepted[0].is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted[0].is_aborted


def test_an_abort_from_the_peer_ends_the_association(scp):
    services, accepted = scp
    ended = threading.Event()
    assoc = _associate(services, Verification)
    deadline = time.monotonic() + 5
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    accepted[0].bind(evt.EVT_ABORTED, lambda event: ended.set())
    assoc.abort()
    assert ended.wait(5)
    assert accepted[0].is_aborted and not accepted[0].is_established


def test_a_release_request_is_answered_without_waiting_for_the_idle_period(scp, monkeypatch):
    import pacs.net.reactor as reactor

    services, _accepted = scp
    monkeypatch.setattr(reactor, "IDLE_WAIT_S", 3.0)  # the reactor's wait for a message
    assoc = _associate(services, Verification)
    assert assoc.send_c_echo().Status == 0
    started = time.monotonic()
    assoc.release()
    assert assoc.is_released
    assert time.monotonic() - started < 1.5  # not after the reactor's 3 s wait ran out


def test_only_an_association_that_has_not_started_can_be_made_event_driven(scp):
    services, _ = scp
    assoc = _associate(services, Verification)
    try:
        with pytest.raises(RuntimeError, match="has not started"):
            make_event_driven(assoc)
    finally:
        assoc.release()


@pytest.mark.parametrize("max_pdu", [0, 64, 16384])
def test_messages_written_in_one_piece_are_framed_as_pynetdicom_reads_them(max_pdu):
    from pynetdicom.pdu import P_DATA_TF

    from pacs.net.reactor import _fragment

    command, dataset = bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 400
    parts: list = []
    _fragment(parts, 7, memoryview(command), 0x01, max_pdu)
    _fragment(parts, 7, memoryview(dataset), 0x00, max_pdu)
    stream = b"".join(parts)
    got = {0x01: b"", 0x00: b""}
    lasts = []
    while stream:
        length = int.from_bytes(stream[2:6], "big")
        assert max_pdu == 0 or length <= max_pdu
        pdu = P_DATA_TF()
        pdu.decode(stream[:6 + length])
        stream = stream[6 + length:]
        ((context_id, value),) = pdu.to_primitive().presentation_data_value_list
        assert context_id == 7
        got[value[0] & 0x01] += value[1:]
        lasts.append((value[0] & 0x01, bool(value[0] & 0x02)))
    assert got == {0x01: command, 0x00: dataset}
    # exactly one last fragment per part, at the end of it
    assert [flag for kind, flag in lasts if kind == 0x01][-1] and sum(f for k, f in lasts if k == 0x01) == 1
    assert lasts[-1] == (0x00, True) and sum(f for k, f in lasts if k == 0x00) == 1


@pytest.mark.parametrize("watched", [False, True])
def test_find_responses_sent_whole_decode_as_sent(scp, watched):
    """Each match's response is the cached command set plus its identifier; with a DIMSE handler bound, the usual path."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    services, _ = scp
    studies = {}
    for n in range(12):
        data = next(make_series(SeriesSpec(patient_id=f"FIND{n:02d}", patient_name=f"FIND^{n:02d}",
                                           study_key=f"find-{n}", series_key=f"find-{n}-1", rows=8, columns=8, count=1)))
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        studies[ds.StudyInstanceUID] = str(ds.PatientName)
        services.ingest.store(data)
    sent = []
    assoc = _associate(services, StudyRootQueryRetrieveInformationModelFind)
    if watched:
        accepted = scp[1][-1]
        accepted.bind(evt.EVT_DIMSE_SENT, lambda event: sent.append(event.message))
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "FIND^*"
    query.StudyInstanceUID = ""
    try:
        responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finally:
        assoc.release()
    pending = [(status.Status, identifier) for status, identifier in responses if status.Status in (0xFF00, 0xFF01)]
    assert responses[-1][0].Status == 0
    assert {i.StudyInstanceUID: str(i.PatientName) for _, i in pending} == studies
    assert all(i.QueryRetrieveLevel == "STUDY" for _, i in pending)
    assert (len(sent) >= len(studies)) is watched  # the handler saw every response only on the usual path


def test_get_sends_every_object_and_thins_pending_responses(scp):
    """Sub-operations carry the stored bytes; Pending responses come at most every PENDING_INTERVAL_S."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_role
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    from pacs.net.reactor import PENDING_INTERVAL_S

    services, _ = scp
    spec = SeriesSpec(patient_id="GET01", patient_name="GET^01", study_key="get-1", series_key="get-1-1",
                      rows=8, columns=8, count=40)
    sent = {}
    for data in make_series(spec):
        ds = pydicom.dcmread(io.BytesIO(data))
        sent[ds.SOPInstanceUID] = ds
        services.ingest.store(data)
    received = {}

    def on_store(event):
        received[event.dataset.SOPInstanceUID] = event.dataset
        return 0x0000

    ae = EventDrivenAE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", services.settings.dicom.port, ae_title="PACS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[*REQUESTOR_HANDLERS, (evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = next(iter(sent.values())).StudyInstanceUID
    query.SeriesInstanceUID = next(iter(sent.values())).SeriesInstanceUID
    started = time.monotonic()
    try:
        responses = [status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    elapsed = time.monotonic() - started
    final = responses[-1]
    assert final.Status == 0 and final.NumberOfCompletedSuboperations == 40 and final.NumberOfFailedSuboperations == 0
    assert received.keys() == sent.keys()
    for uid, ds in sent.items():
        assert received[uid].PixelData == ds.PixelData and received[uid].PatientName == ds.PatientName
    pending = [s for s in responses if s.Status == 0xFF00]
    assert 1 <= len(pending) <= 1 + elapsed / PENDING_INTERVAL_S
    assert all(0 <= s.NumberOfRemainingSuboperations < 40 for s in pending)


def test_an_association_that_stored_is_summed_up_in_one_log_line(scp, caplog):
    services, accepted = scp
    blobs = list(make_series(SeriesSpec(study_key="tally", series_key="t1", rows=16, columns=16, count=4)))
    assoc = _associate(services, CTImageStorage)
    with caplog.at_level("DEBUG", logger="pacs.net.scp"):
        try:
            statuses = [assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).get("Status") for data in blobs[:3]]
            statuses.append(assoc.send_c_store(pydicom.dcmread(io.BytesIO(blobs[0]))).get("Status"))
        finally:
            assoc.release()
        deadline = time.monotonic() + 5
        while accepted[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert statuses == [0] * 4
    lines = [r.getMessage() for r in caplog.records if r.name == "pacs.net.scp"]
    summary = [line for line in lines if "ended:" in line]
    assert len(summary) == 1, lines
    assert "from TESTSCU" in summary[0] and "4 C-STORE (1 duplicate, 3 stored)" in summary[0]
    per_instance = [r for r in caplog.records if r.name == "pacs.net.scp" and r.levelname == "DEBUG"]
    assert len(per_instance) == 4


def test_an_association_writes_first_only_while_it_has_sent_nothing_twice(scp, monkeypatch):
    """The first store is looked up first; then each store of an association that has stored
    only new instances is written first; once it re-sends anything, never again."""
    from pacs.ingest.service import IngestService

    services, _ = scp
    asked = []
    store = IngestService.store

    def watched(self, source, **kwargs):  # noqa: ANN001
        asked.append(kwargs.get("write_first"))
        return store(self, source, **kwargs)

    monkeypatch.setattr(IngestService, "store", watched)
    blobs = list(make_series(SeriesSpec(study_key="first", series_key="f1", rows=16, columns=16, count=5)))
    sent = [blobs[0], blobs[1], blobs[2], blobs[1], blobs[3], blobs[4]]  # the fourth is a re-send
    for round_ in range(2):
        asked.clear()
        assert _store_each(services, sent) == [0] * 6
        if round_ == 0:
            assert asked == [False, True, True, True, False, False]
        else:  # all re-sends: never written first
            assert asked == [False] * 6


def test_stores_are_served_without_pynetdicoms_storage_scp_and_failures_keep_their_status(scp, monkeypatch):
    from pydicom.dataset import Dataset
    from pynetdicom.service_class import StorageServiceClass

    services, _ = scp

    def not_here(*_args, **_kwargs):
        raise AssertionError("pynetdicom's Storage SCP served a request the reactor decodes")

    monkeypatch.setattr(StorageServiceClass, "SCP", not_here)
    blobs = list(make_series(SeriesSpec(study_key="direct", series_key="d1", rows=16, columns=16, count=3)))
    broken = Dataset()  # no Study/Series UID: ingest refuses it with 0xC000 and a comment
    broken.SOPClassUID, broken.SOPInstanceUID = CTImageStorage, "1.2.3.999"
    broken.file_meta = pydicom.dataset.FileMetaDataset()
    broken.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    assoc = _associate(services, CTImageStorage)
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))) for data in blobs]
        failure = assoc.send_c_store(broken)
        after = assoc.send_c_store(pydicom.dcmread(io.BytesIO(blobs[0])))
    finally:
        assoc.release()
    assert [s.Status for s in statuses] == [0, 0, 0] and after.Status == 0
    assert failure.Status == 0xC000 and "StudyInstanceUID" in failure.ErrorComment


def test_a_held_checkpoint_reports_the_reactor_parked_and_gives_up_on_a_dead_one():
    import queue

    from pacs.net.reactor import _WakingCheckpoint

    checkpoint = _WakingCheckpoint(queue.Queue())
    checkpoint.set()
    first, proceed, second = threading.Event(), threading.Event(), threading.Event()

    def reactor() -> None:
        checkpoint.wait()
        first.set()
        proceed.wait(5)
        checkpoint.wait()
        second.set()

    thread = threading.Thread(target=reactor)
    thread.start()
    assert first.wait(5)  # the checkpoint was open: the first wait returned at once
    checkpoint.clear()
    proceed.set()
    assert checkpoint.hold(thread.is_alive, 5.0)  # the second wait parks, and says so
    assert not second.is_set()
    checkpoint.set()
    thread.join(5)
    assert second.is_set() and not thread.is_alive()
    checkpoint.clear()
    started = time.monotonic()
    assert not checkpoint.hold(thread.is_alive, 5.0) and time.monotonic() - started < 1  # nobody will park
    assert not checkpoint.hold(lambda: True, 0.05)  # and a live one that does not, within the timeout


def test_a_sender_may_leave_the_reactor_paused_between_requests_but_not_for_long():
    import queue

    from pacs.net.reactor import LINGER_S, _WakingCheckpoint

    checkpoint = _WakingCheckpoint(queue.Queue())
    resumed = []

    def reactor() -> None:
        while checkpoint.wait() and not resumed:
            resumed.append(time.monotonic())

    checkpoint.clear()
    thread = threading.Thread(target=reactor)
    thread.start()
    assert checkpoint.hold(thread.is_alive, 5.0)
    checkpoint.linger()  # a request answered: paused for the next one
    assert checkpoint.take_lingering()  # the next one comes at once and takes the pause as it is
    time.sleep(3 * LINGER_S)
    assert not resumed  # taken: the reactor stays paused however long that request takes
    checkpoint.linger()
    lingered = time.monotonic()
    thread.join(5)
    assert resumed and LINGER_S * 0.9 <= resumed[0] - lingered < 1.0  # no next request: it resumed by itself
    assert checkpoint.is_set() and not checkpoint.take_lingering()  # a later sender must hold it anew


def test_a_sender_that_is_done_lets_the_reactor_go_at_once():
    import queue

    from pacs.net.reactor import _WakingCheckpoint

    checkpoint = _WakingCheckpoint(queue.Queue())
    checkpoint.clear()
    passed = threading.Event()
    thread = threading.Thread(target=lambda: (checkpoint.wait(), passed.set()))
    thread.start()
    assert checkpoint.hold(thread.is_alive, 5.0)
    checkpoint.linger()
    checkpoint.set()  # a release, an abort, or a sender's last request: not lingering any more
    assert passed.wait(1.0)
    assert not checkpoint.take_lingering()
    thread.join(5)


def _p_data_tf_body(*values) -> bytes:
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    primitive = P_DATA()
    primitive.presentation_data_value_list = [list(v) for v in values]
    return P_DATA_TF(primitive).encode()[6:]


def test_presentation_data_values_are_read_as_pynetdicom_reads_them():
    from pynetdicom.pdu import P_DATA_TF

    from pacs.net.reactor import _presentation_data_values

    values = [[1, b"\x03" + b"command"], [3, b"\x00" + b"x" * 5000], [3, b"\x02"]]
    body = _p_data_tf_body(*values)
    pdu = P_DATA_TF()
    pdu.decode(b"\x04\x00" + len(body).to_bytes(4, "big") + body)
    ours = _presentation_data_values(bytearray(body))
    assert [[c, bytes(v)] for c, v in ours] == [list(v) for v in pdu.to_primitive().presentation_data_value_list]
    assert [[c, bytes(v)] for c, v in ours] == values
    assert all(isinstance(v, memoryview) for _, v in ours)  # views of the buffer, not copies
    for malformed in (body[:-1], body[:3], b"", b"\x00\x00\x00\x01\x01"):  # truncated, short, empty, no control
        assert _presentation_data_values(bytearray(malformed)) is None


def test_data_pdus_of_an_established_association_skip_pynetdicoms_pdu_decoding(scp, monkeypatch):
    """Stores and their release work as before; pynetdicom decoded no P-DATA-TF on the archive's side."""
    decoded = []
    original = EventDrivenDUL._decode_pdu

    def counting(self, bytestream):  # noqa: ANN001, ANN202
        pdu, event = original(self, bytestream)
        if self.assoc.is_acceptor:
            decoded.append(type(pdu).__name__)
        return pdu, event

    monkeypatch.setattr(EventDrivenDUL, "_decode_pdu", counting)
    services, _ = scp
    blobs = list(make_series(SeriesSpec(study_key="pdus", series_key="p1", rows=256, columns=256, count=5)))
    assoc = _associate(services, CTImageStorage, Verification)
    try:
        statuses = [assoc.send_c_store(pydicom.dcmread(io.BytesIO(data))).get("Status") for data in blobs]
        echo = assoc.send_c_echo().Status
    finally:
        assoc.release()
    assert statuses == [0] * 5 and echo == 0  # a C-ECHO: a message pynetdicom decodes, from views
    assert "P_DATA_TF" not in decoded and "A_RELEASE_RQ" in decoded  # the header handed back: the release decoded
    with services.db.session() as session:
        for data in blobs:
            uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            assert find_instance(session, uid) is not None


def test_a_received_object_is_hashed_as_it_arrives_and_stored_with_that_digest(scp, monkeypatch):
    """The data set of a C-STORE, in many PDUs, is hashed fragment by fragment by the reactor;
    ingest stores the digest without reading the object again, and it is the digest of what was stored."""
    import hashlib

    import pacs.ingest.service as service
    from pacs.index.repository import location_of

    import pacs.net.reactor as reactor

    services, _ = scp
    hashed_by_ingest = []
    digest = service._digest
    monkeypatch.setattr(service, "_digest", lambda fp: hashed_by_ingest.append(fp) or digest(fp))
    updates = []

    class CountingSha256:
        def __init__(self, data):
            self._hash = hashlib.sha256(data)

        def update(self, data):
            updates.append(len(data))
            self._hash.update(data)

        def hexdigest(self):
            return self._hash.hexdigest()

    monkeypatch.setattr(reactor, "hashlib", type("hashlib", (), {"sha256": CountingSha256}))
    blobs = list(make_series(SeriesSpec(study_key="digest", series_key="g1", rows=256, columns=256, count=4)))
    from pynetdicom.dimse import DIMSEServiceProvider

    # as if the archive took PDUs of 16 KB at most: a data set arrives in many fragments
    monkeypatch.setattr(DIMSEServiceProvider, "maximum_pdu_size", property(lambda _self: 16384))
    assert _store_each(services, blobs) == [0] * 4
    assert hashed_by_ingest == []
    assert len(updates) == 4 * 7 and max(updates) <= 16384  # 106 KB each, in seven fragments
    with services.db.session() as session:
        for data in blobs:
            uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            row = find_instance(session, uid)
            stored = services.objects.get(location_of(row))  # verifies the stored checksum
            assert row.sha256 == hashlib.sha256(stored).hexdigest()
            assert pydicom.dcmread(io.BytesIO(stored)).PixelData == pydicom.dcmread(io.BytesIO(data)).PixelData


def test_a_message_in_pieces_goes_out_whole_through_partial_writes():
    """More pieces than one sendmsg takes, to a reader slower than the writer, on a socket with a timeout
    (Python's sendmsg then writes what the buffer takes): every byte, in order, none sent twice."""
    from pacs.net.reactor import encode_message, message_pieces
    from pacs.sockio import PIECES_PER_CALL, send_pieces

    dataset = bytes(range(256)) * 12_000  # 3 MB in 1 kB PDUs: over 6,000 pieces
    pieces = message_pieces(5, b"command" * 20, dataset, 1024)
    assert len(pieces) > 3 * PIECES_PER_CALL
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    writer.settimeout(10)
    received = bytearray()

    def read_slowly() -> None:
        while chunk := reader.recv(7000):
            received.extend(chunk)
            time.sleep(0.0005)

    thread = threading.Thread(target=read_slowly)
    thread.start()
    try:
        calls = []
        sendmsg = writer.sendmsg
        send_pieces(type("Recorded", (), {"sendmsg": lambda self, v: calls.append(len(v)) or sendmsg(v)})(), pieces)
    finally:
        writer.shutdown(socket.SHUT_WR)
        thread.join(10)
        writer.close()
        reader.close()
    assert bytes(received) == encode_message(5, b"command" * 20, dataset, 1024)
    assert len(calls) > len(pieces) / PIECES_PER_CALL and max(calls) <= PIECES_PER_CALL  # partial writes


def test_pieces_joined_for_a_socket_without_sendmsg_are_whole_pdus_up_to_the_limit():
    from pacs.net.reactor import _joined_pdus, encode_message, message_pieces

    pieces = message_pieces(3, b"c" * 50, b"d" * 5_000, 200)
    writes = list(_joined_pdus(pieces, 1_000))
    assert b"".join(writes) == encode_message(3, b"c" * 50, b"d" * 5_000, 200)
    assert len(writes) > 1 and all(len(w) <= 1_000 for w in writes)
    for write in writes:  # each begins a PDU and ends one
        while write:
            assert write[0] == 0x04
            write = write[6 + int.from_bytes(write[2:6], "big"):]
    big = list(_joined_pdus(message_pieces(3, b"c", b"d" * 5_000, 0), 1_000))  # one PDU longer than the limit
    assert [len(w) for w in big] == [12 + 1, 12 + 5_000]
