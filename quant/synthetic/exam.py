"""A synthetic exam as a scanner sends it: the Dixon series of :mod:`quant.synthetic.phantom` plus a
multi-echo spin-echo (MESE) series simulated with the EPG model on the same anatomy, as
classic single-frame MR or as Enhanced MR the way Siemens XA writes it (one instance
per echo, one frame per slice). In-memory datasets only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from reports.uids import derive_uid

from ..enums import SideLabel, Tissue
from ..epg import MeseParameters
from .mese_phantom import simulate_mese
from .phantom import CORTEX_PD, PD, LegPhantom, file_meta, phantom_datasets

MR_IMAGE = MRImageStorage
ENHANCED_MR_IMAGE = EnhancedMRImageStorage
DEFAULT_MESE = MeseParameters(n_echoes=17, echo_spacing_ms=10.0, repetition_time_ms=3000.0)


def _uid(*parts) -> str:
    return derive_uid("synthetic", *map(str, parts))


def mese_truth_maps(phantom: LegPhantom, *, t2w_muscle_ms: float, right_t2_offset_ms: float = 0.0,
                    b1_range: tuple[float, float] = (0.85, 1.05),
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Water T2 (ms), PD fat fraction, B1 and proton density maps of the phantom.

    Muscle has ``t2w_muscle_ms``, or the compartment's T2 where the phantom has a
    :attr:`~quant.synthetic.phantom.LegPhantom.t2w_ms_map` (finite values); the right
    leg's muscle then gets ``right_t2_offset_ms`` on top.
    """
    t2w = np.full(phantom.tissue.shape, 30.0, np.float32)     # water in fat tissue, marrow
    muscle = phantom.tissue == Tissue.MUSCLE
    t2w[muscle] = t2w_muscle_ms
    if phantom.t2w_ms_map is not None:
        given = muscle & np.isfinite(phantom.t2w_ms_map)
        t2w[given] = phantom.t2w_ms_map[given]
    t2w[muscle & (phantom.side == SideLabel.RIGHT)] += right_t2_offset_ms
    if phantom.pd is not None:
        pd = phantom.pd.astype(np.float32)
    else:
        pd = np.where(phantom.tissue > 0, 1.0, 0.0).astype(np.float32)
        cortex = (phantom.tissue == Tissue.BONE) & (phantom.ff < 0.5)
        pd[cortex] = CORTEX_PD / PD
    nx = phantom.tissue.shape[2]
    b1 = np.linspace(b1_range[0], b1_range[1], nx, dtype=np.float32)[None, None, :] * np.ones_like(t2w)
    return t2w, phantom.ff.astype(np.float32), b1, pd


def mese_datasets(phantom: LegPhantom, template: Dataset, *, params: MeseParameters = DEFAULT_MESE,
                  t2w_muscle_ms: float = 32.0, right_t2_offset_ms: float = 0.0, snr: float = 100.0,
                  slice_step: int = 2, enhanced: bool = False, seed: int = 0,
                  series_number: int = 30, signal_scale: float = 1000.0) -> list[Dataset]:
    """A MESE series of the phantom, in the study and frame of reference of ``template``
    (a Dixon dataset of the same exam); every ``slice_step``-th slice, slices
    ``slice_step`` times thicker (another grid than the Dixon series).
    """
    t2w, ff, b1, pd = mese_truth_maps(phantom, t2w_muscle_ms=t2w_muscle_ms, right_t2_offset_ms=right_t2_offset_ms)
    ks = np.arange(0, phantom.tissue.shape[0], slice_step)
    sim = simulate_mese(t2w[ks], ff[ks], b1[ks], params, pd=pd[ks], snr=snr, seed=seed)
    images = np.clip(np.rint(sim.images * signal_scale), 0, 65535).astype(np.uint16)  # (echo, slice, r, c)
    dz, dy, dx = phantom.spacing_mm
    series_uid = _uid(template.StudyInstanceUID, "mese", enhanced)
    positions = [(phantom.origin_mm[0], phantom.origin_mm[1], phantom.origin_mm[2] + k * dz) for k in ks]
    base = _base(template, series_uid, series_number, params, dz * slice_step)
    if enhanced:
        return [enhanced_mese_instance(base, images[e], positions, phantom, params, e, dz * slice_step,
                                       lambda *parts: _uid(series_uid, *parts)) for e in range(params.n_echoes)]
    return classic_mese_instances(base, images, positions, phantom, params,
                                  lambda e, k: _uid(series_uid, e, k))


