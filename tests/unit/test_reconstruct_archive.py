"""A stored projection series reconstructed into a derived CT series in the archive."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

pytest.importorskip("torch")

from pacs.cli.main import app  # noqa: E402
from pacs.errors import NotFound  # noqa: E402
from pacs.index.models import Instance, Series  # noqa: E402
from pacs.index.repository import location_of  # noqa: E402
from reconstruct.jobs.archive import reconstruct_series  # noqa: E402

runner = CliRunner()


def test_projection_series_to_ct_series(tmp_path, embedded):
    scan = tmp_path / "scan.dcm"
    result = runner.invoke(app, ["synth-projections", str(scan), "--views", "72", "--detector", "48",
                                 "--pixel-mm", "4", "--radius-mm", "40"])
    assert result.exit_code == 0, result.output
    stored = embedded.ingest.store(scan)
    done = reconstruct_series(embedded, stored.series_instance_uid, dimension=(32, 24, 32), spacing=4.0,
                              filter="hann")
    assert done.slices == 24
    with embedded.db.session() as session:
        series = session.scalars(select(Series).where(Series.series_instance_uid == done.series_instance_uid)).one()
        assert (series.modality, series.num_instances) == ("CT", 24)
        assert series.study.study_instance_uid == stored.study_instance_uid
        rows = session.scalars(select(Instance).where(Instance.series_fk == series.id)
                               .order_by(Instance.instance_number)).all()
        middle = pydicom.dcmread(io.BytesIO(embedded.objects.get(location_of(rows[12]))))
    hu = middle.pixel_array * float(middle.RescaleSlope) + float(middle.RescaleIntercept)
    # the head (radius 40 mm, inside the 48 mm field of view) on 4 mm voxels: brain matter of the
    # modified Shepp-Logan (0.2 x water) near -800 HU, air between the head and the edge of the
    # field of view (x = 44 mm) near -1000 HU, the 2 mm skull (1.0 x water) brighter than both
    assert np.median(hu[13:19, 13:19]) == pytest.approx(-800, abs=60)
    assert np.median(np.r_[hu[16, 5:7], hu[16, 26:28]]) == pytest.approx(-1000, abs=60)
    assert hu[16, 8:11].max() > -700
    assert middle.ReferencedSeriesSequence[0].SeriesInstanceUID == stored.series_instance_uid
    assert middle.FrameOfReferenceUID == pydicom.dcmread(scan, stop_before_pixels=True).FrameOfReferenceUID


def test_not_a_projection_series_is_refused_and_nothing_written(embedded):
    from pacs.synthetic import SeriesSpec, make_instance

    ct = embedded.ingest.store(make_instance(SeriesSpec(rows=16, columns=16), 0))
    with pytest.raises(ValueError, match="expected"):
        reconstruct_series(embedded, ct.series_instance_uid, dimension=8, spacing=1.0)
    with pytest.raises(NotFound):
        reconstruct_series(embedded, "1.2.3.4", dimension=8, spacing=1.0)
    with embedded.db.session() as session:
        assert len(session.scalars(select(Series)).all()) == 1


def test_pacs_reconstruct_command(tmp_path):
    scan = tmp_path / "scan.dcm"
    assert runner.invoke(app, ["synth-projections", str(scan), "--views", "36", "--detector", "24",
                               "--pixel-mm", "8", "--radius-mm", "40"]).exit_code == 0
    data = tmp_path / "data"
    assert runner.invoke(app, ["store", "--data-dir", str(data), str(scan)]).exit_code == 0
    series_uid = str(pydicom.dcmread(scan, stop_before_pixels=True).SeriesInstanceUID)
    result = runner.invoke(app, ["reconstruct", series_uid, "--dimension", "16", "--spacing", "6",
                                 "--in-process", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert "16 slices" in result.output
    listing = runner.invoke(app, ["ls", "--data-dir", str(data)])
    assert "CT" in listing.output and "XA" in listing.output
    missing = runner.invoke(app, ["reconstruct", "1.2.3", "--master", "none", "--data-dir", str(data)])
    assert missing.exit_code == 1 and "no stored series 1.2.3" in missing.output
