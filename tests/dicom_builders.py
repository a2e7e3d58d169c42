"""In-memory DICOM datasets for tests: classic single-frame MR slices and Enhanced MR
multi-frame instances (one instance per echo, frames = slices, as Siemens XA writes them).

Everything is built with pydicom only; pixel data is 16-bit unsigned, little endian,
and every dataset carries a ``file_meta`` with Explicit VR Little Endian so that
``pixel_array`` decodes it and ``dcmwrite`` can write it as a Part 10 file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from quant.synthetic.phantom import file_meta

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_about_x(degrees: float) -> tuple[float, ...]:
    """ImageOrientationPatient of an axial plane rotated about the patient x axis."""
    a = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))


def normal_of(orientation: Sequence[float]) -> np.ndarray:
    o = np.asarray(orientation, dtype=float)
    return np.cross(o[:3], o[3:])


def slice_positions(n: int, spacing: float = 5.0, orientation: Sequence[float] = AXIAL,
                    origin: Sequence[float] = (-100.0, -120.0, 30.0),
                    gaps: Sequence[float] | None = None) -> list[tuple[float, float, float]]:
    """ImagePositionPatient of ``n`` slices stacked along the normal of ``orientation``.

    ``gaps`` (n - 1 values, mm) replaces the regular ``spacing`` when given.
    """
    steps = list(gaps) if gaps is not None else [spacing] * (n - 1)
    assert len(steps) == n - 1
    offsets = np.concatenate([[0.0], np.cumsum(steps)])
    normal = normal_of(orientation)
    return [tuple(float(v) for v in np.asarray(origin, dtype=float) + d * normal) for d in offsets]


def _patient_study(ds: Dataset, series_uid: str, frame_of_reference_uid: str,
                   study_uid: str | None, modality: str) -> None:
    ds.PatientName = "Test^Muscle"
    ds.PatientID = "MN0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or "1.2.826.0.1.3680043.8.498.1"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.PatientPosition = "FFS"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _pixel_module(ds: Dataset, pixels: np.ndarray) -> None:
    pixels = np.ascontiguousarray(pixels, dtype="<u2")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape[-2:])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()


def mr_slice(*, position: Sequence[float], orientation: Sequence[float] = AXIAL,
             pixels: np.ndarray | None = None, rows: int = 6, cols: int = 4,
             pixel_spacing: Sequence[float] = (1.5, 1.25), slice_thickness: float = 5.0,
             image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
             series_description: str = "t1_tse_tra", echo_time: float | None = 12.0,
             scanning_sequence: str | Sequence[str] | None = "SE",
             rescale: tuple[float, float] | None = None,
             series_uid: str | None = None, sop_instance_uid: str | None = None,
             frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.2",
             study_uid: str | None = None, instance_number: int = 1, series_number: int = 3,
             echo_number: int | None = None, manufacturer: str = "SIEMENS",
             sop_class: str = MR_IMAGE_STORAGE, modality: str = "MR",
             omit: Sequence[str] = ()) -> Dataset:
    """A classic single-frame MR Image Storage instance.

    ``pixels`` are the stored values (uint16); ``rescale`` = (slope, intercept) adds
    Rescale Slope/Intercept. Keywords in ``omit`` are deleted at the end.
    """
    if pixels is None:
        pixels = np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols)
    sop_instance_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(sop_class, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    _patient_study(ds, series_uid or generate_uid(), frame_of_reference_uid, study_uid, modality)
    ds.Manufacturer = manufacturer
    ds.SeriesDescription = series_description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    if modality == "MR":
        if scanning_sequence is not None:
            ds.ScanningSequence = scanning_sequence if isinstance(scanning_sequence, str) \
                else list(scanning_sequence)
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 2000.0
        if echo_time is not None:
            ds.EchoTime = echo_time
        ds.EchoTrainLength = 1
        if echo_number is not None:
            ds.EchoNumbers = echo_number
        ds.MagneticFieldStrength = 3.0
    ds.SliceThickness = slice_thickness
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        if modality == "MR":
            ds.RescaleType = "US"
    _pixel_module(ds, pixels)
    for keyword in omit:
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def mr_series(n_slices: int = 5, *, echo_times: Sequence[float] | None = None,
              positions: Sequence[Sequence[float]] | None = None,
              orientation: Sequence[float] = AXIAL, rows: int = 6, cols: int = 4,
              pixels: np.ndarray | None = None, series_uid: str | None = None,
              **kwargs) -> list[Dataset]:
    """A classic single-frame series, in acquisition order (echo-major, then slice).

    ``pixels`` has shape (echoes, slices, rows, cols) (or (slices, rows, cols) without
    ``echo_times``); by default each value encodes echo, slice, row and column.
    """
    tes = list(echo_times) if echo_times is not None else [kwargs.pop("echo_time", 12.0)]
    positions = positions or slice_positions(n_slices, orientation=orientation)
    if pixels is None:
        pixels = default_pixels(len(tes), len(positions), rows, cols)
    elif pixels.ndim == 3:
        pixels = pixels[None]
    series_uid = series_uid or generate_uid()
    out = []
    for e, te in enumerate(tes):
        for k, pos in enumerate(positions):
            out.append(mr_slice(position=pos, orientation=orientation, pixels=pixels[e, k],
                                echo_time=te, series_uid=series_uid,
                                echo_number=e + 1 if echo_times is not None else None,
                                instance_number=e * len(positions) + k + 1, **kwargs))
    return out


def default_pixels(n_echoes: int, n_slices: int, rows: int, cols: int) -> np.ndarray:
    """Distinct stored values: 1000*echo + 100*slice + 10*row + column."""
    e, k, r, c = np.meshgrid(np.arange(n_echoes), np.arange(n_slices), np.arange(rows),
                             np.arange(cols), indexing="ij")
    return (1000 * e + 100 * k + 10 * r + c).astype(np.uint16)


def enhanced_mr_instance(*, positions: Sequence[Sequence[float]],
                         orientation: Sequence[float] = AXIAL,
                         pixels: np.ndarray, echo_time: float,
                         pixel_spacing: Sequence[float] = (1.5, 1.25),
                         slice_thickness: float = 5.0,
                         rescale: tuple[float, float] = (1.0, 0.0),
                         image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "MULTIECHO", "NONE"),
                         series_description: str = "se_mc_tra_T2map",
                         echo_pulse_sequence: str = "SPIN",
                         echo_in_shared: bool = False,
                         series_uid: str | None = None, sop_instance_uid: str | None = None,
                         frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.2",
                         study_uid: str | None = None, instance_number: int = 1,
                         series_number: int = 3) -> Dataset:
    """An Enhanced MR Image Storage instance as Siemens XA writes a multi-echo series:
    one instance per echo, one frame per slice.

    ``pixels`` (frames, rows, cols) are stored in the order of ``positions``.
    Shared functional groups: Plane Orientation, Pixel Measures, Pixel Value
    Transformation (and MR Echo when ``echo_in_shared``); per-frame: Plane Position,
    Frame Content and MR Echo.
    """
    pixels = np.asarray(pixels)
    assert pixels.ndim == 3 and pixels.shape[0] == len(positions)
    sop_instance_uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_instance_uid)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_instance_uid
    _patient_study(ds, series_uid or generate_uid(), frame_of_reference_uid, study_uid, "MR")
    ds.Manufacturer = "Siemens Healthineers"
    ds.ManufacturerModelName = "MAGNETOM Vida"
    ds.SoftwareVersions = "syngo MR XA50"
    ds.DeviceSerialNumber = "175000"
    ds.BodyPartExamined = "LEG"
    ds.SeriesDescription = series_description
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ContentDate = "20240102"
    ds.ContentTime = "101500"
    ds.AcquisitionDateTime = "20240102101500"
    ds.AcquisitionNumber = 1
    # Enhanced MR Image module / MR Image Description and Pulse Sequence macros
    ds.AcquisitionContrast = "T2"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.PulseSequenceName = "*se2d1"
    ds.EchoPulseSequence = echo_pulse_sequence
    ds.MultipleSpinEcho = "YES" if echo_pulse_sequence == "SPIN" else "NO"
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = 3.0
    ds.ContentQualification = "PRODUCT"
    ds.ImageComments = ""
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionDuration = 180.0
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.NumberOfFrames = len(positions)

    # Multi-frame Dimension module: slices (in-stack position)
    dim_uid = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationType = "3D"
    dims = []
    for pointer, group in ((0x00209056, 0x00209111), (0x00209057, 0x00209111)):
        item = Dataset()
        item.DimensionOrganizationUID = dim_uid
        item.DimensionIndexPointer = pointer
        item.FunctionalGroupPointer = group
        dims.append(item)
    ds.DimensionIndexSequence = DicomSequence(dims)

    def echo_item() -> Dataset:
        item = Dataset()
        item.EffectiveEchoTime = float(echo_time)
        return item

    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [float(v) for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([ori])
    meas = Dataset()
    meas.PixelSpacing = [float(v) for v in pixel_spacing]
    meas.SliceThickness = slice_thickness
    shared.PixelMeasuresSequence = DicomSequence([meas])
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept = rescale
    pvt.RescaleType = "US"
    shared.PixelValueTransformationSequence = DicomSequence([pvt])
    frame_type = Dataset()
    frame_type.FrameType = list(image_type)
    frame_type.PixelPresentation = "MONOCHROME"
    frame_type.VolumetricProperties = "VOLUME"
    frame_type.VolumeBasedCalculationTechnique = "NONE"
    frame_type.ComplexImageComponent = "MAGNITUDE"
    frame_type.AcquisitionContrast = "T2"
    shared.MRImageFrameTypeSequence = DicomSequence([frame_type])
    shared.update(_enhanced_mr_shared_macros())
    if echo_in_shared:
        shared.MREchoSequence = DicomSequence([echo_item()])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for k, pos in enumerate(positions):
        item = Dataset()
        content = Dataset()
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        content.TemporalPositionIndex = 1
        content.FrameAcquisitionNumber = 1
        content.FrameAcquisitionDateTime = "20240102101500"
        content.FrameReferenceDateTime = "20240102101500"
        content.FrameAcquisitionDuration = 1000.0
        item.FrameContentSequence = DicomSequence([content])
        plane = Dataset()
        plane.ImagePositionPatient = [float(v) for v in pos]
        item.PlanePositionSequence = DicomSequence([plane])
        if not echo_in_shared:
            item.MREchoSequence = DicomSequence([echo_item()])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _pixel_module(ds, pixels)
    return ds


def _enhanced_mr_shared_macros() -> Dataset:
    """The remaining Type 1 functional groups of an Enhanced MR image (acquisition detail
    musclenode does not read, present so the instance passes an IOD check)."""

    def item(**attrs) -> DicomSequence:
        d = Dataset()
        for k, v in attrs.items():
            setattr(d, k, v)
        return DicomSequence([d])

    g = Dataset()
    g.MRTimingAndRelatedParametersSequence = item(
        RepetitionTime=2000.0, FlipAngle=180.0, EchoTrainLength=4, RFEchoTrainLength=4,
        GradientEchoTrainLength=0,
        OperatingModeSequence=item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL"),
        SpecificAbsorptionRateSequence=item(SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                                            SpecificAbsorptionRateValue=1.2))
    g.MRModifierSequence = item(
        InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
        SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE", PartialFourier="NO",
        ParallelAcquisition="NO")
    g.MRImagingModifierSequence = item(
        MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
        TransmitterFrequency=123.2, PixelBandwidth=250.0)
    g.MRReceiveCoilSequence = item(
        ReceiveCoilName="BO1,2;SP5,6", ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
        ReceiveCoilManufacturerName="Siemens",
        MultiCoilDefinitionSequence=item(MultiCoilElementName="BO1", MultiCoilElementUsed="YES"))
    g.MRTransmitCoilSequence = item(TransmitCoilName="Body", TransmitCoilType="BODY",
                                    TransmitCoilManufacturerName="Siemens")
    g.MRFOVGeometrySequence = item(
        InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=256,
        MRAcquisitionPhaseEncodingStepsInPlane=192, PercentSampling=100.0,
        PercentPhaseFieldOfView=75.0)
    g.MRAveragesSequence = item(NumberOfAverages=1.0)
    region = Dataset()
    region.CodeValue = "30021000"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Lower leg"
    g.FrameAnatomySequence = item(AnatomicRegionSequence=DicomSequence([region]),
                                  FrameLaterality="B")
    return g


def enhanced_mr_series(n_slices: int = 5, *, echo_times: Sequence[float],
                       positions: Sequence[Sequence[float]] | None = None,
                       frame_order: Sequence[int] | None = None,
                       orientation: Sequence[float] = AXIAL, rows: int = 6, cols: int = 4,
                       pixels: np.ndarray | None = None, series_uid: str | None = None,
                       **kwargs) -> list[Dataset]:
    """One Enhanced MR instance per echo; ``pixels`` (echoes, slices, rows, cols) is given
    in the order of ``positions``, and ``frame_order`` permutes the frames within every
    instance (frame i holds slice ``frame_order[i]``)."""
    positions = positions or slice_positions(n_slices, orientation=orientation)
    if pixels is None:
        pixels = default_pixels(len(echo_times), len(positions), rows, cols)
    order = list(frame_order) if frame_order is not None else list(range(len(positions)))
    series_uid = series_uid or generate_uid()
    return [enhanced_mr_instance(positions=[positions[i] for i in order], orientation=orientation,
                                 pixels=pixels[e][order], echo_time=te,
                                 series_uid=series_uid, instance_number=e + 1, **kwargs)
            for e, te in enumerate(echo_times)]