def exam_datasets(phantom: LegPhantom, *, mese: bool = True, enhanced_mese: bool = False,
                  t2w_muscle_ms: float = 32.0, mese_snr: float = 100.0, **dixon_kwargs: Any) -> list[Dataset]:
    """Dixon series (:func:`quant.synthetic.phantom.phantom_datasets`) plus, optionally, a MESE series."""
    dixon = phantom_datasets(phantom, **dixon_kwargs)
    if not mese:
        return dixon
    return dixon + mese_datasets(phantom, dixon[0], t2w_muscle_ms=t2w_muscle_ms, snr=mese_snr,
                                 enhanced=enhanced_mese)


def _pixels(ds: Dataset, img: np.ndarray, *, bits: int = 16) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(img, dtype=np.uint16).tobytes()


def _base(template: Dataset, series_uid: str, series_number: int, params: MeseParameters,
          thickness: float) -> Dataset:
    ds = Dataset()
    for kw in ("SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
               "StudyDescription", "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
               "PatientSex", "StudyInstanceUID", "StudyID", "FrameOfReferenceUID", "PositionReferenceIndicator",
               "BodyPartExamined", "Laterality", "InstitutionName", "Manufacturer", "PatientPosition",
               "ClinicalTrialSubjectID", "ClinicalTrialSponsorName"):
        if kw in template:
            setattr(ds, kw, copy.deepcopy(template[kw].value))
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "se_mc_tra_T2map"
    ds.SeriesDate = ds.ContentDate = ds.get("StudyDate", "")
    ds.SeriesTime = ds.ContentTime = "093000"
    classic_mese_attributes(ds, params, thickness_mm=thickness, spacing_mm=thickness)
    ds.MagneticFieldStrength = "3"
    return ds


#: Acquisition attributes a classic MR Image carries at the top level; an Enhanced MR
#: instance has them in its functional groups instead.
_CLASSIC_ONLY = ("ScanningSequence", "SequenceVariant", "ScanOptions", "SliceThickness", "SpacingBetweenSlices",
                 "RepetitionTime", "FlipAngle", "EchoTrainLength", "MagneticFieldStrength")


def classic_mese_attributes(ds: Dataset, params: MeseParameters, *, thickness_mm: float, spacing_mm: float,
                            sequence_name: str | None = None) -> None:
    """Set the acquisition attributes of a classic (single-frame) 2D multi-echo spin-echo image."""
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    if sequence_name is not None:
        ds.SequenceName = sequence_name
    ds.SliceThickness = f"{thickness_mm:g}"
    ds.SpacingBetweenSlices = f"{spacing_mm:g}"
    ds.RepetitionTime = f"{params.repetition_time_ms or 3000:g}"
    ds.FlipAngle = f"{params.refocusing_angle_deg:g}"
    ds.EchoTrainLength = params.n_echoes




