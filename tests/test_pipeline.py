"""The study pipeline on the kinds of exam it meets: multi-echo gradient echo (MEGRE) alone, or
beside the Dixon series; the DICOM objects made from them validate."""

import numpy as np
import pytest
from conftest import REALISTIC, small_phantom
from validators import dciodvfy_errors

from node.processing import build_outputs, encode
from quant.enums import Model, Side
from quant.pipeline import analyse_study, phase_to_radians
from quant.synthetic.exam import megre_datasets
from quant.synthetic.phantom import phantom_datasets


@pytest.fixture(scope="module")
def phantom():
    return small_phantom(seed=4, muscle_ff=0.15, **REALISTIC)


@pytest.mark.parametrize("with_dixon", [False, True])
def test_multi_echo_megre_gives_pdff(phantom, with_dixon):
    dixon = phantom_datasets(phantom, uid_seed="megre")
    datasets = megre_datasets(phantom, dixon[0]) + (dixon if with_dixon else [])
    a = analyse_study(datasets)
    got = {(m.side, m.metric): m for m in a.measurements}
    for side in (Side.RIGHT, Side.LEFT):
        ff = got[(side, "ff_percent")]
        assert ff.model == Model.MEGRE_PDFF
        assert abs(ff.value - phantom.truth[(side, "ff_percent")]) < 1.0
        assert got[(side, "csa_mm2")].value == pytest.approx(phantom.truth[(side, "csa_mm2")], rel=0.03)


def test_seg_and_sr_from_multi_echo_gradient_echo_validate(phantom, tmp_path):
    dixon = phantom_datasets(phantom, uid_seed="megre2")
    out = build_outputs(megre_datasets(phantom, dixon[0]))
    for name, ds in (("seg", out.seg), ("sr", out.sr)):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(encode(ds))
        assert dciodvfy_errors(path) == []
    assert "6-peak" in str(out.sr.ContentSequence)


def test_phase_scaling_conventions():
    rad = np.array([-np.pi, 0.0, np.pi / 2])
    np.testing.assert_allclose(phase_to_radians(rad), rad)
    np.testing.assert_allclose(phase_to_radians(np.array([-4096.0, 0.0, 2048.0])), [-np.pi, 0.0, np.pi / 2])
    np.testing.assert_allclose(phase_to_radians(np.array([0.0, 2048.0, 4096.0])), [-np.pi, 0.0, np.pi])


def test_a_reader_seg_is_used_on_a_megre_only_study():
    """A reader's SEG on the MEGRE magnitude series (the series segmented when no Dixon came)
    gives the ROIs, as on a Dixon study; a SEG of another series is refused with the reason."""
    import highdicom as hd
    import numpy as np
    from highdicom.sr import CodedConcept

    ph = small_phantom(seed=7, compartments=True, **REALISTIC)
    dixon = phantom_datasets(ph, uid_seed="megre-reader")
    megre = megre_datasets(ph, dixon[0])
    a = analyse_study(megre)
    by_uid = {str(d.SOPInstanceUID): d for d in megre}
    sources = [by_uid[u] for u in a.anatomy.sop_instance_uids]
    desc = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=f"compartment {i + 1}",
        segmented_property_category=CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=CodedConcept("102292000", "SCT", "Skeletal muscle structure of lower limb"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL) for i in range(3)]
    masks = np.stack([ph.compartment == i + 1 for i in range(3)], axis=-1).astype(np.uint8)

    def seg(src):
        return hd.seg.Segmentation(
            source_images=src, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=desc, series_instance_uid=hd.UID(), series_number=300,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="Reader viewer",
            manufacturer_model_name="viewer", software_versions="1", device_serial_number="1")
    first_series = sorted((d for d in dixon if d.SeriesInstanceUID == dixon[0].SeriesInstanceUID),
                          key=lambda d: d.InstanceNumber)
    good, other = seg(sources), seg(first_series)
    b = analyse_study(megre, reader_segs=[good, other])
    assert b.rois is not None and {m.roi for m in b.measurements if m.roi} == {"compartment 1", "compartment 2",
                                                                              "compartment 3"}
    assert [uid for uid, _ in b.roi_refusals] == [str(other.SOPInstanceUID)]
    assert "reader SEG not used" in b.roi_refusals[0][1]


def test_quant_sets_the_numeric_libraries_threads_before_numpy_loads():
    """``quant`` (imported first by ``node``) makes OpenMP's waiting threads sleep and OpenBLAS
    single-threaded, before numpy is loaded (OpenBLAS reads its setting then), unless the
    environment says otherwise."""
    import os
    import subprocess
    import sys
    code = ("import os, node; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['OPENBLAS_NUM_THREADS'])")
    probe = "import sys, quant; print('numpy' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS")}
    run = lambda c, e: subprocess.run([sys.executable, "-c", c], env=e, capture_output=True, text=True,  # noqa: E731
                                      check=True).stdout.split()
    assert run(probe, env) == ["False"]
    assert run(code, env) == ["PASSIVE", "1"]
    assert run(code, {**env, "OPENBLAS_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}) == ["ACTIVE", "4"]
