"""Studies with a multi-echo spin echo (MESE) and no Dixon: the legs are segmented on the
water and fat amplitudes of the EPG fit itself; CSA per leg, VOL only with contiguous
slices, water T2 per leg; SEG on the MESE geometry; through `musclenode process` and
through a node to Orthanc. Phantoms: EPG echo trains with the 2D slice profile, slices
10 mm thick with gaps, SNR 100."""

import csv
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import wait_until, write_datasets
from test_cli import run
from test_node_e2e import sr_numbers, value
from validators import dciodvfy_errors, dcmqi_seg_readback, tid1500_readback

from node.config import Destination
from node.processing import build_outputs
from quant.enums import Region, Side
from quant.pipeline import NoDixonError, analyse_study
from quant.synthetic.mese_exam import mese_only_datasets, mese_only_truth
from quant.synthetic.phantom import make_leg_phantom

T2_LEFT, RIGHT_OFFSET = 32.0, 4.0      # muscle water T2 (ms) of the left leg; the right leg's is 4 ms longer
#: 6 slices of 96 x 160 (2.5 mm pixels), partial volume (3x3 sub-voxels) and a 1 mm dark fascia
GEOMETRY = dict(shape=(6, 96, 160), pixel_mm=2.5, supersample=3, fascia_mm=1.0)


def phantom(spacing_mm: float, seed: int = 3):
    return make_leg_phantom(Region.THIGH, slice_mm=spacing_mm, seed=seed, **GEOMETRY)


def study(ph, **kw):
    return mese_only_datasets(ph, t2w_muscle_ms=T2_LEFT, right_t2_offset_ms=RIGHT_OFFSET, snr=100.0, **kw)


@pytest.fixture(scope="module")
def gap_phantom():
    return phantom(20.0)     # slices 10 mm thick every 20 mm


def check_values(analysis, ph):
    truth = mese_only_truth(ph, t2w_muscle_ms=T2_LEFT, right_t2_offset_ms=RIGHT_OFFSET)
    got = {(m.side, m.metric): m for m in analysis.measurements}
    for side in (Side.RIGHT, Side.LEFT):
        assert abs(got[(side, "t2w_ms")].value - truth[(side, "t2w_ms")]) < 1.0, side
        assert got[(side, "csa_mm2")].value == pytest.approx(truth[(side, "csa_mm2")], rel=0.05), side
        assert got[(side, "csa_mm2")].model == "epg-bicomponent"
        assert {"t2w_mean_ms", "t2w_iqr_ms", "b1", "ff_t2_percent"} <= {m for s, m in got if s is side}
    assert not {m for _, m in got} & {"ff_percent", "frma_mm2"}     # no Dixon: no Dixon FF, no fRMA
    return got, truth


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced"])
def test_mese_only_with_gaps(gap_phantom, enhanced):
    datasets = study(gap_phantom, slice_thickness_mm=10.0, enhanced=enhanced, seed=1 + enhanced)
    a = analyse_study(datasets)
    got, _ = check_values(a, gap_phantom)
    assert not any(m == "vol_ml" for _, m in got)
    assert any("volume not reported" in n and "gaps of 10 mm" in n for n in a.notes)
    assert a.segmentation.region is Region.THIGH
    mese_uid = str(datasets[0].SeriesInstanceUID)
    assert a.anatomy.series_instance_uid == mese_uid and a.anatomy.array.ndim == 3
    assert a.anatomy.spacing_mm[0] == pytest.approx(20.0)


def test_mese_only_contiguous_reports_volume():
    ph = phantom(10.0, seed=4)
    a = analyse_study(study(ph, seed=4))          # slice thickness = spacing = 10 mm
    got, truth = check_values(a, ph)
    for side in (Side.RIGHT, Side.LEFT):
        assert got[(side, "vol_ml")].value == pytest.approx(truth[(side, "vol_ml")], rel=0.05)
    assert not any("volume not reported" in n for n in a.notes)


def test_siemens_product_mese_17_echoes_enhanced(gap_phantom):
    """As it comes from the scanner: 17 echoes, one Enhanced MR instance per echo, frames
    = slices (in descending position), Body Part Examined LEG, 12-bit pixels."""
    datasets = study(gap_phantom, slice_thickness_mm=10.0, siemens=True, seed=5)
    assert len(datasets) == 17 and {int(d.NumberOfFrames) for d in datasets} == {6}
    assert {d.BodyPartExamined for d in datasets} == {"LEG"} and datasets[0].Manufacturer == "SIEMENS"
    out = build_outputs(datasets)
    check_values(out.analysis, gap_phantom)
    assert out.analysis.segmentation.region is Region.THIGH          # LEG: the level from anatomy
    assert "anatomy" in out.analysis.segmentation.region_reason
    # the SEG references the frames of the first echo's instance, each at its own position
    first_echo = min(datasets, key=lambda d: d.SharedFunctionalGroupsSequence[0].MREchoSequence[0].EffectiveEchoTime)
    position = {i + 1: tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient)
                for i, f in enumerate(first_echo.PerFrameFunctionalGroupsSequence)}
    seg = out.seg
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first_echo.SeriesInstanceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == first_echo.SOPInstanceUID
        assert position[int(src.ReferencedFrameNumber)] == tuple(
            round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)


def test_study_with_neither_dixon_nor_mese_names_what_it_found(gap_phantom):
    datasets = study(gap_phantom, slice_thickness_mm=10.0)
    one_echo = [d for d in datasets if int(d.EchoNumbers) == 1]
    with pytest.raises(NoDixonError, match="no Dixon water and fat series and no multi-echo spin echo"):
        analyse_study(one_echo)


