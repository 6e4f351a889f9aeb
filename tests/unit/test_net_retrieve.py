"""The archive's C-GET / C-MOVE sub-operation loop (pacs.net.retrieve), with pynetdicom's own SCU as the peer."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs.index.models import RemoteAE
from pacs.synthetic import SeriesSpec, make_series
from tests.conftest import free_port, start_recorded_scp

COUNT = 12


def _store_series(services, key: str) -> dict[str, bytes]:
    spec = SeriesSpec(patient_id=key.upper(), patient_name=f"{key.upper()}^R", study_key=key, series_key=f"{key}-1",
                      rows=8, columns=8, count=COUNT)
    sent = {}
    for data in make_series(spec):
        sent[pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID] = data
        services.ingest.store(data)
    return sent


def _query(sent: dict[str, bytes], **keys) -> Dataset:
    first = pydicom.dcmread(io.BytesIO(next(iter(sent.values()))), stop_before_pixels=True)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = first.StudyInstanceUID
    query.SeriesInstanceUID = first.SeriesInstanceUID
    for name, value in keys.items():
        setattr(query, name, value)
    return query


def _peer() -> AE:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _get(services, query: Dataset, on_store, msg_id: int = 1) -> list[Dataset]:
    """The C-GET's responses (status datasets, the final one's identifier merged in)."""
    ae = _peer()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", services.settings.dicom.port, ae_title="PACS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        return _merged(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet, msg_id=msg_id))
    finally:
        assoc.release()


def _recording(received: list):  # noqa: ANN202 - an EVT_C_STORE handler
    """A peer's C-STORE handler that keeps (request, dataset) of each sub-operation and answers Success."""

    def on_store(event):  # noqa: ANN001, ANN202
        received.append((event.request, event.dataset))
        return 0x0000

    return on_store


@contextmanager
def _destination(services, on_store) -> Iterator[None]:  # noqa: ANN001
    """A pynetdicom storage SCP with ``on_store``, known to the archive as MOVEDEST, while the block runs."""
    destination = AE(ae_title="MOVEDEST")
    for syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian):
        destination.add_supported_context(CTImageStorage, syntax)
    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        with services.db.session() as session:
            session.add(RemoteAE(ae_title="MOVEDEST", host="127.0.0.1", port=port))
        yield
    finally:
        server.shutdown()


def _requester(services):  # noqa: ANN001, ANN202 - an established pynetdicom association
    ae = _peer()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", services.settings.dicom.port, ae_title="PACS")
    assert assoc.is_established
    return assoc


def _move(assoc, sent: dict[str, bytes], **kwargs) -> list[Dataset]:  # noqa: ANN001
    return _merged(assoc.send_c_move(_query(sent), "MOVEDEST", StudyRootQueryRetrieveInformationModelMove, **kwargs))


def _merged(responses) -> list[Dataset]:
    merged = []
    for status, identifier in responses:
        if identifier is not None:
            status.update(identifier)
        merged.append(status)
    return merged


