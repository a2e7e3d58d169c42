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

import numpy as np
from pydicom.dataset import Dataset

from reports.uids import derive_uid

from ..enums import Side
from ..epg import MeseParameters
from ..t2 import DEFAULT_FAT_T2_MS
from .exam import classic_mese_attributes, classic_mese_instances, enhanced_mese_instance, mese_truth_maps
from .mese_phantom import simulate_mese
from .phantom import LegPhantom

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
        return [enhanced_mese_instance(base, images[e], positions, phantom, params, e, thickness, uid, siemens=siemens)
                for e in range(params.n_echoes)]
    classic_mese_attributes(base, params, thickness_mm=thickness, spacing_mm=dz,
                            sequence_name=f"*se2d{params.n_echoes}")
    return classic_mese_instances(base, images, positions, phantom, params, lambda e, k: uid("instance", e, k))




