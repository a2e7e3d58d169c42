"""A synthetic exam with a multi-echo spin-echo (MESE) series and no Dixon.

As a scanner sends it: the two-leg anatomy of :mod:`quant.synthetic.phantom`, echo trains simulated with the
EPG model and the 2D slice profile (:func:`quant.synthetic.mese_phantom.simulate_mese`), slices
thinner than their spacing (gaps) when asked. Three forms:

- classic single-frame MR Image Storage, one instance per echo and slice;
- Enhanced MR, one instance per echo, one frame per slice;
- ``siemens=True``: Enhanced MR as a Siemens XA product T2 mapping writes it (17 echoes,
  Manufacturer SIEMENS, Image Type ``ORIGINAL/PRIMARY/M/NONE``, Pulse Sequence Name
  ``*se2d17``, Body Part Examined ``LEG``, 12-bit pixels, frames in descending slice
  position, per-frame Frame Content with dimension indices).

In-memory datasets only; UIDs are derived from ``uid_seed``, patient and study date.
"""

from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from reports.uids import derive_uid

from ..enums import Side
from ..epg import MeseParameters
from ..t2 import DEFAULT_FAT_T2_MS
from .exam import mese_truth_maps
from .mese_phantom import simulate_mese
from .phantom import LegPhantom, file_meta

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
#: A Siemens product multi-echo spin echo for T2 mapping (se_mc): 17 echoes.
SIEMENS_MESE = MeseParameters(n_echoes=17, echo_spacing_ms=9.5, repetition_time_ms=3000.0)


def mese_only_truth(phantom: LegPhantom, *, t2w_muscle_ms: float = 32.0,
                    right_t2_offset_ms: float = 0.0) -> dict:
    """Truth per leg of :func:`mese_only_datasets`.

    Returns
    -------
    dict
        ``(Side, metric) -> value`` for ``t2w_ms`` (water T2 of the muscle, ms),
        ``csa_mm2`` and ``vol_ml`` (of the phantom's grid: slice spacing times area).
    """
    out = {}
    for side in (Side.RIGHT, Side.LEFT):
        for metric in ("csa_mm2", "vol_ml"):
            if (side, metric) in phantom.truth:
                out[(side, metric)] = phantom.truth[(side, metric)]
        out[(side, "t2w_ms")] = t2w_muscle_ms + (right_t2_offset_ms if side is Side.RIGHT else 0.0)
    return out