def test_get_sends_each_stored_object_with_the_next_message_id(scp):
    services, _ = scp
    sent = _store_series(services, "rt1")
    received = []
    responses = _get(services, _query(sent), _recording(received), msg_id=40)
    final = responses[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (0x0000, COUNT, 0, 0)
    assert "FailedSOPInstanceUIDList" not in final
    assert [request.MessageID for request, _ in received] == list(range(41, 41 + COUNT))
    assert {request.MoveOriginatorApplicationEntityTitle for request, _ in received} == {None}
    assert {ds.SOPInstanceUID for _, ds in received} == set(sent)
    for _, ds in received:
        original = pydicom.dcmread(io.BytesIO(sent[ds.SOPInstanceUID]))
        assert ds == original and ds.PixelData == original.PixelData


def test_get_counts_and_lists_the_sub_operations_the_peer_refused(scp):
    services, _ = scp
    sent = _store_series(services, "rt2")
    refused = set(sorted(sent)[:2])

    def on_store(event):
        return 0xA700 if event.dataset.SOPInstanceUID in refused else 0x0000

    final = _get(services, _query(sent), on_store)[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        0xB000, COUNT - 2, 2)
    assert set(final.FailedSOPInstanceUIDList) == refused


def test_get_whose_every_sub_operation_failed_is_unable_to_perform_them(scp):
    services, _ = scp
    sent = _store_series(services, "rt3")
    final = _get(services, _query(sent), lambda event: 0xC000)[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        0xA702, 0, COUNT)
    assert set(final.FailedSOPInstanceUIDList) == set(sent)


def test_a_cancel_ends_the_get_with_the_counts_so_far(scp):
    services, _ = scp
    sent = _store_series(services, "rt4")
    stored = []

    def on_store(event):
        stored.append(event.dataset.SOPInstanceUID)
        if len(stored) == 2:
            context_id = next(cx.context_id for cx in event.assoc.accepted_contexts
                              if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
            event.assoc.send_c_cancel(1, context_id)
        return 0x0000

    final = _get(services, _query(sent), on_store)[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations == len(stored) < COUNT
    assert final.NumberOfRemainingSuboperations == COUNT - len(stored)
    assert final.NumberOfFailedSuboperations == 0


def test_a_get_the_handler_refuses_gets_the_handlers_own_status(scp):
    """A retrieve without a unique key: 0xA900 with the handler's comment, not pynetdicom's 0xC413."""
    services, _ = scp
    sent = _store_series(services, "rt5")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    responses = _get(services, query, lambda event: 0x0000)
    assert len(responses) == 1 and responses[0].Status == 0xA900
    assert "unique key" in responses[0].ErrorComment
    assert _get(services, _query(sent), lambda event: 0x0000)[-1].NumberOfCompletedSuboperations == COUNT


def test_move_sub_operations_name_the_requester_and_its_message_id(scp):
    services, _ = scp
    sent = _store_series(services, "rt6")
    received = []
    with _destination(services, _recording(received)):
        assoc = _requester(services)
        try:
            final = _move(assoc, sent, msg_id=7)[-1]
        finally:
            assoc.release()
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, COUNT, 0)
    assert {(r.MoveOriginatorApplicationEntityTitle, r.MoveOriginatorMessageID) for r, _ in received} == {
        ("TESTSCU", 7)}
    assert {ds.SOPInstanceUID for _, ds in received} == set(sent)


def test_a_get_from_an_ae_that_may_not_retrieve_is_refused_as_not_authorised(embedded):
    sent = _store_series(embedded, "rt7")
    embedded.settings.dicom.require_known_ae = True
    with embedded.db.session() as session:
        session.add(RemoteAE(ae_title="TESTSCU", host="*", port=104, may_retrieve=False))
    server, _ = start_recorded_scp(embedded, network_timeout_s=10.0)
    try:
        responses = _get(embedded, _query(sent), lambda event: 0x0000)
    finally:
        server.shutdown()
    assert [(r.Status, r.ErrorComment) for r in responses] == [(0x0124, "TESTSCU may not retrieve")]


def test_a_get_whose_matches_cannot_be_listed_is_unable_to_process(scp, monkeypatch):
    """The index failing: 0xC000 with the error, not 0xA900 (the identifier is fine)."""
    from pacs.errors import IndexUnavailable
    from pacs.net import qr

    services, _ = scp
    sent = _store_series(services, "rt8")

    def unavailable(event, db):  # noqa: ANN001, ANN202
        raise IndexUnavailable("the index did not answer")

    monkeypatch.setattr(qr, "_instances_to_send", unavailable)
    responses = _get(services, _query(sent), lambda event: 0x0000)
    assert [(r.Status, r.ErrorComment) for r in responses] == [(0xC000, "the index did not answer")]


def _aborting_on(nth: int, received: list):  # noqa: ANN202 - an EVT_C_STORE handler
    """A peer's C-STORE handler that aborts its association when the ``nth`` object arrives (unanswered)."""

    def on_store(event):  # noqa: ANN001, ANN202
        received.append(event.dataset.SOPInstanceUID)
        if len(received) == nth:
            threading.Thread(target=event.assoc.abort).start()  # not from the handler's own thread
            time.sleep(0.5)  # the abort goes out before any response
        return 0x0000

    return on_store


@pytest.fixture
def slow_timeout_scp(embedded):
    """The archive's SCP with a DIMSE timeout of 30 s: a retrieve that waited it out would show."""
    server, accepted = start_recorded_scp(embedded, network_timeout_s=30.0)
    yield embedded, accepted
    server.shutdown()


def test_a_move_destination_that_aborts_fails_the_rest_at_once(slow_timeout_scp):
    services, _ = slow_timeout_scp
    sent = _store_series(services, "rt9")
    received = []
    with _destination(services, _aborting_on(3, received)):
        assoc = _requester(services)
        try:
            started = time.monotonic()
            final = _move(assoc, sent)[-1]
            elapsed = time.monotonic() - started
            # the archive goes on: the next move (the destination aborts only once) gets everything
            again = _move(assoc, sent)[-1]
        finally:
            assoc.release()
    assert (final.Status, final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0xB000, 2, 10)
    assert len(final.FailedSOPInstanceUIDList) == 10
    assert elapsed < 10, f"the move waited {elapsed:.1f} s for a destination that had aborted"
    assert (again.Status, again.NumberOfCompletedSuboperations) == (0x0000, COUNT)


def test_a_get_requester_that_aborts_ends_the_get_and_the_archive_goes_on(slow_timeout_scp):
    services, accepted = slow_timeout_scp
    sent = _store_series(services, "rt10")
    received = []
    ae = _peer()
    ae.dimse_timeout = 1  # the aborted peer's own wait for the rest of the C-GET's responses
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", services.settings.dicom.port, ae_title="PACS",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, _aborting_on(3, received))])
    assert assoc.is_established
    list(assoc.send_c_get(_query(sent), StudyRootQueryRetrieveInformationModelGet))
    assert assoc.is_aborted and len(received) == 3
    # the archive's side ends with it, rather than wait its 30 s DIMSE timeout for the third response
    accepted[0].join(timeout=5)
    assert not accepted[0].is_alive()
    final = _get(services, _query(sent), lambda event: 0x0000)[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, COUNT)
