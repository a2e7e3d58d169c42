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