def test_process_mese_only_study(gap_phantom, tmp_path):
    datasets = study(gap_phantom, slice_thickness_mm=10.0)
    write_datasets(datasets, tmp_path / "in")
    t0 = time.time()
    r = run("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr
    assert "volume not reported" in r.stdout
    out = tmp_path / "out"
    segs, srs = list(out.glob("seg-*.dcm")), list(out.glob("sr-*.dcm"))
    assert len(segs) == 1 and len(srs) == 1
    with open(out / "measurements.csv") as fh:
        rows = list(csv.DictReader(fh))
    truth = mese_only_truth(gap_phantom, t2w_muscle_ms=T2_LEFT, right_t2_offset_ms=RIGHT_OFFSET)
    metrics = {(row["side"], row["metric"]): float(row["value"]) for row in rows}
    assert {m for _, m in metrics} == {"csa_mm2", "t2w_ms", "t2w_mean_ms", "t2w_iqr_ms", "b1", "ff_t2_percent"}
    assert {row["model"] for row in rows} == {"epg-bicomponent"}
    for side in (Side.RIGHT, Side.LEFT):
        assert abs(metrics[(side.value, "t2w_ms")] - truth[(side, "t2w_ms")]) < 1.0
        assert metrics[(side.value, "csa_mm2")] == pytest.approx(truth[(side, "csa_mm2")], rel=0.05)
    seg = pydicom.dcmread(segs[0])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == datasets[0].SeriesInstanceUID
    print(f"musclenode process, MESE-only study: {elapsed:.1f} s")


@pytest.mark.peers
@pytest.mark.skipif(not Path("/usr/bin/storescu").exists() or not Path("/usr/sbin/Orthanc").exists(),
                    reason="needs DCMTK and Orthanc (apt-get install dcmtk orthanc)")
def test_mese_only_through_node_to_orthanc(make_node, orthanc, gap_phantom, tmp_path):
    datasets = study(gap_phantom, slice_thickness_mm=10.0, enhanced=True, seed=6)
    dest = Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    node = make_node(destinations=[dest], executor="process", complete_after=1.0)
    files = write_datasets(datasets, tmp_path / "in")
    r = subprocess.run(["/usr/bin/storescu", "-aec", "MUSCLENODE", "-aet", "SCANNER", "127.0.0.1",
                        str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    study_uid = str(datasets[0].StudyInstanceUID)

    def arrived():
        found = {}
        for inst in orthanc.instances_of_study(study_uid):
            tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
            found[tags["Modality"]] = inst["ID"]
        return found if {"SEG", "SR"} <= set(found) else None
    found = wait_until(arrived, timeout=120, interval=0.3, what="SEG and SR in Orthanc")
    paths = {}
    for mod in ("SEG", "SR"):
        paths[mod] = tmp_path / f"{mod}.dcm"
        paths[mod].write_bytes(orthanc.file(found[mod]))
        assert dciodvfy_errors(paths[mod]) == [], mod
    assert dcmqi_seg_readback(paths["SEG"], tmp_path / "dcmqi-seg")
    meta = tid1500_readback(paths["SR"], tmp_path / "sr.json")
    mese_uid = str(datasets[0].SeriesInstanceUID)
    # two legs and, [rois] compartments, 3 compartments each; volumetric, and planar on the key slice
    assert len(meta["Measurements"]) == 16
    assert {m["SourceSeriesForImageSegmentation"] for m in meta["Measurements"]
            if not m["TrackingIdentifier"].endswith("key slice")} == {mese_uid}
    seg = hd.seg.segread(paths["SEG"])
    assert seg.number_of_segments == 12
    assert {s[1:] for s in seg.get_source_image_uids()} == {(mese_uid, str(datasets[0].SOPInstanceUID))}  # echo 1
    sr = hd.sr.srread(paths["SR"])
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 8 and "left thigh medial compartment (automatic)" in {g.tracking_identifier for g in groups}
    nums = sr_numbers(pydicom.dcmread(paths["SR"]))
    truth = mese_only_truth(gap_phantom, t2w_muscle_ms=T2_LEFT, right_t2_offset_ms=RIGHT_OFFSET)
    for side in (Side.RIGHT, Side.LEFT):
        group = f"{side.value} thigh muscle"
        assert abs(value(nums, group, "T2", derivation="Median") - truth[(side, "t2w_ms")]) < 1.0
        assert value(nums, group, "Area") == pytest.approx(truth[(side, "csa_mm2")], rel=0.05)
        assert not [n for g, n, *_ in nums if g == group and n == "Volume"]
    assert np.isfinite(value(nums, "right thigh muscle", "Fat fraction", method_word="extended phase graph"))


def test_fat_t2_far_from_the_default_is_calibrated_before_segmenting(gap_phantom):
    """Fat T2 120 ms (the default is 151 ms): with the default in the first pass,
    subcutaneous fat would read as part water and pass for muscle (CSA +59 %)."""
    a = analyse_study(study(gap_phantom, slice_thickness_mm=10.0, fat_t2_ms=120.0, seed=8))
    check_values(a, gap_phantom)
    first_pass = next(n for n in a.notes if n.startswith("no Dixon series"))
    assert "slowly decaying voxels" in first_pass
    assert 110 <= float(first_pass.split("fat T2 ")[1].split(" ms")[0]) <= 130, first_pass