def mese_only_datasets(phantom: LegPhantom, *, params: MeseParameters | None = None,
                       slice_thickness_mm: float | None = None, t2w_muscle_ms: float = 32.0,
                       right_t2_offset_ms: float = 0.0, snr: float = 100.0, enhanced: bool = False,
                       siemens: bool = False, body_part: str | None = None, patient_id: str = "MN-MESE",
                       patient_name: str = "Phantom^Mese", study_date: str = "20260101", uid_seed: str = "",
                       series_number: int = 5, seed: int = 0, signal_scale: float = 1000.0,
                       fat_t2_ms: float = DEFAULT_FAT_T2_MS) -> list[Dataset]:
    """A study with one MESE series of the phantom and nothing else.

    Parameters
    ----------
    phantom : LegPhantom
        Anatomy and grid; its slice spacing is the series' slice spacing.
    params : MeseParameters, optional
        Sequence; default 17 echoes of 10 ms (``siemens``: :data:`SIEMENS_MESE`).
    slice_thickness_mm : float, optional
        Slice Thickness written (default: the spacing, contiguous slices); thinner than
        the spacing gives gaps.
    t2w_muscle_ms, right_t2_offset_ms : float
        Water T2 of the muscle (ms), and what the right leg has more.
    snr : float
        First-echo signal over the noise SD (see :func:`quant.synthetic.mese_phantom.simulate_mese`).
    enhanced : bool
        Enhanced MR, one instance per echo (frames = slices); else classic single-frame.
    siemens : bool
        Siemens XA product headers (implies ``enhanced``, Body Part Examined ``LEG``).
    body_part : str, optional
        Body Part Examined; default the phantom's region (``"LEG"`` with ``siemens``);
        ``""`` leaves it out.
    fat_t2_ms : float
        T2 (ms) of the fat in the simulation.

    Returns
    -------
    list of pydicom.Dataset
        The instances of the study, in one frame of reference.
    """
    enhanced = enhanced or siemens
    if params is None:
        params = SIEMENS_MESE if siemens else MeseParameters(n_echoes=17, echo_spacing_ms=10.0,
                                                             repetition_time_ms=3000.0)
    t2w, ff, b1, pd = mese_truth_maps(phantom, t2w_muscle_ms=t2w_muscle_ms, right_t2_offset_ms=right_t2_offset_ms)
    sim = simulate_mese(t2w, ff, b1, params, pd=pd, snr=snr, seed=seed, t2f_ms=fat_t2_ms)
    top = 4095 if siemens else 65535
    images = np.clip(np.rint(sim.images * signal_scale), 0, top).astype(np.uint16)  # (echo, slice, r, c)
    dz, dy, dx = phantom.spacing_mm
    thickness = float(slice_thickness_mm) if slice_thickness_mm is not None else float(dz)

    def uid(*parts) -> str:
        return derive_uid("synthetic", uid_seed, patient_id, study_date, "mese-only", *map(str, parts))

    nz = phantom.tissue.shape[0]
    positions = [(phantom.origin_mm[0], phantom.origin_mm[1], phantom.origin_mm[2] + k * dz) for k in range(nz)]
    part = ("LEG" if siemens else phantom.region.value.upper()) if body_part is None else body_part
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.StudyDate = base.SeriesDate = base.ContentDate = base.AcquisitionDate = study_date
    base.StudyTime = base.SeriesTime = base.ContentTime = base.AcquisitionTime = "093000"
    base.AccessionNumber = ""
    base.Modality = "MR"
    base.Manufacturer = "SIEMENS"
    base.ManufacturerModelName = "MAGNETOM Vida" if siemens else "Phantom"
    base.SoftwareVersions = "syngo MR XA50" if siemens else "musclenode phantom"
    base.InstitutionName = "musclenode"
    base.ReferringPhysicianName = ""
    base.StudyDescription = "MSK^Muscle T2 mapping"
    base.SeriesDescription = "se_mc_tra_T2map" if not siemens else "t2_se_mc_tra_17echo"
    base.ProtocolName = base.SeriesDescription
    base.PatientName = patient_name
    base.PatientID = patient_id
    base.IssuerOfPatientID = "MUSCLENODE-DEMO"
    base.PatientBirthDate = "19600101"
    base.PatientSex = "O"
    if part:
        base.BodyPartExamined = part
    base.Laterality = ""
    base.StudyInstanceUID = uid("study")
    base.SeriesInstanceUID = uid("series", enhanced, siemens)
    base.StudyID = "1"
    base.SeriesNumber = series_number
    base.FrameOfReferenceUID = uid("frame-of-reference")
    base.PositionReferenceIndicator = ""
    base.PatientPosition = "FFS"
    base.MagneticFieldStrength = "3"
    if enhanced:
        return [_enhanced_echo(base, images[e], positions, phantom, params, e, thickness, uid, siemens)
                for e in range(params.n_echoes)]
    base.ScanningSequence = "SE"
    base.SequenceVariant = "SK"
    base.ScanOptions = ""
    base.MRAcquisitionType = "2D"
    base.SequenceName = f"*se2d{params.n_echoes}"
    base.SliceThickness = f"{thickness:g}"
    base.SpacingBetweenSlices = f"{dz:g}"
    base.RepetitionTime = f"{params.repetition_time_ms or 3000:g}"
    base.FlipAngle = f"{params.refocusing_angle_deg:g}"
    base.EchoTrainLength = params.n_echoes
    out = []
    for e in range(params.n_echoes):
        for k, pos in enumerate(positions):
            ds = copy.deepcopy(base)
            ds.SOPClassUID = MR_IMAGE
            ds.SOPInstanceUID = uid("instance", e, k)
            ds.file_meta = file_meta(MR_IMAGE, ds.SOPInstanceUID)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.InstanceNumber = e * nz + k + 1
            ds.EchoTime = f"{params.echo_spacing_ms * (e + 1):g}"
            ds.EchoNumbers = e + 1
            ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
            ds.ImageOrientationPatient = [f"{v:g}" for v in phantom.orientation]
            ds.SliceLocation = f"{pos[2]:.4f}"
            ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
            _pixels(ds, images[e, k], bits=16)
            out.append(ds)
    return out


