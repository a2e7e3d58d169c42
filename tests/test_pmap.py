"""Parametric maps (reports.pmap): valid DICOM (dciodvfy), read back with highdicom, equal to
the node's own maps; and a node with an Orthanc destination sends them."""

import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import wait_until, write_datasets
from validators import dciodvfy_errors

from node.config import Destination
from node.processing import build_outputs, encode
from quant.enums import Region
from quant.synthetic.exam import exam_datasets
from quant.synthetic.phantom import make_leg_phantom
from reports.pmap import NO_VALUE_NOTE, build_parametric_maps


@pytest.fixture(scope="module")
def study():
    phantom = make_leg_phantom(Region.THIGH, shape=(6, 96, 160), supersample=2)
    datasets = exam_datasets(phantom, patient_id="PM-0001", uid_seed="pmap")
    return datasets, build_outputs(datasets)


def _values(pm, grid) -> np.ndarray:
    """Real-world values of a map read back (stored float values through the mapping), each
    frame put at the slice of ``grid`` its Image Position (Patient) lies on (highdicom orders
    the frames by position).
    """
    item = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    frames = pm.pixel_array.astype(np.float64) * float(item.RealWorldValueSlope) + float(item.RealWorldValueIntercept)
    out = np.full(grid.array.shape[-3:], np.nan)
    for frame, fg in zip(frames, pm.PerFrameFunctionalGroupsSequence, strict=True):
        pos = np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float)
        k = float(np.dot(pos - np.asarray(grid.origin_mm), grid.normal)) / grid.spacing_mm[0]
        assert abs(k - round(k)) < 1e-3
        out[round(k)] = frame
    return out


def test_maps_valid_and_equal_to_the_node_maps(study, tmp_path):
    datasets, out = study
    a = out.analysis
    assert a.t2 is not None
    by_label = {str(pm.ContentLabel): pm for pm in out.pmaps}
    assert list(by_label) == ["FF", "T2W", "B1", "FF_T2"]
    assert [int(pm.SeriesNumber) for pm in out.pmaps] == [903, 904, 905, 906]
    units = {"FF": "%", "T2W": "ms", "B1": "1", "FF_T2": "%"}
    for label, pm in by_label.items():
        path = tmp_path / f"{label}.dcm"
        path.write_bytes(encode(pm))
        assert dciodvfy_errors(path) == [], label
        back = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
        assert back.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert "FloatPixelData" in back and back.pixel_array.dtype == np.float32
        item = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert item.MeasurementUnitsCodeSequence[0].CodeValue == units[label]
        assert NO_VALUE_NOTE in item.LUTExplanation
        source = a.anatomy if label == "FF" else a.t2.volume
        assert back.FrameOfReferenceUID == source.frame_of_reference_uid
        refs = {r.ReferencedSOPInstanceUID for s in back.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
        assert refs == set(source.sop_instance_uids)   # the MESE maps: its first echo's instances
        values = _values(back, source)
        if label == "FF":
            want = a.fat_fraction * 100
            both = np.isfinite(values)
            assert both.mean() > 0.3 and np.isfinite(want[both]).all()
            assert np.abs(values[both] - want[both]).max() < 0.01
        else:
            fit = a.t2.fit
            want = {"T2W": fit.t2w_ms, "B1": fit.b1, "FF_T2": fit.ff * 100}[label]
            known = fit.fitted if label == "FF_T2" else fit.success
            assert np.array_equal(np.isfinite(values), known)
            np.testing.assert_allclose(values[known], np.asarray(want, np.float32)[known], rtol=1e-6)
    # deterministic: the same inputs, the same UIDs
    again = build_parametric_maps(a, datasets)
    assert [pm.SOPInstanceUID for pm in again] == [pm.SOPInstanceUID for pm in out.pmaps]


def test_no_mese_no_t2_maps():
    phantom = make_leg_phantom(Region.THIGH, shape=(4, 64, 112), supersample=1)
    datasets = exam_datasets(phantom, mese=False, patient_id="PM-0002", uid_seed="pmap2")
    out = build_outputs(datasets)
    skipped: list[tuple[str, str]] = []
    maps = build_parametric_maps(out.analysis, datasets, skipped=skipped)
    assert [str(pm.ContentLabel) for pm in maps] == ["FF"]
    assert [k for k, _ in skipped] == ["t2w", "b1", "ff_t2"]


def test_enhanced_mese_maps(tmp_path):
    """MESE as Enhanced MR (one multi-frame instance per echo): the T2 maps reference the first echo's instance."""
    phantom = make_leg_phantom(Region.THIGH, shape=(6, 96, 160), supersample=2)
    datasets = exam_datasets(phantom, enhanced_mese=True, patient_id="PM-0003", uid_seed="pmap3")
    out = build_outputs(datasets)
    t2 = out.analysis.t2
    assert t2 is not None and [str(pm.ContentLabel) for pm in out.pmaps] == ["FF", "T2W", "B1", "FF_T2"]
    pm = out.pmaps[1]
    path = tmp_path / "t2w.dcm"
    path.write_bytes(encode(pm))
    assert dciodvfy_errors(path) == []
    values = _values(hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path)), t2.volume)
    known = t2.fit.success
    assert np.array_equal(np.isfinite(values), known)
    np.testing.assert_allclose(values[known], t2.fit.t2w_ms[known], rtol=1e-6)


@pytest.mark.skipif(not Path("/usr/bin/storescu").exists() or not Path("/usr/sbin/Orthanc").exists(),
                    reason="needs DCMTK and Orthanc (apt-get install dcmtk orthanc)")
def test_node_sends_maps_to_orthanc(make_node, orthanc, study, tmp_path):
    datasets, out = study
    node = make_node(destinations=[Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port)],
                     complete_after=0.5)
    files = write_datasets(datasets, tmp_path / "in")
    r = subprocess.run(["/usr/bin/storescu", "-aec", "MUSCLENODE", "-aet", "SCANNER", "127.0.0.1", str(node.port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    t0 = time.time()
    want = {str(pm.SOPInstanceUID) for pm in out.pmaps}

    def arrived():
        uids = {orthanc.get(f"/instances/{i['ID']}/simplified-tags")["SOPInstanceUID"]
                for i in orthanc.instances_of_study(str(datasets[0].StudyInstanceUID))}
        return uids if want <= uids else None
    wait_until(arrived, timeout=240, interval=0.5, what="parametric maps in Orthanc")
    assert time.time() - t0 < 240
