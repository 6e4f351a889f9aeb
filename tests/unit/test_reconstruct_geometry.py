"""ConeBeamGeometry / VolumeGrid validation and RTK XML / JSON round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reconstruct.geometry import (
    ConeBeamGeometry,
    VolumeGrid,
    read_geometry,
    read_geometry_json,
    read_rtk_geometry_xml,
    rtk_geometry_xml_text,
    write_geometry_json,
    write_rtk_geometry_xml,
)

DEG = math.atan(1.0) / 45.0  # RTK's degrees-to-radians expression

# Written by RTK 2.7's ThreeDCircularProjectionGeometryXMLFileWriter (itk-rtk wheel) for
# AddProjection(750, 1200 + 10 i, angle_i, 12.5, -3.25, 0, 0, 0, 1.5), angles 0, 97.5, -45.
RTK_GOLDEN_XML = """<?xml version="1.0"?>
<!DOCTYPE RTKGEOMETRY>
<RTKThreeDCircularGeometry version="3">
    <SourceToIsocenterDistance>750</SourceToIsocenterDistance>
    <SourceOffsetY>1.5</SourceOffsetY>
    <ProjectionOffsetX>12.5</ProjectionOffsetX>
    <ProjectionOffsetY>-3.25</ProjectionOffsetY>
  <Projection>
    <GantryAngle>0</GantryAngle>
    <SourceToDetectorDistance>1200</SourceToDetectorDistance>
    <Matrix>
                    -1200                   0               -12.5                9375
                        0               -1200                4.75             -1762.5
                        0                   0                   1                -750
    </Matrix>
  </Projection>
  <Projection>
    <GantryAngle>97.5</GantryAngle>
    <SourceToDetectorDistance>1210</SourceToDetectorDistance>
    <Matrix>
          145.54363181909                   0    1201.27985966506                9375
          4.7093630915256               -1210  -0.619999413045245             -1747.5
         0.99144486137381                   0  -0.130526192220052                -750
    </Matrix>
  </Projection>
  <Projection>
    <GantryAngle>315</GantryAngle>
    <SourceToDetectorDistance>1220</SourceToDetectorDistance>
    <Matrix>
        -853.831438282756                   0    -871.50910781242                9375
         -3.3587572106361               -1220     3.3587572106361             -1732.5
       -0.707106781186547                   0   0.707106781186548                -750
    </Matrix>
  </Projection>
