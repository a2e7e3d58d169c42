"""Volume assembly (quant.volume): sorting along the slice normal, geometry, rescale,
multi-echo (single-frame and Enhanced MR one instance per echo) and the errors."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from dicom_builders import (
    AXIAL,
    default_pixels,
    enhanced_mr_series,
    mr_series,
    mr_slice,
    normal_of,
    oblique_about_x,
    slice_positions,
)

from quant.errors import GeometryError, SeriesError
from quant.volume import Volume, assemble_volume, frames_of

ROWS, COLS = 6, 4
PIXEL_SPACING = (1.5, 1.25)  # (row spacing dy, column spacing dx)
SHUFFLE5 = [3, 0, 4, 1, 2]
ORIGIN = (-100.0, -120.0, 30.0)

CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL_FLIPPED = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal (0, 0, -1): sorted by decreasing z


def shuffled(items, order=SHUFFLE5):
    return [items[i] for i in order]


# --- single-echo, classic single-frame ---------------------------------------------------

def test_shuffled_axial_slices_are_sorted_with_geometry_and_rescale():
    stored = default_pixels(1, 5, ROWS, COLS)[0]
    datasets = mr_series(5, pixels=stored, rescale=(2.0, -5.0), pixel_spacing=PIXEL_SPACING)
    positions = slice_positions(5, spacing=5.0)
    vol = assemble_volume(shuffled(datasets))

    assert isinstance(vol, Volume)
    assert vol.shape == (5, ROWS, COLS)
    assert vol.array.dtype == np.float32
    assert vol.spacing_mm == pytest.approx((5.0, 1.5, 1.25))
    assert vol.origin_mm == pytest.approx(positions[0])
    assert vol.origin_mm == pytest.approx(ORIGIN)
    assert vol.orientation == AXIAL
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    assert vol.frame_numbers == (None,) * 5
    assert vol.echo_times_ms == ()
    assert vol.series_instance_uid == datasets[0].SeriesInstanceUID
    assert vol.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32) * 2.0 - 5.0)
    # spot values: slice 2, row 3, column 1 stored 231 -> 457
    assert vol.array[2, 3, 1] == 457.0
    assert vol.voxel_volume_mm3 == pytest.approx(5.0 * 1.5 * 1.25)
    assert vol.pixel_area_mm2 == pytest.approx(1.5 * 1.25)


def test_no_rescale_gives_stored_values():
    stored = default_pixels(1, 3, ROWS, COLS)[0]
    vol = assemble_volume(mr_series(3, pixels=stored)[::-1])
    np.testing.assert_array_equal(vol.array, stored.astype(np.float32))


def test_slices_listed_head_to_foot_come_out_foot_to_head():
    # instance numbers follow decreasing z; the volume follows the normal (+z for axial)
    positions = slice_positions(4, spacing=3.0)[::-1]
    datasets = mr_series(4, positions=positions)
    vol = assemble_volume(datasets)
    assert vol.origin_mm == pytest.approx(positions[-1])
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets[::-1])
    assert vol.spacing_mm[0] == pytest.approx(3.0)
    assert vol.array[0, 0, 0] == 300.0  # the slice built last (k=3) is first


@pytest.mark.parametrize("orientation", [AXIAL, AXIAL_FLIPPED, CORONAL, SAGITTAL,
                                         oblique_about_x(20.0), oblique_about_x(-20.0)],
                         ids=["axial", "axial-flipped", "coronal", "sagittal", "oblique+20x",
                              "oblique-20x"])
def test_sorted_along_the_normal_for_any_orientation(orientation):
    positions = slice_positions(5, spacing=4.0, orientation=orientation)
    datasets = mr_series(5, positions=positions, orientation=orientation,
                         pixel_spacing=PIXEL_SPACING)
    vol = assemble_volume(shuffled(datasets))
    normal = normal_of(orientation)
    np.testing.assert_allclose(vol.normal, normal, atol=1e-12)
    assert vol.spacing_mm == pytest.approx((4.0, 1.5, 1.25))
    assert vol.origin_mm == pytest.approx(positions[0])
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)
    proj = [np.dot(pydicom_pos(ds), normal) for ds in datasets]
    assert proj == sorted(proj)
    np.testing.assert_array_equal(vol.array[:, 0, 0], [0.0, 100.0, 200.0, 300.0, 400.0])


def pydicom_pos(ds):
    return np.array([float(v) for v in ds.ImagePositionPatient])


def test_oblique_20_degrees_about_x():
    ori = oblique_about_x(20.0)
    a = np.radians(20.0)
    np.testing.assert_allclose(ori, (1, 0, 0, 0, np.cos(a), np.sin(a)))
    positions = slice_positions(5, spacing=4.0, orientation=ori, origin=(10.0, 20.0, -50.0))
    # the stack runs along (0, -sin 20, cos 20): z rises while y falls
    assert positions[1][1] < positions[0][1] and positions[1][2] > positions[0][2]
    datasets = mr_series(5, positions=positions, orientation=ori, pixel_spacing=PIXEL_SPACING)
    vol = assemble_volume(shuffled(datasets, [4, 2, 0, 3, 1]))
    assert vol.origin_mm == pytest.approx((10.0, 20.0, -50.0))
    assert vol.spacing_mm == pytest.approx((4.0, 1.5, 1.25))
    np.testing.assert_allclose(vol.normal, (0.0, -np.sin(a), np.cos(a)), atol=1e-12)
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in datasets)


@pytest.mark.parametrize("orientation", [AXIAL, oblique_about_x(20.0), CORONAL])
def test_index_to_patient(orientation):
    positions = slice_positions(5, spacing=4.0, orientation=orientation)
    datasets = mr_series(5, positions=positions, orientation=orientation,
                         pixel_spacing=PIXEL_SPACING)
    vol = assemble_volume(shuffled(datasets))
    # the first pixel of every slice is at that slice's ImagePositionPatient
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(vol.index_to_patient(k, 0, 0), pydicom_pos(ds), atol=1e-9)
    # pixel (r, c): r rows down the column cosine (dy = 1.5), c columns along the row cosine
    row_cos, col_cos = np.array(orientation[:3]), np.array(orientation[3:])
    r, c = 5, 3
    expected = pydicom_pos(datasets[2]) + c * 1.25 * row_cos + r * 1.5 * col_cos
    np.testing.assert_allclose(vol.index_to_patient(2, r, c), expected, atol=1e-9)
    # broadcasting: all slice origins at once
    got = vol.index_to_patient(np.arange(5), 0, 0)
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, np.array(positions), atol=1e-9)


def test_index_to_patient_axial_numbers():
    datasets = mr_series(3, positions=[(-100.0, -120.0, 30.0 + 5 * k) for k in range(3)],
                         pixel_spacing=(0.8, 0.5))
    vol = assemble_volume(datasets)
    np.testing.assert_allclose(vol.index_to_patient(1, 2, 3), (-100.0 + 1.5, -120.0 + 1.6, 35.0))


def test_single_slice_uses_spacing_between_slices_or_thickness():
    ds = mr_slice(position=(0.0, 0.0, 0.0), slice_thickness=6.0)
    vol = assemble_volume([ds])
    assert vol.shape == (1, ROWS, COLS)
    assert vol.spacing_mm == pytest.approx((6.0, 1.5, 1.25))
    ds.SpacingBetweenSlices = 7.0
    assert assemble_volume([ds]).spacing_mm[0] == pytest.approx(7.0)


def test_with_array_and_same_grid():
    vol = assemble_volume(mr_series(3))
    mask = np.ones(vol.shape, dtype=bool)
    other = vol.with_array(mask)
    assert other.array is mask and other.same_grid(vol)
    assert other.sop_instance_uids == vol.sop_instance_uids
    with pytest.raises(ValueError):
        vol.with_array(np.ones((2, ROWS, COLS)))


# --- errors ------------------------------------------------------------------------------

def test_mixed_orientations_raise_geometry_error():
    datasets = mr_series(4)
    datasets[2].ImageOrientationPatient = list(oblique_about_x(10.0))
    with pytest.raises(GeometryError, match="ImageOrientationPatient"):
        assemble_volume(datasets)


def test_missing_image_position_raises_series_error_naming_it():
    datasets = mr_series(4)
    del datasets[1].ImagePositionPatient
    with pytest.raises(SeriesError, match="ImagePositionPatient") as err:
        assemble_volume(datasets)
    assert datasets[1].SOPInstanceUID in str(err.value)


@pytest.mark.parametrize("keyword", ["ImageOrientationPatient", "PixelSpacing"])
def test_other_missing_geometry_attributes_are_named(keyword):
    datasets = mr_series(3)
    delattr(datasets[0], keyword)
    with pytest.raises(SeriesError, match=keyword):
        assemble_volume(datasets)


def test_missing_frame_of_reference_is_named():
    datasets = mr_series(3, omit=("FrameOfReferenceUID",))
    with pytest.raises(SeriesError, match="FrameOfReferenceUID"):
        assemble_volume(datasets)


@pytest.mark.parametrize("gaps", [[5.0, 5.0, 10.0, 5.0], [5.0, 4.0, 6.0, 5.0]])
def test_irregular_gaps_raise_geometry_error(gaps):
    positions = slice_positions(5, gaps=gaps)
    with pytest.raises(GeometryError, match="irregular"):
        assemble_volume(shuffled(mr_series(5, positions=positions)))


def test_small_jitter_in_gaps_is_accepted():
    positions = slice_positions(5, gaps=[5.0, 5.05, 4.95, 5.0])
    vol = assemble_volume(mr_series(5, positions=positions))
    assert vol.spacing_mm[0] == pytest.approx(5.0)


def test_two_slices_at_one_position_raise_geometry_error():
    positions = slice_positions(3)
    with pytest.raises(GeometryError, match="share one position"):
        assemble_volume(mr_series(4, positions=positions + [positions[1]]))


def test_instances_of_two_series_are_refused():
    a, b = mr_series(2), mr_series(2, positions=slice_positions(2, origin=(0, 0, 100)))
    with pytest.raises(SeriesError, match="2 series"):
        assemble_volume(a + b)


def test_empty_series_is_refused():
    with pytest.raises(SeriesError):
        assemble_volume([])


def test_undecodable_pixels_raise_series_error():
    datasets = mr_series(2)
    datasets[0].PixelData = b"\x00" * 10
    with pytest.raises(SeriesError, match="pixel data"):
        assemble_volume(datasets)


# --- multi-echo --------------------------------------------------------------------------

TES_ACQ = [30.0, 10.0, 40.0, 20.0]  # acquisition (instance) order of the echoes


def mese_single_frame(rescale=None):
    pixels = default_pixels(4, 5, ROWS, COLS)  # [echo index in TES_ACQ, slice]
    datasets = mr_series(5, echo_times=TES_ACQ, pixels=pixels, pixel_spacing=PIXEL_SPACING,
                         series_description="se_mc_tra", rescale=rescale)
    return datasets, pixels


def expected_mese_array(pixels, slope=1.0, intercept=0.0):
    by_te = np.argsort(TES_ACQ)  # echo order of the volume: increasing TE
    return pixels[by_te].astype(np.float32) * slope + intercept


def test_mese_single_frame_shuffled():
    datasets, pixels = mese_single_frame(rescale=(0.5, 1.0))
    rng = np.random.default_rng(7)
    order = rng.permutation(len(datasets))
    vol = assemble_volume([datasets[i] for i in order])
    assert vol.shape == (4, 5, ROWS, COLS)
    assert vol.echo_times_ms == (10.0, 20.0, 30.0, 40.0)
    np.testing.assert_array_equal(vol.array, expected_mese_array(pixels, 0.5, 1.0))
    # echo 20 ms (acquired second to last) slice 3 row 2 col 1 -> stored 3000+300+20+1
    assert vol.array[1, 3, 2, 1] == pytest.approx(3321 * 0.5 + 1.0)
    assert vol.spacing_mm == pytest.approx((5.0, 1.5, 1.25))
    assert vol.origin_mm == pytest.approx(ORIGIN)
    # the UIDs of the first (shortest) echo, in slice order
    first_echo = [ds for ds in datasets if float(ds.EchoTime) == 10.0]
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in first_echo)
    assert vol.frame_numbers == (None,) * 5


def test_enhanced_one_instance_per_echo_equals_single_frame_series():
    datasets, pixels = mese_single_frame(rescale=(2.0, -3.0))
    classic = assemble_volume(datasets)

    # same slices, frames stored in a shuffled order, instances given in a shuffled order
    frame_order = [2, 4, 0, 3, 1]
    enhanced = enhanced_mr_series(5, echo_times=TES_ACQ, pixels=pixels, frame_order=frame_order,
                                  pixel_spacing=PIXEL_SPACING, rescale=(2.0, -3.0))
    assert all(ds.NumberOfFrames == 5 for ds in enhanced)
    assert enhanced[0].pixel_array.shape == (5, ROWS, COLS)
    vol = assemble_volume([enhanced[i] for i in (2, 0, 3, 1)])

    assert vol.shape == classic.shape == (4, 5, ROWS, COLS)
    np.testing.assert_array_equal(vol.array, classic.array)
    np.testing.assert_array_equal(vol.array, expected_mese_array(pixels, 2.0, -3.0))
    assert vol.echo_times_ms == classic.echo_times_ms == (10.0, 20.0, 30.0, 40.0)
    assert vol.spacing_mm == pytest.approx(classic.spacing_mm)
    assert vol.origin_mm == pytest.approx(classic.origin_mm)
    assert vol.orientation == pytest.approx(classic.orientation)
    assert vol.frame_of_reference_uid == classic.frame_of_reference_uid
    assert vol.same_grid(classic)
    # frame k of the volume is the frame of the TE 10 ms instance that holds slice k
    te10 = enhanced[TES_ACQ.index(10.0)]
    assert vol.sop_instance_uids == (te10.SOPInstanceUID,) * 5
    assert vol.frame_numbers == tuple(frame_order.index(k) + 1 for k in range(5))
    assert vol.frame_numbers == (3, 5, 1, 4, 2)


def test_enhanced_echo_time_in_shared_group_and_file_round_trip():
    pixels = default_pixels(4, 5, ROWS, COLS)
    enhanced = enhanced_mr_series(5, echo_times=TES_ACQ, pixels=pixels, echo_in_shared=True,
                                  frame_order=SHUFFLE5, orientation=oblique_about_x(20.0))
    read_back = []
    for ds in enhanced:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        buf.seek(0)
        read_back.append(pydicom.dcmread(buf))
    assert read_back[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert read_back[0].SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    vol = assemble_volume(read_back)
    classic = assemble_volume(mr_series(5, echo_times=TES_ACQ, pixels=pixels,
                                        orientation=oblique_about_x(20.0)))
    np.testing.assert_array_equal(vol.array, classic.array)
    assert vol.echo_times_ms == (10.0, 20.0, 30.0, 40.0)
    assert vol.same_grid(classic)


def test_frames_of_enhanced_instance():
    ds = enhanced_mr_series(3, echo_times=[12.5], frame_order=[1, 2, 0],
                            rescale=(4.0, 1.0))[0]
    frames = frames_of(ds)
    positions = slice_positions(3)
    assert [f.frame_index for f in frames] == [0, 1, 2]
    assert [f.position for f in frames] == [positions[1], positions[2], positions[0]]
    assert all(f.echo_time_ms == 12.5 and f.slope == 4.0 and f.intercept == 1.0
               and f.pixel_spacing == (1.5, 1.25) and f.orientation == AXIAL for f in frames)


def test_single_echo_enhanced_instance():
    pixels = default_pixels(1, 4, ROWS, COLS)
    ds = enhanced_mr_series(4, echo_times=[80.0], pixels=pixels, frame_order=[3, 1, 0, 2])[0]
    vol = assemble_volume([ds])
    assert vol.shape == (4, ROWS, COLS)
    assert vol.echo_times_ms == ()
    assert vol.frame_numbers == (3, 2, 4, 1)
    np.testing.assert_array_equal(vol.array, pixels[0].astype(np.float32))


def test_echoes_with_different_slice_counts_raise():
    datasets, _ = mese_single_frame()
    del datasets[7]
    with pytest.raises(GeometryError, match="different numbers of slices"):
        assemble_volume(datasets)


def test_echoes_on_different_slices_raise():
    # second echo: same first slice, but 6 mm apart instead of 5
    a = mr_series(4, echo_times=[10.0, 20.0, 30.0])
    b = mr_series(4, echo_times=[40.0], series_uid=a[0].SeriesInstanceUID,
                  positions=slice_positions(4, spacing=6.0))
    with pytest.raises(GeometryError, match="echoes do not cover the same slices"):
        assemble_volume(a + b)


def test_multi_echo_frame_without_echo_time_raises():
    datasets, _ = mese_single_frame()
    del datasets[4].EchoTime
    with pytest.raises(SeriesError, match="EchoTime"):
        assemble_volume(datasets)


@pytest.mark.parametrize("bits,stored,signed,frames", [(16, 16, 0, 1), (16, 12, 0, 1), (16, 12, 1, 1), (8, 8, 0, 1),
                                                      (16, 10, 1, 3), (32, 32, 1, 2)])
def test_native_pixels_are_pydicoms(bits, stored, signed, frames):
    """Uncompressed little-endian pixels read straight from their bytes equal pydicom's
    pixel_array (high bits masked, signed values sign-extended, frames); anything else is left
    to pydicom (None)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

    from quant.volume import _native_pixels
    rng = np.random.default_rng(bits + stored + signed + frames)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 5, 7, bits, stored, stored - 1
    ds.PixelRepresentation = signed
    if frames > 1:
        ds.NumberOfFrames = frames
    raw = rng.integers(0, 256, size=5 * 7 * frames * bits // 8, dtype=np.uint8).tobytes()   # high bits set too
    ds.PixelData = raw
    got = _native_pixels(ds)
    assert got is not None and got.dtype == ds.pixel_array.dtype
    np.testing.assert_array_equal(got, ds.pixel_array)
    ds.PixelData = raw[:-2]                       # short: pydicom says what is wrong
    assert _native_pixels(ds) is None
    ds.PixelData = raw
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert _native_pixels(ds) is None
