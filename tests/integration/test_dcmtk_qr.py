"""Query/Retrieve against dcmtk's findscu, getscu and movescu (+ storescp as the destination).

A multi-series study (CT explicit VR, MR implicit VR) and objects in JPEG 2000,
JPEG lossless, RLE and deflated transfer syntaxes are stored with storescu;
retrieved files must equal what was sent, element for element and byte for
byte after the file meta (which every receiver writes anew).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import uuid
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacs.devstack import HDFS_URL, PG_URL, empty_database
from pacs.index.models import RemoteAE
from pacs.net.scp import start_scp
from pacs.services import build_services
from pacs.settings import Settings
from pacs.synthetic import SeriesSpec, make_series, uid
from tests.integration.dicom_tools import DCMTK_ENV, NEEDS_DCMTK, free_port, storescp

pytestmark = NEEDS_DCMTK
# pydicom's test files in compressed transfer syntaxes, with the getscu option that proposes each
TESTDATA = {"SC_rgb_rle.dcm": "+xr", "image_dfl.dcm": "+xd", "JPEG2000.dcm": "+xw", "J2K_pixelrep_mismatch.dcm": "+xv"}
DEFLATED = "1.2.840.10008.1.2.1.99"


def dataset_bytes(part10: bytes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True)
    return part10[132 + 12 + ds.file_meta.FileMetaInformationGroupLength:]


def run(*args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def backend_settings(kind: str, root) -> Settings:
    """Settings for the embedded default, or for HDFS + Postgres from deploy/."""
    dicom = {"port": free_port()}
    if kind == "embedded":
        return Settings(data_dir=root / "data", dicom=dicom)
    from tests.integration.conftest import _need

    _need(HDFS_URL, "HDFS")
    _need(PG_URL, "Postgres")
    empty_database(PG_URL)
    storage = dict(backend="hdfs", hdfs_url=HDFS_URL, hdfs_root=f"/pacs-test/qr-{uuid.uuid4().hex[:8]}")
    # the allow-list is on by default with HDFS; these tests are about Q/R, test_dcmtk_security about it
    return Settings(data_dir=root / "data", dicom={**dicom, "require_known_ae": False}, storage=storage,
                    index={"url": PG_URL})


@pytest.fixture(scope="module", params=["embedded", pytest.param("cluster", marks=[pytest.mark.hdfs,
                                                                                  pytest.mark.postgres])])
def archive(request, tmp_path_factory):
    """An SCP on a free port holding the study set, stored by storescu; yields (services, sent)."""
    root = tmp_path_factory.mktemp("qr")
    # A sender waits at most this long for a reactor to pause; past a tool's run timeout, a retrieve that
    # waited on a reactor that can never pause (its own, serving the C-GET) fails instead of crawling.
    hold = pytest.MonkeyPatch()
    hold.setattr("pacs.net.reactor._HOLD_TIMEOUT_S", 600.0)
    request.addfinalizer(hold.undo)
    services = build_services(backend_settings(request.param, root))
    server = start_scp(services)
    inbox = root / "inbox"
    inbox.mkdir()
    files = []
    ct = SeriesSpec(patient_id="QR01", patient_name="DOE^JANE", study_key="qr-study", series_key="qr-ct",
                    modality="CT", rows=64, columns=64, count=5, study_date="20250110", series_number=1)
    mr = SeriesSpec(patient_id="QR01", patient_name="DOE^JANE", study_key="qr-study", series_key="qr-mr",
                    modality="MR", rows=64, columns=64, count=4, study_date="20250110", series_number=2,
                    implicit_vr=True)
    other = SeriesSpec(patient_id="QR02", patient_name="ROE^RICHARD", study_key="qr-other", series_key="qr-o1",
                       modality="CT", rows=32, columns=32, count=2, study_date="20240301", accession_number="B7")
    for spec in (ct, mr, other):
        for i, data in enumerate(make_series(spec)):
            path = inbox / f"{spec.series_key}-{i}.dcm"
            path.write_bytes(data)
            files.append(path)
    done = run("storescu", "-aec", "PACS", "127.0.0.1", str(services.settings.dicom.port), *map(str, files))
    assert done.returncode == 0, done.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, prefer in TESTDATA.items():
            source = get_testdata_file(name)
            if not source:
                continue
            files.append(shutil.copy(source, inbox / name))
            # storescu proposes a compressed syntax only when told which (-xr, -xd, ...)
            done = run("storescu", "-" + prefer[1:], "-aec", "PACS", "127.0.0.1", str(services.settings.dicom.port),
                       str(files[-1]))
            assert done.returncode == 0, done.stderr
    sent = {}
    for path in files:
        data = open(path, "rb").read()
        sent.setdefault(str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID), data)
    yield services, sent
    server.shutdown()
    services.close()


def find(archive, tmp_path, *keys: str, model: str = "-S") -> list[pydicom.Dataset]:
    services, _ = archive
    out = tmp_path / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = ["findscu", model, "-aec", "PACS", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    done = run(*args, "127.0.0.1", str(services.settings.dicom.port))
    assert done.returncode == 0, done.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_find_study_level_wildcard_returns_exact_identifiers(archive, tmp_path):
    found = find(archive, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=DOE*", "StudyInstanceUID",
                 "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                 "InstitutionName")
    assert len(found) == 1
    rsp = found[0]
    assert rsp.StudyInstanceUID == uid("qr-study")
    assert rsp.PatientName == "DOE^JANE"
    assert rsp.StudyDate == "20250110"
    assert list(rsp.ModalitiesInStudy) == ["CT", "MR"]
    assert (int(rsp.NumberOfStudyRelatedSeries), int(rsp.NumberOfStudyRelatedInstances)) == (2, 9)
    assert rsp.InstitutionName == ""  # an unsupported key comes back empty


def test_find_date_range_uid_list_and_universal(archive, tmp_path):
    uids = lambda rsps: sorted(r.StudyInstanceUID for r in rsps)  # noqa: E731
    assert uids(find(archive, tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=20250101-20251231",
                     "StudyInstanceUID")) == [uid("qr-study")]
    assert uids(find(archive, tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=20240101-20241231",
                     "StudyInstanceUID")) == [uid("qr-other")]
    assert uids(find(archive, tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=-20241231", "PatientID=QR*",
                     "StudyInstanceUID")) == [uid("qr-other")]
    both = f"{uid('qr-study')}\\{uid('qr-other')}"
    assert uids(find(archive, tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={both}")) == sorted(
        [uid("qr-study"), uid("qr-other")])
    # universal: every study stored, the testdata studies included
    assert len(find(archive, tmp_path, "QueryRetrieveLevel=STUDY", "StudyInstanceUID")) >= 3


def test_find_series_and_image_levels(archive, tmp_path):
    series = find(archive, tmp_path, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={uid('qr-study')}",
                  "SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
    assert sorted((s.Modality, int(s.SeriesNumber), int(s.NumberOfSeriesRelatedInstances)) for s in series) == [
        ("CT", 1, 5), ("MR", 2, 4)]
    images = find(archive, tmp_path, "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={uid('qr-study')}",
                  f"SeriesInstanceUID={uid('qr-study', 'qr-mr')}", "SOPInstanceUID", "InstanceNumber", "Rows")
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3, 4]
    assert {int(i.Rows) for i in images} == {64}


def test_find_patient_root(archive, tmp_path):
    patients = find(archive, tmp_path, "QueryRetrieveLevel=PATIENT", "PatientID=QR*", "PatientName",
                    "NumberOfPatientRelatedStudies", model="-P")
    assert sorted((str(p.PatientID), int(p.NumberOfPatientRelatedStudies)) for p in patients) == [
        ("QR01", 1), ("QR02", 1)]


def test_find_with_a_bad_key_fails_and_the_server_goes_on(archive, tmp_path):
    services, _ = archive
    done = run("findscu", "-v", "-S", "-aec", "PACS", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyDate=2025-13",
               "127.0.0.1", str(services.settings.dicom.port))
    assert "DataSetDoesNotMatchSOPClass" in done.stdout + done.stderr  # dcmtk's name for 0xA900
    assert len(find(archive, tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=ROE*")) == 1


def check_received(folder, sent: dict[str, bytes], expected_uids: set[str]) -> None:
    received = {}
    for path in folder.iterdir():
        data = path.read_bytes()
        received[str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
    assert set(received) == expected_uids
    for sop_uid, data in received.items():
        got = pydicom.dcmread(io.BytesIO(data))
        original = pydicom.dcmread(io.BytesIO(sent[sop_uid]))
        if got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID:
            assert dataset_bytes(data) == dataset_bytes(sent[sop_uid]), f"{sop_uid} differs from what was sent"
        else:  # the peer accepted only another (uncompressed) syntax: same elements, re-encoded
            assert got == original and got.PixelData == original.PixelData, f"{sop_uid} differs from what was sent"


def study_uids(sent: dict[str, bytes], study_uid: str) -> set[str]:
    return {k for k, v in sent.items()
            if pydicom.dcmread(io.BytesIO(v), stop_before_pixels=True).StudyInstanceUID == study_uid}


def test_get_returns_the_study_byte_for_byte(archive, tmp_path):
    services, sent = archive
    out = tmp_path / "get"
    out.mkdir()
    done = run("getscu", "-S", "-aec", "PACS", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={uid('qr-study')}", "127.0.0.1", str(services.settings.dicom.port))
    assert done.returncode == 0, done.stderr
    check_received(out, sent, study_uids(sent, uid("qr-study")))


@pytest.mark.parametrize("name, prefer", sorted(TESTDATA.items()))
def test_get_keeps_compressed_transfer_syntaxes(archive, tmp_path, name, prefer):
    services, sent = archive
    source = get_testdata_file(name)
    if source is None:
        pytest.skip(f"pydicom's test file {name} is not available")
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    out = tmp_path / "get"
    out.mkdir()
    # getscu accepts only uncompressed syntaxes unless told: prefer the stored one
    done = run("getscu", "-S", "-aec", "PACS", "-od", str(out), prefer, "-k", "QueryRetrieveLevel=IMAGE",
               "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-k", f"SeriesInstanceUID={ds.SeriesInstanceUID}",
               "-k", f"SOPInstanceUID={ds.SOPInstanceUID}", "127.0.0.1", str(services.settings.dicom.port))
    assert done.returncode == 0, done.stderr
    files = list(out.iterdir())
    assert len(files) == 1, done.stderr
    received = files[0].read_bytes()
    got = pydicom.dcmread(io.BytesIO(received))
    assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    original = sent[str(ds.SOPInstanceUID)]
    if ds.file_meta.TransferSyntaxUID == DEFLATED:
        # the dataset is inflated and deflated again on the way out: same elements, other zlib bytes
        assert got == pydicom.dcmread(io.BytesIO(original))
    else:
        assert dataset_bytes(received) == dataset_bytes(original)


def test_move_to_storescp_byte_for_byte_and_unknown_destination(archive, tmp_path):
    services, sent = archive
    out = tmp_path / "moved"
    out.mkdir()
    with storescp("STORESCP", out) as port:
        with services.db.session() as session:
            session.add(RemoteAE(ae_title="STORESCP", host="127.0.0.1", port=port))
        done = run("movescu", "-S", "-aec", "PACS", "-aem", "STORESCP", "-k", "QueryRetrieveLevel=SERIES",
                   "-k", f"StudyInstanceUID={uid('qr-study')}", "-k", f"SeriesInstanceUID={uid('qr-study', 'qr-ct')}",
                   "127.0.0.1", str(services.settings.dicom.port))
        assert done.returncode == 0, done.stderr
        ct_uids = {k for k in study_uids(sent, uid("qr-study"))
                   if pydicom.dcmread(io.BytesIO(sent[k]), stop_before_pixels=True).Modality == "CT"}
        check_received(out, sent, ct_uids)
        unknown = run("movescu", "-S", "-aec", "PACS", "-aem", "NOSUCHAE", "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"StudyInstanceUID={uid('qr-study')}", "127.0.0.1", str(services.settings.dicom.port))
        assert "MoveDestinationUnknown" in unknown.stdout + unknown.stderr  # dcmtk's name for 0xA801


def test_pacs_echo_and_push_to_storescp(archive, tmp_path):
    from pacs.net.scu import echo, push

    services, sent = archive
    out = tmp_path / "pushed"
    out.mkdir()
    with storescp("PUSHDEST", out) as port:
        assert echo("127.0.0.1", port, called_ae="PUSHDEST", calling_ae="PACS") == 0
        report = push(services, "127.0.0.1", port, called_ae="PUSHDEST", study_instance_uid=uid("qr-study"))
        assert (report.sent, report.failed) == (9, [])
        check_received(out, sent, study_uids(sent, uid("qr-study")))
    with pytest.raises(ConnectionError):
        echo("127.0.0.1", port, called_ae="PUSHDEST", calling_ae="PACS", timeout_s=3)


def test_repeated_moves_of_a_larger_series_never_stall(archive, tmp_path):
    """Fast storescp responses used to hit a pynetdicom race that stalled a sub-operation for the DIMSE timeout."""
    services, _ = archive
    spec = SeriesSpec(patient_id="QR03", study_key="qr-many", series_key="qr-many-1", rows=256, columns=256, count=150)
    for data in make_series(spec):
        services.ingest.store(data)
    for attempt in range(3):
        out = tmp_path / f"moved-{attempt}"
        out.mkdir()
        destination = f"MANYDEST{attempt}"
        with storescp(destination, out) as port:
            with services.db.session() as session:
                session.add(RemoteAE(ae_title=destination, host="127.0.0.1", port=port))
            # the stall lasted the 60 s DIMSE timeout; a healthy move of 150 small objects takes about a second
            done = run("movescu", "-S", "-aec", "PACS", "-aem", destination, "-k", "QueryRetrieveLevel=SERIES",
                       "-k", f"StudyInstanceUID={uid('qr-many')}", "-k", f"SeriesInstanceUID={uid('qr-many', 'qr-many-1')}",
                       "127.0.0.1", str(services.settings.dicom.port), timeout=45)
            assert done.returncode == 0, done.stderr
            assert "Warning" not in done.stdout + done.stderr
        assert len(list(out.iterdir())) == 150