</RTKThreeDCircularGeometry>
"""


def small_geometry(**changes):
    values = dict(
        angles_rad=np.radians([0.0, 90.0, 180.0, 270.0]),
        source_to_isocenter_mm=500.0,
        source_to_detector_mm=1000.0,
        detector_size_uv=(8, 6),
        detector_spacing_uv_mm=(1.0, 2.0),
    )
    values.update(changes)
    return ConeBeamGeometry(**values)


def test_defaults_and_shapes():
    g = small_geometry()
    assert g.projection_shape == (4, 6, 8)
    assert g.detector_origin_uv_mm == (-3.5, -5.0)  # centred on the central ray
    assert g.source_to_isocenter_mm.shape == (4,)
    np.testing.assert_allclose(g.u_mm()[[0, -1]], [-3.5, 3.5])
    with pytest.raises(ValueError):
        g.angles_rad[0] = 1.0  # read-only arrays


def test_source_position_follows_rtk():
    g = small_geometry()
    np.testing.assert_allclose(g.source_positions_mm(), [[0, 0, 500], [500, 0, 0], [0, 0, -500], [-500, 0, 0]], atol=1e-9)
    # The isocentre projects onto the foot of the central ray; +y projects to +v, magnified.
    u, v = g.project_mm(np.array([[0.0, 0.0, 0.0], [0.0, 10.0, 0.0]]))
    np.testing.assert_allclose(u, 0.0, atol=1e-9)
    np.testing.assert_allclose(v[:, 1], 20.0)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(angles_rad=[]), "angles_rad: expected"),
        (dict(angles_rad=[0.0, float("nan")]), "angles_rad: expected finite"),
        (dict(source_to_isocenter_mm=-1.0), "source_to_isocenter_mm: expected positive"),
        (dict(source_to_detector_mm=0.0), "parallel geometry"),
        (dict(source_to_detector_mm=[1000.0, 1000.0]), "expected a number or 4 values"),
        (dict(detector_size_uv=(1, 6)), "detector_size_uv: expected at least 2"),
        (dict(detector_size_uv=(8.5, 6)), "detector_size_uv: expected integers"),
        (dict(detector_spacing_uv_mm=(1.0, -1.0)), "detector_spacing_uv_mm: expected positive"),
        (dict(detector_origin_uv_mm=(1.0, 2.0, 3.0)), "detector_origin_uv_mm: expected 1 or 2"),
        (dict(projection_offset_x_mm="left"), "projection_offset_x_mm: expected"),
    ],
)
def test_validation_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        small_geometry(**changes)


def test_volume_grid():
    grid = VolumeGrid(4, 2.0)
    assert grid.shape == (4, 4, 4)
    assert grid.origin_xyz_mm == (-3.0, -3.0, -3.0)
    odd = VolumeGrid((5, 3, 7), (1.0, 2.0, 0.5), None)
    assert odd.shape == (7, 3, 5)
    np.testing.assert_allclose(odd.axis_mm("y"), [-2.0, 0.0, 2.0])
    slab = odd.y_slab(1, 3)
    assert slab.shape == (7, 2, 5) and slab.origin_xyz_mm[1] == 0.0
    for bad, message in [
        (dict(dimension_xyz=(4, 4)), "dimension_xyz: expected 1 or 3"),
        (dict(dimension_xyz=0), "dimension_xyz: expected positive"),
        (dict(spacing_xyz_mm=(1.0, 0.0, 1.0)), "spacing_xyz_mm: expected positive"),
        (dict(origin_xyz_mm=("a", 0, 0)), "origin_xyz_mm: expected"),
    ]:
        kwargs = dict(dimension_xyz=4, spacing_xyz_mm=1.0)
        kwargs.update(bad)
        with pytest.raises(ValueError, match=message):
            VolumeGrid(**kwargs)


def golden_geometry():
    return ConeBeamGeometry(
        angles_rad=np.array([0.0, 97.5, -45.0]) * DEG,
        source_to_isocenter_mm=750.0,
        source_to_detector_mm=[1200.0, 1210.0, 1220.0],
        detector_size_uv=(16, 12),
        detector_spacing_uv_mm=0.5,
        projection_offset_x_mm=12.5,
        projection_offset_y_mm=-3.25,
        source_offset_y_mm=1.5,
    )


def test_xml_writer_is_byte_identical_to_rtk():
    assert rtk_geometry_xml_text(golden_geometry()) == RTK_GOLDEN_XML


def test_xml_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    g = small_geometry(
        angles_rad=rng.uniform(-7.0, 7.0, 4),
        source_to_isocenter_mm=rng.uniform(400, 600, 4),
        projection_offset_x_mm=rng.normal(size=4),
        source_offset_x_mm=0.25,
    )
    path = tmp_path / "g.xml"
    write_rtk_geometry_xml(g, path)
    back = read_rtk_geometry_xml(path, detector_size_uv=(8, 6), detector_spacing_uv_mm=(1.0, 2.0))
    # RTK stores angles wrapped to [0, 2 pi): compare on the circle.
    np.testing.assert_allclose(np.angle(np.exp(1j * (back.angles_rad - g.angles_rad))), 0.0, atol=1e-12)
    for name in ("source_to_isocenter_mm", "source_to_detector_mm", "projection_offset_x_mm", "source_offset_x_mm"):
        np.testing.assert_allclose(getattr(back, name), getattr(g, name), rtol=1e-14)
    np.testing.assert_allclose(back.matrices(), g.matrices(), rtol=1e-12, atol=1e-9)


def test_xml_reader_accepts_rtk_file_and_checks_matrices():
    g = read_rtk_geometry_xml(RTK_GOLDEN_XML, detector_size_uv=(16, 12), detector_spacing_uv_mm=0.5)
    assert g.n_projections == 3
    np.testing.assert_allclose(np.degrees(g.angles_rad), [0.0, 97.5, 315.0])
    np.testing.assert_allclose(g.source_to_detector_mm, [1200, 1210, 1220])
    assert np.all(g.projection_offset_x_mm == 12.5) and np.all(g.source_offset_y_mm == 1.5)
    tampered = RTK_GOLDEN_XML.replace("<GantryAngle>97.5<", "<GantryAngle>98.5<")
    with pytest.raises(ValueError, match="consistent with the parameters"):
        read_rtk_geometry_xml(tampered, detector_size_uv=16, detector_spacing_uv_mm=0.5)


def test_xml_reader_is_lenient():
    text = """<?xml version="1.0"?>
    <rtkthreedcirculargeometry version="2">
      <sourcetoisocenterdistance> 1000 </sourcetoisocenterdistance>
      <SourceToDetectorDistance>1500</SourceToDetectorDistance>
      <Projection><Angle>10</Angle><ProjectionOffsetX>2</ProjectionOffsetX><CollimationUInf>5</CollimationUInf></Projection>
      <Projection><GantryAngle>20</GantryAngle><Unknown>1</Unknown></Projection>
    </rtkthreedcirculargeometry>"""
    g = read_rtk_geometry_xml(text, detector_size_uv=(4, 4), detector_spacing_uv_mm=1.0)
    np.testing.assert_allclose(np.degrees(g.angles_rad), [10.0, 20.0])
    # As in RTK's reader, a value stays in force until it is set again.
    np.testing.assert_allclose(g.projection_offset_x_mm, [2.0, 2.0])


@pytest.mark.parametrize(
    "snippet, message",
    [
        ("<InPlaneAngle>3</InPlaneAngle>", "InPlaneAngle 0"),
        ("<OutOfPlaneAngle>-2</OutOfPlaneAngle>", "OutOfPlaneAngle 0"),
        ("<RadiusCylindricalDetector>1536</RadiusCylindricalDetector>", "flat detector"),
    ],
)
def test_xml_reader_rejects_unsupported(snippet, message):
    text = (
        '<RTKThreeDCircularGeometry version="3"><SourceToIsocenterDistance>1000</SourceToIsocenterDistance>'
        f"<SourceToDetectorDistance>1500</SourceToDetectorDistance>{snippet}"
        "<Projection><GantryAngle>0</GantryAngle></Projection></RTKThreeDCircularGeometry>"
    )
    with pytest.raises(ValueError, match=message):
        read_rtk_geometry_xml(text, detector_size_uv=4, detector_spacing_uv_mm=1.0)


def test_xml_reader_errors():
    with pytest.raises(ValueError, match="expected version 2 or 3"):
        read_rtk_geometry_xml('<RTKThreeDCircularGeometry version="1"/>', detector_size_uv=4, detector_spacing_uv_mm=1)
    with pytest.raises(ValueError, match="at least one <Projection>"):
        read_rtk_geometry_xml('<RTKThreeDCircularGeometry version="3"/>', detector_size_uv=4, detector_spacing_uv_mm=1)
    with pytest.raises(ValueError, match="expected a number"):
        read_rtk_geometry_xml(
            '<RTKThreeDCircularGeometry><Projection><GantryAngle>x</GantryAngle></Projection></RTKThreeDCircularGeometry>',
            detector_size_uv=4,
            detector_spacing_uv_mm=1,
        )


def test_json_round_trip_is_exact(tmp_path):
    g = small_geometry(
        angles_rad=np.random.default_rng(0).uniform(0, 6.3, 4),
        detector_origin_uv_mm=(-3.25, 1.0 / 3.0),
        projection_offset_y_mm=[0.1, 0.2, 0.3, 0.4],
    )
    path = tmp_path / "g.json"
    write_geometry_json(g, path)
    assert read_geometry_json(path) == g
    assert ConeBeamGeometry.from_json(g.to_json()) == g
    # Detector arguments override the file; a new spacing re-centres the detector.
    moved = read_geometry(path, detector_spacing_uv_mm=2.0)
    assert moved.detector_spacing_uv_mm == (2.0, 2.0) and moved.detector_origin_uv_mm == (-7.0, -5.0)
    with pytest.raises(ValueError, match="unknown"):
        ConeBeamGeometry.from_dict({**g.to_dict(), "colour": "red"})


def test_subsets_and_row_crops():
    g = small_geometry()
    assert g.subset(slice(1, 3)).n_projections == 2
    cropped = g.with_detector_rows(2, 5)
    assert cropped.projection_shape == (4, 3, 8)
    np.testing.assert_allclose(cropped.v_mm(), g.v_mm()[2:5])
    with pytest.raises(ValueError, match="rows: expected"):
        g.with_detector_rows(5, 5)
