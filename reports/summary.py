"""The one-page summary of a study: a Secondary Capture image any PACS shows, and the same
page as an Encapsulated PDF.

The page (landscape, A4 ratio, :data:`PAGE_PX`) holds

* the key slice (largest muscle area, see :func:`key_slice`) with the ROIs, or each leg's muscle, outlined in colour
  and named in a legend, and the fat-fraction map of that slice with its colour bar (%);
* the table of this visit's values per region or ROI and side (CSA, FF, fRMA, VOL, water T2
  where measured), their change since baseline and since the previous visit (absolute,
  relative, and annualised since baseline), the model that made each value and flags
  (fat-water swap corrected, registration to review, earlier values of another version);
* one trend plot per key metric (fRMA, FF, CSA, water T2 where there is any): each region or
  ROI and side a line over all the subject's visits, the baseline marked;
* the algorithm version and the SOP Instance UID of the SR it summarises.

Every number is written with :func:`reports.precision.formatted`, as the SR writes it; the
rows printed are kept as :class:`SummaryRow` data (:attr:`Summary.rows`). No patient name or
ID is drawn on the page: they are in the DICOM header only (copied from the source images).

What the page shows, as data, is :mod:`reports.summary_content`; the drawing (matplotlib's
object API on an Agg canvas, no pyplot state; Okabe & Ito colours, cividis for the fat
fraction) is :mod:`reports.summary_draw`; this module makes the DICOM objects.
"""

from __future__ import annotations

import datetime
import hashlib
import io
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from quant.pipeline import StudyAnalysis

from .longitudinal import Comparison, PriorValue
from .seg import DEFAULT_SOFTWARE_VERSION, sorted_source_images
from .summary_content import (
    COLUMNS,
    ROW_KINDS,
    TABLE_METRICS,
    TREND_METRICS,
    SummaryRow,
    TrendLine,
    key_slice,
    summary_rows,
    trend_lines,
)
from .summary_draw import PAGE_PX, TITLE, render_page
from .uids import derive_uid

SC_SERIES_NUMBER = 907
PDF_SERIES_NUMBER = 908
ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"

__all__ = ["COLUMNS", "ENCAPSULATED_PDF_STORAGE", "PAGE_PX", "PDF_SERIES_NUMBER", "ROW_KINDS", "SC_SERIES_NUMBER",
           "TABLE_METRICS", "TREND_METRICS", "Summary", "SummaryRow", "TrendLine", "build_summary", "key_slice",
           "render_page", "summary_rows", "trend_lines"]


@dataclass(frozen=True, eq=False)
class Summary:
    """The summary of one study: the Secondary Capture and Encapsulated PDF instances, and
    what the page shows (:attr:`rows` as printed, :attr:`trends`, the page's pixels and PDF).
    """

    sc: Dataset
    pdf: Dataset
    rows: tuple[SummaryRow, ...]
    trends: tuple[TrendLine, ...]
    rgb: np.ndarray        # (rows, columns, 3) uint8: the SC's pixels
    pdf_bytes: bytes
    truncated: int = 0     # table rows left off the page for want of room (all are in the SR)

    @property
    def png(self) -> bytes:
        """The page as an RGB PNG (encoded on demand: the node sends the SC and PDF only)."""
        buf = io.BytesIO()
        Image.fromarray(self.rgb).save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def _source_instance_sequence(sr: Dataset) -> DicomSequence:
    item = Dataset()
    item.ReferencedSOPClassUID = str(sr.SOPClassUID)
    item.ReferencedSOPInstanceUID = str(sr.SOPInstanceUID)
    return DicomSequence([item])


def _referenced_series(sr: Dataset) -> DicomSequence:
    """Common Instance Reference: the SR's series and instance (it is in another series)."""
    series = Dataset()
    series.SeriesInstanceUID = str(sr.SeriesInstanceUID)
    series.ReferencedInstanceSequence = _source_instance_sequence(sr)
    return DicomSequence([series])


def _trend_digest(trends: Sequence[TrendLine]) -> str:
    text = repr(sorted((t.group, t.metric, [(d.isoformat(), repr(v)) for d, v in t.points]) for t in trends))
    return hashlib.sha256(text.encode()).hexdigest()