def _pixels(ds: Dataset, img: np.ndarray, *, bits: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(img, dtype=np.uint16).tobytes()


def _enhanced_echo(base: Dataset, frames: np.ndarray, positions, phantom: LegPhantom, params: MeseParameters,
                   echo: int, thickness: float, uid, siemens: bool) -> Dataset:
    """One Enhanced MR instance: one echo, one frame per slice."""
    ds = copy.deepcopy(base)
    te = params.echo_spacing_ms * (echo + 1)
    ds.SOPClassUID = ENHANCED_MR_IMAGE
    ds.SOPInstanceUID = uid("enhanced", echo)
    ds.file_meta = file_meta(ENHANCED_MR_IMAGE, ds.SOPInstanceUID)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"] if siemens else ["ORIGINAL", "PRIMARY", "T2", "NONE"]
    ds.InstanceNumber = echo + 1
    ds.AcquisitionContrast = "T2"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PulseSequenceName = f"*se2d{params.n_echoes}"
    ds.EchoPulseSequence = "SPIN"
    ds.MultipleSpinEcho = "YES"
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = 3.0
    ds.NumberOfFrames = len(positions)
    if siemens:  # as XA writes them besides the functional groups
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.SequenceName = f"*se2d{params.n_echoes}"
        ds.EchoTrainLength = params.n_echoes
        ds.ImagedNucleus = "1H"
        ds.ContentQualification = "PRODUCT"
        ds.DimensionOrganizationType = "3D"
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [float(v) for v in phantom.orientation]
    shared.PlaneOrientationSequence = DicomSequence([ori])
    meas = Dataset()
    meas.PixelSpacing = [float(phantom.spacing_mm[1]), float(phantom.spacing_mm[2])]
    meas.SliceThickness = float(thickness)
    if siemens:
        meas.SpacingBetweenSlices = float(phantom.spacing_mm[0])
    shared.PixelMeasuresSequence = DicomSequence([meas])
    timing = Dataset()
    timing.RepetitionTime = float(params.repetition_time_ms or 3000.0)
    timing.FlipAngle = float(params.refocusing_angle_deg)
    timing.EchoTrainLength = int(params.n_echoes)
    shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
    echo_item = Dataset()
    echo_item.EffectiveEchoTime = float(te)
    if siemens:  # one echo per instance: the echo time is shared, as XA writes it
        shared.MREchoSequence = DicomSequence([echo_item])
        pvt = Dataset()
        pvt.RescaleIntercept = 0.0
        pvt.RescaleSlope = 1.0
        pvt.RescaleType = "US"
        shared.PixelValueTransformationSequence = DicomSequence([pvt])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    order = list(range(len(positions)))[::-1] if siemens else list(range(len(positions)))
    per_frame = []
    for n, k in enumerate(order):
        item = Dataset()
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        if siemens:
            content.FrameAcquisitionNumber = n + 1
            content.DimensionIndexValues = [1, k + 1]
            ftype = Dataset()
            ftype.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
            item.MRImageFrameTypeSequence = DicomSequence([ftype])
        item.FrameContentSequence = DicomSequence([content])
        plane = Dataset()
        plane.ImagePositionPatient = [float(v) for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([plane])
        if not siemens:
            item.MREchoSequence = DicomSequence([copy.deepcopy(echo_item)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _pixels(ds, frames[order], bits=12 if siemens else 16)
    return ds
