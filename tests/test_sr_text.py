"""The SR as a reader sees it in a PACS that shows SRs as text (issue 12, items 4 and 5):
rendered with DCMTK's dsr2html, values at the precision of their method, a measurement method
only under what the method made, the interval once per group, the body region as the
procedure, and planar key-slice outlines (TID 1410) that web viewers draw."""

from __future__ import annotations

import datetime as dt
import html
import re
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage as ndi
from validators import dciodvfy_errors, tid1500_readback

from node.processing import build_outputs, prior_key
from quant.enums import Region, Side, Tissue
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets
from reports.longitudinal import PriorValue
from reports.outline import key_slice, outline, study_key_slice
from reports.seg import roi_mask


def _priors() -> dict:
    """Area and FF of both legs at baseline (2026-01-01) and three months on; the FF of the
    right leg only from three months on (its baseline is another visit: its own interval)."""
    out: dict = {}
    for side in ("right", "left"):
        out[prior_key("thigh", side, "csa_mm2")] = [PriorValue("1.2.3.1", dt.date(2026, 1, 1), 9100.0),
                                                    PriorValue("1.2.3.2", dt.date(2026, 4, 1), 9000.0)]
        ff = [PriorValue("1.2.3.2", dt.date(2026, 4, 1), 5.0)]
        if side == "left":
            ff.insert(0, PriorValue("1.2.3.1", dt.date(2026, 1, 1), 4.5))
        out[prior_key("thigh", side, "ff_percent")] = ff
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    ph = make_leg_phantom(Region.THIGH, shape=(5, 96, 160), supersample=2, seed=8, compartments=True)
    datasets = phantom_datasets(ph, study_date="20260701", uid_seed="sr-text")
    out = build_outputs(datasets, _priors(), compartments=True)
    folder = tmp_path_factory.mktemp("sr-text")
    path = folder / "sr.dcm"
    out.sr.save_as(path, enforce_file_format=True)
    return out, path, folder


def _rendered(path, folder) -> list[str]:
    """The lines of text dsr2html shows (tags stripped, blank lines dropped)."""
    if not shutil.which("dsr2html"):
        pytest.skip("DCMTK's dsr2html is not installed")
    target = folder / "sr.html"
    subprocess.run(["dsr2html", str(path), str(target)], check=True, capture_output=True, timeout=60)
    text = re.sub(r"</?(span|b|i|a|u|small|font)\b[^>]*>", "", target.read_text(errors="replace"))  # inline
    text = html.unescape(re.sub(r"<[^>]+>", "\n", text))                                             # blocks
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _values(lines: list[str]) -> list[tuple[str, str, str, list[str]]]:
    """(name, number, unit, modifiers) of each numeric item as rendered ("Area:" then "8709 mm2",
    then its "Concept Modifier : ..." lines)."""
    out = []
    for i in range(len(lines) - 1):
        m = re.fullmatch(r"(-?\d+(?:\.\d+)?) (\S+)", lines[i + 1])
        if lines[i].endswith(":") and m:
            mods = []
            for later in lines[i + 2:]:
                if not later.startswith("Concept Modifier"):
                    break
                mods.append(later)
            out.append((lines[i][:-1], m.group(1), m.group(2), mods))
    return out


def test_dsr2html_shows_named_values_at_their_precision(study):
    out, path, folder = study
    lines = _rendered(path, folder)
    values = _values(lines)
    assert len(values) > 40
    decimals = {"mm2": 0, "mm2/a": 0, "d": 0, "mL": 1, "mL/a": 1, "%": 1, "%/a": 1, "ms": 1, "1": 3}
    for name, number, unit, _ in values:
        places = len(number.split(".")[1]) if "." in number else 0
        assert places == decimals[unit], (name, number, unit)
    areas = [int(n) for name, n, u, _ in values if name == "Area"]
    truth = [m.value for m in out.analysis.measurements if m.metric == "csa_mm2" and not m.roi]
    assert sorted(round(v) for v in truth) == sorted(areas[:2]) or set(round(v) for v in truth) <= set(areas)
    # a method only under what it made: never under an area or a volume
    for name, _, _, mods in values:
        if name.startswith(("Area", "Volume", "Change in area", "Change in volume")):
            assert not [m for m in mods if "Measurement Method" in m], name
    assert any("Measurement Method = Magnitude Dixon" in m for name, _, _, mods in values if name == "Fat fraction"
               for m in mods)
    # the algorithm once per group (not under every value)
    assert not [v for v in values if any("Algorithm Version" in m for m in v[3])]
    # the body region as the procedure
    assert [line for line in lines if "Procedure reported = Magnetic resonance imaging of thigh" in line]