def build_summary(analysis: StudyAnalysis, source_images: Sequence[Dataset], sr: Dataset,
                  comparisons: Mapping[tuple, Comparison] | None = None,
                  history: Mapping[tuple, Sequence[PriorValue]] | None = None, *,
                  time_point: tuple[str, str] | None = None, version_excluded: Collection[tuple] = (),
                  software_version: str = DEFAULT_SOFTWARE_VERSION) -> Summary:
    """Build the one-page summary of a study as Secondary Capture and Encapsulated PDF.

    Parameters
    ----------
    analysis : quant.pipeline.StudyAnalysis
        The pipeline output the SR was built from.
    source_images : sequence of pydicom.Dataset
        The anatomy series' instances (any order): the patient, study and clinical-trial
        attributes are copied from them.
    sr : pydicom.Dataset
        The TID 1500 SR the page summarises: its SOP Instance UID is printed on the page and
        referenced (Source Instance Sequence, Referenced Series Sequence).
    comparisons : mapping, optional
        ``(region, side, metric, roi) -> Comparison``, the same the SR was given.
    history : mapping, optional
        ``(region, side, metric, roi) -> [PriorValue, ...]``: the values of all the subject's
        earlier visits (of this algorithm version) for the trend plots.
    time_point : (str, str), optional
        The visit's label and Clinical Trial Time Point ID (as given to the SR).
    version_excluded : collection of (region, side, roi)
        Groups not compared because their earlier values were of another algorithm version.
    software_version : str
        Software Versions of both instances.

    Returns
    -------
    Summary
        ``sc``: Secondary Capture Image (RGB, 8 bit, :data:`PAGE_PX`), series number 907;
        ``pdf``: Encapsulated PDF, series number 908; both in the study of the source images,
        Manufacturer "musclenode", UIDs derived from the study, the SR, the algorithm version
        and the trend values (:func:`reports.uids.derive_uid`); with the rows, trends and
        page as drawn.
    """
    sources = sorted_source_images(analysis, source_images)
    ref = sources[0]
    study_uid = str(ref.StudyInstanceUID)
    sr_uid = str(sr.SOPInstanceUID)
    try:
        study_date: datetime.date | None = datetime.datetime.strptime(str(ref.get("StudyDate", ""))[:8],
                                                                      "%Y%m%d").date()
    except ValueError:
        study_date = None
    rows = summary_rows(analysis, comparisons, version_excluded=version_excluded)
    trends = trend_lines(analysis, history or {}, study_date)
    whole = {k: c for k, c in (comparisons or {}).items() if len(k) < 4 or not k[3]}
    rgb, pdf_bytes, truncated = render_page(
        analysis, rows, trends, comparisons=whole, study_date=study_date,
        time_point=time_point[0] if time_point else "", sr_uid=sr_uid)
    parts = (study_uid, "summary", str(analysis.algorithm_version), sr_uid, _trend_digest(trends))
    laterality = str(ref.get("Laterality", "") or "")

    sc = hd.sc.SCImage.from_ref_dataset(
        ref, rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=("L", "P"),   # replaced below: a page has no patient orientation
        series_instance_uid=derive_uid(*parts, "sc", "series"), series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derive_uid(*parts, "sc", "instance"), instance_number=1, manufacturer="musclenode",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="Muscle MRI summary (musclenode)", manufacturer_model_name="musclenode",
        software_versions=software_version)
    sc.BurnedInAnnotation = "NO"            # no name or ID on the page
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageType = ["DERIVED", "SECONDARY", "SUMMARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"Summary of the measurement report {sr_uid}"[:1024]
    sc.SourceInstanceSequence = _source_instance_sequence(sr)
    sc.ReferencedSeriesSequence = _referenced_series(sr)
    sc.Laterality = laterality
    # General Image: Patient Orientation is Type 2C, empty here (a page, not an image of the patient)
    sc.add_new("PatientOrientation", "CS", None)

    pdf = hd.base.SOPClass(
        study_instance_uid=study_uid, series_instance_uid=derive_uid(*parts, "pdf", "series"),
        series_number=PDF_SERIES_NUMBER, sop_instance_uid=derive_uid(*parts, "pdf", "instance"),
        sop_class_uid=ENCAPSULATED_PDF_STORAGE, instance_number=1, modality="DOC", manufacturer="musclenode",
        transfer_syntax_uid=ExplicitVRLittleEndian, series_description="Muscle MRI summary, PDF (musclenode)",
        manufacturer_model_name="musclenode", software_versions=software_version)
    if ref.get("SpecificCharacterSet"):   # as highdicom does for the other objects: names keep their encoding
        pdf.SpecificCharacterSet = ref.SpecificCharacterSet
    pdf.copy_patient_and_study_information(ref)
    pdf.ConversionType = "WSD"
    pdf.BurnedInAnnotation = "NO"
    pdf.RecognizableVisualFeatures = "NO"
    pdf.AcquisitionDateTime = None
    pdf.DocumentTitle = TITLE
    pdf.ConceptNameCodeSequence = []
    pdf.SourceInstanceSequence = _source_instance_sequence(sr)
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = pdf_bytes + (b"\0" if len(pdf_bytes) % 2 else b"")
    pdf.EncapsulatedDocumentLength = len(pdf_bytes)
    return Summary(sc, pdf, tuple(rows), tuple(trends), rgb, pdf_bytes, truncated)
