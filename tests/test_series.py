"""Series recognition (quant.series): Dixon kinds by vendor convention, MESE, and the
series that are skipped with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_builders import (
    CT_IMAGE_STORAGE,
    enhanced_mr_instance,
    enhanced_mr_series,
    mr_series,
    mr_slice,
    slice_positions,
)

from quant.enums import SeriesKind
from quant.series import DIXON_CONVENTIONS, SeriesInfo, classify_series

W, F, IP, OP = SeriesKind.WATER, SeriesKind.FAT, SeriesKind.IN_PHASE, SeriesKind.OPPOSED_PHASE
UNKNOWN, MESE = SeriesKind.UNKNOWN, SeriesKind.MESE

# ImageType values that say nothing about Dixon, as each vendor writes them
SIEMENS_PLAIN = ("ORIGINAL", "PRIMARY", "M", "ND", "NORM")
PHILIPS_PLAIN = ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE")
GE_PLAIN = ("ORIGINAL", "PRIMARY", "OTHER")


def dixon_series(image_type, description, n=3):
    """A single-echo Dixon-like series (one TE, gradient echo) of ``n`` slices."""
    return mr_series(n, image_type=image_type, series_description=description,
                     echo_time=2.46, scanning_sequence="GR")


DIXON_CASES = [
    # --- Siemens VIBE / TSE Dixon: both Image Type and description
    (("DERIVED", "PRIMARY", "DIXON", "WATER"), "t1_vibe_dixon_tra_W", W),
    (("DERIVED", "PRIMARY", "DIXON", "FAT"), "t1_vibe_dixon_tra_F", F),
    (("DERIVED", "PRIMARY", "DIXON", "IN_PHASE"), "t1_vibe_dixon_tra_in", IP),
    (("DERIVED", "PRIMARY", "DIXON", "OPP_PHASE"), "t1_vibe_dixon_tra_opp", OP),
    (("DERIVED", "PRIMARY", "DIXON", "WATER"), "t2_tse_dixon_cor_W", W),
    # Siemens, Image Type only (description without the kind suffix)
    (("DERIVED", "PRIMARY", "DIXON", "WATER"), "t1_vibe_dixon_tra", W),
    (("DERIVED", "PRIMARY", "DIXON", "FAT"), "t1_vibe_dixon_tra", F),
    (("DERIVED", "PRIMARY", "DIXON", "IN_PHASE"), "t1_vibe_dixon_tra", IP),
    (("DERIVED", "PRIMARY", "DIXON", "OPP_PHASE"), "t1_vibe_dixon_tra", OP),
    (("DERIVED", "PRIMARY", "DIXON", "OUT_PHASE"), "t1_vibe_dixon_tra", OP),
    # Siemens, description only
    (SIEMENS_PLAIN, "t1_vibe_dixon_tra_W", W),
    (SIEMENS_PLAIN, "t1_vibe_dixon_tra_F", F),
    (SIEMENS_PLAIN, "t1_vibe_dixon_tra_in", IP),
    (SIEMENS_PLAIN, "t1_vibe_dixon_tra_opp", OP),
    # --- Philips mDIXON: both
    (("ORIGINAL", "PRIMARY", "W", "W"), "mDIXON_W", W),
    (("ORIGINAL", "PRIMARY", "F", "F"), "mDIXON_F", F),
    (("ORIGINAL", "PRIMARY", "IP", "IP"), "sWIP mDIXON XD IP", IP),
    (("ORIGINAL", "PRIMARY", "OP", "OP"), "sWIP mDIXON XD OP", OP),
    (("DERIVED", "PRIMARY", "W", "W", "DERIVED"), "sWIP mDIXON XD W", W),
    # Philips, Image Type only
    (("ORIGINAL", "PRIMARY", "W", "W"), "sWIP mDIXON XD", W),
    (("ORIGINAL", "PRIMARY", "F", "F"), "sWIP mDIXON XD", F),
    (("ORIGINAL", "PRIMARY", "IP", "IP"), "sWIP mDIXON XD", IP),
    (("ORIGINAL", "PRIMARY", "OP", "OP"), "sWIP mDIXON XD", OP),
    # Philips, description only
    (PHILIPS_PLAIN, "mDIXON_W", W),
    (PHILIPS_PLAIN, "mDIXON_F", F),
    (PHILIPS_PLAIN, "sWIP mDIXON XD IP", IP),
    (PHILIPS_PLAIN, "sWIP mDIXON XD OP", OP),
    (PHILIPS_PLAIN, "sWIP mDIXON XD F", F),
    # --- GE IDEAL / LAVA-Flex: plain Image Type, the kind leads the description
    (GE_PLAIN, "WATER: Ax LAVA-Flex", W),
    (GE_PLAIN, "FAT: Ax LAVA-Flex", F),
    (GE_PLAIN, "InPhase: Ax LAVA-Flex", IP),
    (GE_PLAIN, "OutPhase: Ax LAVA-Flex", OP),
    (GE_PLAIN, "WATER: AX T2 FSE IDEAL", W),
    (GE_PLAIN, "FAT: Cor T1 FSE IDEAL thighs", F),
    (GE_PLAIN, "InPhase: BH Ax LAVA-Flex Mask", IP),
    (GE_PLAIN, "OutPhase: IDEAL IQ (20sec BH)", OP),
    (GE_PLAIN, "Water", W),
    (GE_PLAIN, "inphase", IP),
    (GE_PLAIN, "outphase", OP),
    # GE, Image Type only (description without the kind)
    (("DERIVED", "PRIMARY", "WATER"), "Ax LAVA-Flex", W),
    (("DERIVED", "PRIMARY", "FAT"), "Ax LAVA-Flex", F),
    (("DERIVED", "PRIMARY", "IN PHASE"), "Ax LAVA-Flex", IP),
    (("DERIVED", "PRIMARY", "OUT PHASE"), "Ax LAVA-Flex", OP),
]


@pytest.mark.parametrize("image_type, description, kind", DIXON_CASES,
                         ids=[f"{'/'.join(c[0])}|{c[1]}" for c in DIXON_CASES])
def test_dixon_conventions(image_type, description, kind):
    datasets = dixon_series(image_type, description)
    info = classify_series(datasets)
    assert isinstance(info, SeriesInfo)
    assert info.kind is kind, info.reason
    assert info.usable
    assert info.description == description
    assert info.series_instance_uid == datasets[0].SeriesInstanceUID
    assert info.series_number == 3
    assert info.n_instances == 3
    assert info.echo_times_ms == (2.46,)
    # the reason says which attribute decided
    assert ("Image Type" in info.reason) or (repr(description) in info.reason)


@pytest.mark.parametrize("image_type, description", [
    (("DERIVED", "PRIMARY", "DIXON", "WATER"), "t1_vibe_dixon_tra"),
    (("ORIGINAL", "PRIMARY", "IP", "IP"), "sWIP mDIXON XD"),
])
def test_image_type_is_trusted_before_description(image_type, description):
    info = classify_series(dixon_series(image_type, description + "_F"))
    kind = W if "WATER" in image_type else IP
    assert info.kind is kind
    assert info.reason.startswith("Image Type")


def test_every_convention_has_a_kind_and_matcher():
    vendors = {c.vendor for c in DIXON_CONVENTIONS}
    assert vendors == {"Siemens", "Philips", "GE"}
    for vendor in vendors:
        kinds = {c.kind for c in DIXON_CONVENTIONS if c.vendor == vendor}
        assert kinds == {W, F, IP, OP}, vendor


# Non-Dixon, single-echo series whose descriptions come near the Dixon conventions
@pytest.mark.parametrize("image_type, description", [
    (SIEMENS_PLAIN, "t1_tse_tra"),
    (SIEMENS_PLAIN, "t2_tse_stir_cor"),
    (SIEMENS_PLAIN, "pd_tse_fs_cor"),
    (PHILIPS_PLAIN, "sWIP T1W_TSE SENSE"),
    (GE_PLAIN, "Ax T1 FSE"),
    (GE_PLAIN, "FAT SAT Ax T2 FSE"),
    (GE_PLAIN, "Fat Fraction: IDEAL IQ"),
    (GE_PLAIN, "Water excitation T1 3D"),
    (GE_PLAIN, "Infat sagittal"),
])
def test_non_dixon_single_echo_series_is_unknown(image_type, description):
    datasets = mr_series(4, image_type=image_type, series_description=description,
                         echo_time=12.0, scanning_sequence="SE")
    info = classify_series(datasets)
    assert info.kind is UNKNOWN, info.reason
    assert not info.usable
    assert "neither a Dixon image" in info.reason
    assert repr(description) in info.reason
    assert "/".join(image_type) in info.reason


def test_ordinary_t1_tse_is_unknown_with_reason():
    info = classify_series(mr_series(5, image_type=SIEMENS_PLAIN, series_description="t1_tse_tra",
                                     echo_time=11.0, scanning_sequence="SE"))
    assert info.kind is UNKNOWN
    assert info.reason == ("neither a Dixon image (Image Type ORIGINAL/PRIMARY/M/ND/NORM, "
                           "description 't1_tse_tra') nor a multi-echo spin echo")
    assert info.echo_times_ms == (11.0,)


# --- multi-echo spin echo -----------------------------------------------------------------

@pytest.mark.parametrize("scanning_sequence, description", [
    ("SE", "se_mc_tra_T2map"),            # Siemens
    ("SE", "T2 mapping thigh"),           # any description: ScanningSequence decides
    (("SE", "IR"), "Ax T2 map"),
    (None, "se_mc_tra"),                  # no ScanningSequence: the description decides
    (None, "MESE cor thighs"),
    ("RM", "T2_MSE_17echoes"),            # research mode says nothing; description does
])
def test_mese_single_frame(scanning_sequence, description):
    tes = [10.0, 20.0, 30.0, 40.0]
    datasets = mr_series(5, echo_times=tes, series_description=description,
                         scanning_sequence=scanning_sequence,
                         image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    info = classify_series(datasets)
    assert info.kind is MESE, info.reason
    assert info.echo_times_ms == (10.0, 20.0, 30.0, 40.0)
    assert info.n_instances == 20
    assert info.reason.startswith("4 echo times")


def test_mese_needs_three_echo_times():
    datasets = mr_series(5, echo_times=[10.0, 80.0], series_description="t2_tse_dual",
                         scanning_sequence="SE", image_type=SIEMENS_PLAIN)
    info = classify_series(datasets)
    assert info.kind is UNKNOWN
    assert info.echo_times_ms == (10.0, 80.0)

    datasets = mr_series(2, echo_times=[10.0, 20.0, 30.0], scanning_sequence="SE",
                         image_type=SIEMENS_PLAIN, series_description="se_mc")
    assert classify_series(datasets).kind is MESE


def test_mese_echo_times_rounded_and_unordered():
    datasets = mr_series(3, echo_times=[30.0000004, 10.0, 20.0], scanning_sequence="SE",
                         image_type=SIEMENS_PLAIN, series_description="se_mc")
    info = classify_series(datasets[::-1])
    assert info.kind is MESE
    assert info.echo_times_ms == (10.0, 20.0, 30.0)


@pytest.mark.parametrize("echo_in_shared", [False, True])
def test_mese_enhanced_one_instance_per_echo(echo_in_shared):
    datasets = enhanced_mr_series(5, echo_times=[9.5, 19.0, 28.5, 38.0],
                                  echo_in_shared=echo_in_shared)
    info = classify_series(datasets)
    assert info.kind is MESE, info.reason
    assert info.echo_times_ms == (9.5, 19.0, 28.5, 38.0)
    assert info.n_instances == 4
    assert info.reason == "4 echo times, spin echo"


def test_mese_enhanced_all_echoes_in_one_instance():
    # Philips-style: one instance, every frame has its own MR Echo
    positions = slice_positions(2)
    ds = enhanced_mr_instance(positions=positions * 3, pixels=np.zeros((6, 6, 4), np.uint16),
                              echo_time=10.0)
    for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence):
        per.MREchoSequence[0].EffectiveEchoTime = 10.0 * (1 + i // 2)
    info = classify_series([ds])
    assert info.kind is MESE
    assert info.echo_times_ms == (10.0, 20.0, 30.0)


def test_multi_echo_gradient_echo_magnitude_and_phase():
    mag = mr_series(4, echo_times=[2.4, 4.8, 7.2, 9.6, 12.0, 14.4], scanning_sequence="GR",
                    series_description="gre_multiecho_tra", image_type=SIEMENS_PLAIN)
    info = classify_series(mag)
    assert info.kind is SeriesKind.MEGRE_MAGNITUDE
    assert info.echo_times_ms == (2.4, 4.8, 7.2, 9.6, 12.0, 14.4)
    assert "gradient echo (sequence GR), magnitude images" in info.reason
    phase = mr_series(4, echo_times=[2.4, 4.8, 7.2], scanning_sequence="GR",
                      series_description="gre_multiecho_tra", image_type=("ORIGINAL", "PRIMARY", "P", "ND"))
    assert classify_series(phase).kind is SeriesKind.MEGRE_PHASE
    plain = mr_series(4, echo_times=[2.4, 4.8, 7.2], scanning_sequence="GR",
                      series_description="gre_multiecho_tra", image_type=("ORIGINAL", "PRIMARY", "OTHER"))
    info = classify_series(plain)
    assert info.kind is UNKNOWN
    assert "3 echo times but not spin echo" in info.reason and "GR" in info.reason


@pytest.mark.parametrize("description", [
    "T2star ME SENSE",            # 'ME SE...' looks like the MESE pattern
    "FFE multi echo SENSE",
    "mse_gre_t2star",
])
def test_gradient_echo_header_beats_a_mese_looking_description(description):
    datasets = mr_series(3, echo_times=[3.0, 6.0, 9.0, 12.0], scanning_sequence="GR",
                         series_description=description, image_type=PHILIPS_PLAIN)
    info = classify_series(datasets)
    assert info.kind is SeriesKind.MEGRE_MAGNITUDE, info.reason
    assert "gradient echo" in info.reason


def test_enhanced_multi_echo_gradient_echo_is_megre():
    datasets = enhanced_mr_series(3, echo_times=[2.0, 4.0, 6.0], echo_pulse_sequence="GRADIENT",
                                  series_description="me_gre")
    info = classify_series(datasets)
    assert info.kind is SeriesKind.MEGRE_MAGNITUDE    # Complex Image Component MAGNITUDE
    assert "3 echo times, gradient echo (sequence GRADIENT)" in info.reason


# --- not MR ------------------------------------------------------------------------------

def test_ct_series_is_unknown():
    datasets = [mr_slice(position=p, sop_class=CT_IMAGE_STORAGE, modality="CT",
                         image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                         series_description="WATER: CT abdomen", rescale=(1.0, -1024.0))
                for p in slice_positions(3)]
    info = classify_series(datasets)
    assert info.kind is UNKNOWN
    assert not info.usable
    assert "not an MR image series" in info.reason
    assert CT_IMAGE_STORAGE in info.reason
    assert "CT" in info.reason
    assert info.n_instances == 3