def test_interval_is_stated_once_per_group(study):
    out, path, folder = study
    lines = _rendered(path, folder)
    # left leg: every metric compared has the same baseline: one interval, shared
    sr = hd.sr.Comprehensive3DSR.from_dataset(out.sr, copy=True)
    by_id = {g.tracking_identifier: {m.name.meaning: m.value for m in g.get_measurements()}
             for g in sr.content.get_volumetric_roi_measurement_groups()}
    left, right = by_id["left thigh muscle"], by_id["right thigh muscle"]
    assert left["Interval since baseline"] == 181 and left["Interval since previous visit"] == 91
    assert not [k for k in left if k.startswith("Interval since baseline (")]
    # right leg: FF's baseline is a later visit than the area's: FF states its own interval
    assert "Interval since baseline" not in right
    assert right["Interval since baseline (area)"] == 181 and right["Interval since baseline (fat fraction)"] == 91
    assert right["Interval since previous visit"] == 91
    # as text: one "Interval since baseline" line for the left leg, none repeated under each metric
    assert lines.count("Interval since baseline:") == 1
    assert lines.count("Interval since baseline (area):") == 1


def test_planar_key_slice_outlines(study):
    out, path, folder = study
    a = out.analysis
    sr = hd.sr.srread(path)
    planar = {g.tracking_identifier: g for g in sr.content.get_planar_roi_measurement_groups()}
    rois = [(label, side) for label in a.rois.names for side in (Side.RIGHT, Side.LEFT)
            if roi_mask(a, label, side).any()]
    assert len(planar) == 2 + len(rois)   # each leg, each ROI on each side
    muscle = a.segmentation.tissue == Tissue.MUSCLE
    k = key_slice(muscle, [roi_mask(a, label, side) for label, side in rois])
    present = [j for j in range(muscle.shape[0]) if all(roi_mask(a, lab, s)[j].any() for lab, s in rois)]
    assert k in present and muscle[k].sum() >= 0.95 * max(muscle[j].sum() for j in present)
    assert k == study_key_slice(a)   # the slice the summary page shows
    source_uid = a.anatomy.sop_instance_uids[k]
    for side in (Side.RIGHT, Side.LEFT):
        g = planar[f"{side.value} thigh muscle, key slice"]
        region = g.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert np.array_equal(points[0], points[-1])            # closed
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source_uid
        mask = a.segmentation.mask(Tissue.MUSCLE, side)[k]
        values = {m.name.meaning: m.value for m in g.get_measurements()}
        assert values["Area"] == round(mask.sum() * a.anatomy.pixel_area_mm2)
        ff = a.fat_fraction[k][mask]
        assert values["Fat fraction"] == pytest.approx(np.nanmean(ff) * 100, abs=0.05 + 1e-9)
        # the outline runs along the mask's edge: every point half a pixel from a muscle pixel centre
        rows, cols = np.nonzero(mask)
        centres = np.stack([cols + 0.5, rows + 0.5], axis=1)
        d = np.min(np.abs(points[:, None, :] - centres[None, :, :]).max(axis=2), axis=1)
        assert d.max() <= 0.5 + 1e-6
        # and encloses the largest part of the mask with its holes (the femur): its area is that
        # part's, less the corners the line cuts
        parts, n = ndi.label(mask)
        largest = ndi.binary_fill_holes(parts == 1 + np.argmax(ndi.sum(mask, parts, range(1, n + 1))))
        x, y = points[:, 0].astype(float), points[:, 1].astype(float)
        area_px = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
        assert 0.9 * largest.sum() < area_px <= largest.sum()


def test_planar_groups_read_back_with_dcmqi_and_pass_dciodvfy(study):
    _, path, folder = study
    assert dciodvfy_errors(path) == []
    doc = tid1500_readback(path, folder / "sr.json")
    ids = {g["TrackingIdentifier"] for g in doc["Measurements"]}
    assert {"right thigh muscle", "left thigh muscle"} <= ids
    ds = pydicom.dcmread(path)
    assert ds.ContinuityOfContent == "SEPARATE"


def test_outline_of_a_ring_is_its_outer_edge():
    mask = np.zeros((20, 20), bool)
    mask[4:16, 4:16] = True
    mask[8:12, 8:12] = False            # a hole (the bone)
    mask[1, 1] = True                   # a speck
    points = outline(mask)
    assert points is not None and np.array_equal(points[0], points[-1])
    assert points[:, 0].min() == pytest.approx(4.5 - 0.5, abs=0.51) and points[:, 0].max() <= 16.0
    assert outline(np.zeros((5, 5), bool)) is None