def megre_datasets(phantom: LegPhantom, template: Dataset, *, n_echoes: int = 6, te1_ms: float = 1.2,
                   dte_ms: float = 1.0, field_strength_t: float = 3.0, snr: float = 50.0,
                   fieldmap_hz: float = 120.0, r2star_s: float = 40.0, seed: int = 0,
                   series_number: int = 40, signal_scale: float = 1000.0) -> list[Dataset]:
    """A multi-echo gradient echo (magnitude and phase series, as Siemens writes them:
    phase stored 0..4095 with Rescale Slope 2 and Intercept -4096, i.e. -pi..pi) of the
    phantom, simulated with the 6-peak fat spectrum, a smooth field map and R2*.
    """
    from ..dixon import megre_signal
    pd = phantom.pd if phantom.pd is not None else (phantom.tissue > 0).astype(np.float32)
    w = pd * (1 - phantom.ff) * signal_scale
    f = pd * phantom.ff * signal_scale
    nz, ny, nx = phantom.tissue.shape
    yn = np.linspace(-1, 1, ny)[None, :, None]
    xn = np.linspace(-1, 1, nx)[None, None, :]
    psi = fieldmap_hz * (0.6 * xn + 0.4 * (xn ** 2 + yn ** 2) - 0.3) * np.ones((nz, 1, 1))
    te = te1_ms + dte_ms * np.arange(n_echoes)
    s = megre_signal(w, f, r2star_s, psi, te, field_strength_t=field_strength_t, phase0_rad=0.4)
    rng = np.random.default_rng(seed)
    sigma = signal_scale / snr
    s = s + rng.normal(0, sigma, s.shape) + 1j * rng.normal(0, sigma, s.shape)
    mag = np.clip(np.rint(np.abs(s)), 0, 65535).astype(np.uint16)
    stored_phase = np.clip(np.rint((np.angle(s) * 4096 / np.pi + 4096) / 2), 0, 4095).astype(np.uint16)
    dz, dy, dx = phantom.spacing_mm
    out = []
    for part, images, image_type in (("M", mag, ["ORIGINAL", "PRIMARY", "M", "ND"]),
                                     ("P", stored_phase, ["ORIGINAL", "PRIMARY", "P", "ND"])):
        series_uid = _uid(template.StudyInstanceUID, "megre", part)
        base = _base(template, series_uid, series_number + (part == "P"), DEFAULT_MESE, dz)
        base.SeriesDescription = f"gre_6echo_tra_{'mag' if part == 'M' else 'pha'}"
        base.ScanningSequence = "GR"
        base.SequenceVariant = "SP"
        base.MRAcquisitionType = "3D"
        base.FlipAngle = "5"
        base.RepetitionTime = "12"
        base.EchoTrainLength = n_echoes
        base.MagneticFieldStrength = f"{field_strength_t:g}"
        for e in range(n_echoes):
            for k in range(nz):
                ds = copy.deepcopy(base)
                ds.SOPClassUID = MR_IMAGE
                ds.SOPInstanceUID = _uid(series_uid, e, k)
                ds.file_meta = file_meta(MR_IMAGE, ds.SOPInstanceUID)
                ds.ImageType = image_type
                ds.InstanceNumber = e * nz + k + 1
                ds.EchoTime = f"{te[e]:g}"
                ds.EchoNumbers = e + 1
                pos = (phantom.origin_mm[0], phantom.origin_mm[1], phantom.origin_mm[2] + k * dz)
                ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
                ds.ImageOrientationPatient = [f"{v:g}" for v in phantom.orientation]
                ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
                if part == "P":
                    ds.RescaleSlope = "2"
                    ds.RescaleIntercept = "-4096"
                    ds.RescaleType = "US"
                _pixels(ds, images[e, k])
                out.append(ds)
    return out


def classic_mese_instances(base: Dataset, images: np.ndarray, positions: Sequence[Sequence[float]],
                           phantom: LegPhantom, params: MeseParameters, uid: Callable[..., str]) -> list[Dataset]:
    """Classic MR Image instances of a MESE series: one per echo and slice.

    Returns
    -------
    list of pydicom.dataset.Dataset
        Echo by echo, slice by slice; ``uid(echo, slice)`` gives the SOP Instance UIDs.
    """
    _, dy, dx = phantom.spacing_mm
    out = []
    for e in range(params.n_echoes):
        for k, pos in enumerate(positions):
            ds = copy.deepcopy(base)
            ds.SOPClassUID = MR_IMAGE
            ds.SOPInstanceUID = uid(e, k)
            ds.file_meta = file_meta(MR_IMAGE, ds.SOPInstanceUID)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.InstanceNumber = e * len(positions) + k + 1
            ds.EchoTime = f"{params.echo_spacing_ms * (e + 1):g}"
            ds.EchoNumbers = e + 1
            ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
            ds.ImageOrientationPatient = [f"{v:g}" for v in phantom.orientation]
            ds.SliceLocation = f"{pos[2]:.4f}"
            ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
            _pixels(ds, images[e, k])
            out.append(ds)
    return out


def enhanced_mese_instance(base: Dataset, frames: np.ndarray, positions: Sequence[Sequence[float]],
                           phantom: LegPhantom, params: MeseParameters, echo: int, thickness: float,
                           uid: Callable[..., str], *, siemens: bool = False) -> Dataset:
    """One Enhanced MR instance of a MESE series: one echo, one frame per slice.

    ``siemens``: as a Siemens XA product T2 mapping writes it (Image Type M, the echo time
    shared, frames in descending position with dimension indices, 12-bit pixels).

    Returns
    -------
    pydicom.dataset.Dataset
        The instance, with file meta; ``uid("enhanced", echo)`` is its SOP Instance UID.
    """
    ds = copy.deepcopy(base)
    for kw in _CLASSIC_ONLY:   # in the functional groups here
        if kw in ds:
            delattr(ds, kw)
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
