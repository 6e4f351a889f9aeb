"""``pacs denoise run`` on a Spark standalone cluster, the result fetched back with dcmtk's getscu.

The cluster is the one of ``deploy/spark.sh up`` (a Master and 2 Workers, the
fixture of test_spark_cluster.py).  The job runs once against an embedded
archive in a temporary folder; the derived series must match the in-process
job and come back over C-GET from the archive's SCP with its references and
the source's geometry.  Needs Java and dcmtk; no HDFS or Postgres.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyspark")

from denoise.checkpoints import save_checkpoint  # noqa: E402
from denoise.jobs import denoise_series_in_process  # noqa: E402
from denoise.model import UNet, UNetConfig  # noqa: E402
from pacs.net.scp import start_scp  # noqa: E402
from pacs.services import build_services  # noqa: E402
from pacs.settings import Settings  # noqa: E402
from pacs.synthetic import SeriesSpec, make_series  # noqa: E402
from reconstruct.jobs.archive import load_series  # noqa: E402
from tests.integration.dicom_tools import DCMTK_ENV, NEEDS_DCMTK, free_port, wait_for_port  # noqa: E402
from tests.integration.test_spark_cluster import _run, spark_master  # noqa: E402,F401  (the cluster fixture)

pytestmark = [pytest.mark.spark, *NEEDS_DCMTK]

SLICES, SIDE = 6, 64
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path, str, dict[str, np.ndarray]]:
    """(data dir, checkpoint, stored CT SeriesInstanceUID, in-process HU by source SOP Instance UID)."""
    root = tmp_path_factory.mktemp("denoise-cluster")
    torch.manual_seed(0)
    net = UNet(UNetConfig(width=4, depth=2))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    checkpoint = save_checkpoint(root / "unet-test.pt", net, version="test")
    with build_services(Settings(data_dir=root / "data")) as services:
        for part10 in make_series(SeriesSpec(series_key="cluster-ct", rows=SIDE, columns=SIDE, count=SLICES)):
            series_uid = services.ingest.store(part10).series_instance_uid
        local = denoise_series_in_process(services, series_uid, model_path=checkpoint, device="cpu")
        reference = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID): _hu(ds)
                     for ds in load_series(services, local.series_instance_uid)}
    return root / "data", checkpoint, series_uid, reference


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_pacs_denoise_run_on_the_cluster_then_c_get(spark_master, archive, tmp_path):  # noqa: F811
    data_dir, checkpoint, series_uid, reference = archive
    done = _run([sys.executable, "-m", "pacs.cli.main", "denoise", "run", series_uid, "--master", spark_master,
                 "--partitions", "2", "--model", str(checkpoint), "--device", "cpu", "--data-dir", str(data_dir)],
                COLUMNS="400")
    assert f"{SLICES} slices denoised with unet-test (2 partitions on {spark_master})" in done.stderr
    derived_uid = done.stdout.strip().splitlines()[-1]

    settings = Settings(data_dir=data_dir, dicom={"port": free_port()})
    with build_services(settings) as services:
        source = {str(ds.SOPInstanceUID): ds for ds in load_series(services, series_uid)}
        server = start_scp(services)
        try:
            wait_for_port(settings.dicom.port)
            out = tmp_path / "get"
            out.mkdir()
            study_uid = next(iter(source.values())).StudyInstanceUID
            got = subprocess.run(
                ["getscu", "-S", "-aec", "PACS", "-od", str(out), "-k", "QueryRetrieveLevel=SERIES",
                 "-k", f"StudyInstanceUID={study_uid}", "-k", f"SeriesInstanceUID={derived_uid}",
                 "127.0.0.1", str(settings.dicom.port)],
                env=DCMTK_ENV, capture_output=True, text=True, timeout=120)
            assert got.returncode == 0, got.stderr
        finally:
            server.shutdown()
    received = [pydicom.dcmread(p) for p in sorted(out.iterdir())]
    assert len(received) == SLICES
    for ds in received:
        assert ds.SeriesInstanceUID == derived_uid != series_uid
        assert "[denoised unet-test]" in ds.SeriesDescription and "unet-test" in ds.DerivationDescription
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
        src_uid = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        for keyword in GEOMETRY:
            assert ds.data_element(keyword).value == source[src_uid].data_element(keyword).value, keyword
        assert np.abs(_hu(ds) - reference[src_uid]).max() <= 1.0
