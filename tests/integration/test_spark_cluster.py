"""FDK on a Spark standalone cluster (a Master and 2 Workers from `deploy/spark.sh up`).

The job is submitted twice against the same archive (embedded default, in a
temporary folder that the driver reads and writes; the Workers run on this
machine too): with ``spark-submit reconstruct/jobs/spark.py`` and with
``pacs reconstruct --master spark://...``.  Both stored CT series must match
the in-process reconstruction.  Needs Java; no HDFS or Postgres.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

pytest.importorskip("torch")
pytest.importorskip("pyspark")

from pacs.index.models import Instance, Series  # noqa: E402
from pacs.index.repository import LOCATION_COLUMNS, location_of  # noqa: E402
from pacs.services import build_services  # noqa: E402
from pacs.settings import Settings  # noqa: E402
from reconstruct.dicom_io import projections_to_multiframe  # noqa: E402
from reconstruct.geometry import ConeBeamGeometry  # noqa: E402
from reconstruct.jobs.archive import reconstruct_series  # noqa: E402
from reconstruct.phantom import project_ellipsoids, shepp_logan_3d  # noqa: E402
from tests.integration.conftest import REPO, STACK_ENV  # noqa: E402

pytestmark = pytest.mark.spark

WORKERS = 2
SHAPE = ["--dimension", "32,24,32", "--spacing", "4", "--filter", "hann", "--device", "cpu"]


def _clean_env(**extra: str) -> dict[str, str]:
    """The shell's environment without PACS_* settings (the test names its data dir)."""
    env = {k: v for k, v in STACK_ENV.items() if not k.startswith("PACS_")}
    env.update(PACS_STACK_DIR=STACK_ENV.get("PACS_STACK_DIR", str(REPO / ".stack")), **extra)
    return env


def _spark_sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", str(REPO / "deploy" / "spark.sh"), *args], capture_output=True, text=True,
                          timeout=300, env=_clean_env(PACS_SPARK_WORKERS=str(WORKERS)))
    if check and done.returncode != 0:
        raise RuntimeError(f"deploy/spark.sh {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def spark_master() -> str:
    """A standalone Master with 2 Workers; stopped afterwards unless it was already running."""
    if shutil.which("java") is None:
        message = "the Spark cluster needs Java 17+ (java not on PATH)"
        if STACK_ENV.get("PACS_REQUIRE_STACK") == "1":
            pytest.fail(message)
        pytest.skip(message)
    was_running = _spark_sh("status", check=False).returncode == 0
    _spark_sh("up")
    env = dict(line.removeprefix("export ").split("=", 1) for line in _spark_sh("env").stdout.splitlines())
    yield env["PACS_SPARK_MASTER"]
    if not was_running:
        _spark_sh("down")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, str, list[np.ndarray]]:
    """A data dir holding a simulated scan: (data dir, its SeriesInstanceUID, in-process HU slices)."""
    data_dir = tmp_path_factory.mktemp("spark-archive") / "data"
    geometry = ConeBeamGeometry.circular(72, source_to_isocenter_mm=500.0, source_to_detector_mm=1000.0,
                                         detector_size_uv=48, detector_spacing_uv_mm=4.0)
    projections = project_ellipsoids(shepp_logan_3d(40.0, density_scale=0.0195), geometry)
    buffer = io.BytesIO()
    projections_to_multiframe(projections, geometry).save_as(buffer, enforce_file_format=True)
    with build_services(Settings(data_dir=data_dir)) as services:
        series_uid = services.ingest.store(buffer.getvalue()).series_instance_uid
        local = reconstruct_series(services, series_uid, dimension=(32, 24, 32), spacing=4.0, filter="hann",
                                   device="cpu")
        reference = [_hu(ds) for ds in _stored(services, local.series_instance_uid)]
    return data_dir, series_uid, reference


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _stored(services, series_uid: str) -> list[pydicom.Dataset]:
    with services.db.session() as session:
        rows = session.execute(
            select(*LOCATION_COLUMNS)
            .join(Series, Instance.series_fk == Series.id)
            .where(Series.series_instance_uid == series_uid).order_by(Instance.instance_number)).all()
    return [pydicom.dcmread(io.BytesIO(services.objects.get(location_of(row)))) for row in rows]


def _check_stored(data_dir: Path, output: str, reference: list[np.ndarray], source_uid: str) -> None:
    lines = [line for line in output.splitlines() if line.startswith("stored CT series ")]
    assert lines, output
    ct_uid = lines[-1].removeprefix("stored CT series ").split(":")[0]
    with build_services(Settings(data_dir=data_dir)) as services:
        slices = _stored(services, ct_uid)
    assert len(slices) == len(reference) == 24
    for ds, expected in zip(slices, reference):
        assert ds.Modality == "CT" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source_uid
        assert np.abs(_hu(ds) - expected).max() <= 1.0


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=REPO,
                          env=_clean_env(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable, **env))
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-6000:]}"
    return done


def test_spark_submit_on_the_standalone_cluster(spark_master, archive):
    import pyspark

    data_dir, series_uid, reference = archive
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    log4j = REPO / "pacs" / "spark-log4j2.properties"
    done = _run([str(spark_submit), "--master", spark_master,
                 "--driver-java-options", f"-Dlog4j.configurationFile=file:{log4j}",
                 str(REPO / "reconstruct" / "jobs" / "spark.py"), series_uid, "--data-dir", str(data_dir), *SHAPE])
    output = done.stdout + done.stderr  # spark-submit passes the driver's stderr on as its stdout
    assert f"(2 slabs on {spark_master})" in output and "slabs 2/2" in output
    _check_stored(data_dir, output, reference, series_uid)


def test_pacs_reconstruct_on_the_standalone_cluster(spark_master, archive):
    data_dir, series_uid, reference = archive
    done = _run([sys.executable, "-m", "pacs.cli.main", "reconstruct", series_uid, "--master", spark_master,
                 "--slabs", "3", "--data-dir", str(data_dir), *SHAPE], COLUMNS="400")
    output = done.stdout + done.stderr
    assert f"(3 slabs on {spark_master})" in output and "3/3" in output
    _check_stored(data_dir, output, reference, series_uid)
