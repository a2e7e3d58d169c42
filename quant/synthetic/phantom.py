"""A numerical phantom of both legs (thigh or calf) for Dixon MRI, with known truth.

Anatomy per leg and slice: skin-bounded subcutaneous fat (SAT) around a fascia
ellipse; inside it muscle with thin pure-fat septa between muscle groups, and the long
bones (femur; or tibia and fibula) as a dark cortex around fatty marrow. The leg
tapers along the slices. Muscle fat fraction varies smoothly around a chosen mean.

Signals are magnitude images as a scanner sends them: complex Gaussian noise of
standard deviation ``pd / snr`` on each of water, fat, in-phase and opposed-phase, then
the magnitude (Rician). Truth metrics are computed from the label map and the true FF,
with the same definitions as :mod:`quant.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from reports.uids import derive_uid

if TYPE_CHECKING:
    from pydicom.dataset import FileMetaDataset

from ..enums import Region, Side, SideLabel, Tissue

PD = 1000.0  # proton density of muscle and fat (arbitrary units)
SAT_FF = 0.92
MARROW_FF = 0.88
SEPTUM_FF = 0.95
CORTEX_PD = 25.0


def file_meta(sop_class: str, sop_instance_uid: str) -> FileMetaDataset:
    """File meta information (explicit VR little endian) of a dataset built in memory."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


@dataclass(frozen=True, eq=False)
class LegPhantom:
    """Images, geometry and truth of one synthetic exam."""

    water: np.ndarray
    fat: np.ndarray
    in_phase: np.ndarray
    opposed_phase: np.ndarray
    tissue: np.ndarray             # Tissue values (truth)
    side: np.ndarray               # SideLabel values (truth)
    ff: np.ndarray                 # true fat fraction 0..1
    region: Region
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    truth: dict = field(default_factory=dict)  # (side, metric) -> value
    snr: float = 0.0
    pd: np.ndarray | None = None               # proton density relative to muscle (0..1)
    muscle_fraction: np.ndarray | None = None  # muscle fraction of each voxel (partial volume)


def _ellipse(x, y, cx, cy, ax, ay, angle=0.0):
    ca, sa = np.cos(angle), np.sin(angle)
    u = (x - cx) * ca + (y - cy) * sa
    v = -(x - cx) * sa + (y - cy) * ca
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def truth_metrics(tissue: np.ndarray, side: np.ndarray, ff: np.ndarray, spacing_mm: tuple[float, float, float],
                  muscle_fraction: np.ndarray | None = None, muscle_ff: np.ndarray | None = None,
                  ) -> dict[tuple[Side, str], float]:
    """Truth per leg with the definitions of :mod:`quant.metrics`. With partial volume,
    ``muscle_fraction`` is the muscle fraction of every voxel (CSA = its sum x pixel
    area), ``muscle_ff`` the FF of the muscle tissue in each voxel, and the FF truth is
    the muscle-fraction-weighted mean of it.
    """
    dz, dy, dx = spacing_mm
    area = dy * dx
    out = {}
    for s, code in ((Side.RIGHT, SideLabel.RIGHT), (Side.LEFT, SideLabel.LEFT)):
        if muscle_fraction is None:
            frac = ((tissue == Tissue.MUSCLE) & (side == code)).astype(np.float64)
            mff = ff
        else:
            if muscle_ff is None:
                raise ValueError("muscle_fraction needs muscle_ff")
            frac = np.where(side == code, muscle_fraction, 0.0)
            mff = muscle_ff
        if not frac.any():
            continue
        per = frac.sum(axis=(1, 2))
        present = per > 0
        frma = (frac * (1 - mff)).sum(axis=(1, 2)) * area
        out[(s, "csa_mm2")] = float(per[present].mean() * area)
        out[(s, "vol_ml")] = float(frac.sum() * area * dz / 1000.0)
        out[(s, "ff_percent")] = float((frac * mff).sum() / frac.sum() * 100)
        out[(s, "frma_mm2")] = float(frma[present].mean())
    return out


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a.astype(np.float64)
    ny, nx = a.shape[0] // f, a.shape[1] // f
    return a.reshape(ny, f, nx, f).mean(axis=(1, 3))


def make_leg_phantom(region: Region | str = Region.THIGH, *, shape: tuple[int, int, int] = (20, 160, 256),
                     pixel_mm: float = 1.5,
                     slice_mm: float = 5.0, muscle_ff: float = 0.06, muscle_scale: float = 1.0,
                     right_ff_offset: float = 0.0, snr: float = 40.0, seed: int = 0,
                     leg_gap_mm: float = 30.0, supersample: int = 1, bias_field: float = 0.0,
                     infiltration: float = 0.0, fascia_mm: float = 0.0) -> LegPhantom:
    """Make a two-leg Dixon phantom.

    Parameters
    ----------
    region : "thigh" or "calf"
    muscle_ff : mean fat fraction of muscle (0..1)
    muscle_scale : muscle cross-sectional area relative to the nominal leg (atrophy < 1)
    right_ff_offset : added to the right leg's muscle FF (asymmetry)
    snr : muscle proton density over the noise SD of each channel
    leg_gap_mm : skin-to-skin distance between the legs (0 or less: the legs touch)
    supersample : render each voxel from ``supersample`` x ``supersample`` sub-voxels
        (partial volume at every boundary; the truth is then fractional)
    bias_field : amplitude of a smooth multiplicative receive-coil sensitivity across the
        field of view (0.3: from 0.7 to 1.3), the same on every image
    infiltration : extra fat fraction, up to this value, in patches of one muscle group
        of each leg (fatty infiltration: up to ``muscle_ff + infiltration``)
    fascia_mm : thickness of a dark fascia line between subcutaneous fat and muscle
    """
    region = Region(region)
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    f = int(supersample)
    hp = pixel_mm / f
    origin = (-(nx - 1) * pixel_mm / 2, -(ny - 1) * pixel_mm / 2, -(nz - 1) * slice_mm / 2)
    # sub-voxel centres of the hi-res grid (block averages give the voxel grid)
    y = origin[1] - pixel_mm / 2 + hp / 2 + np.arange(ny * f)[:, None] * hp
    x = origin[0] - pixel_mm / 2 + hp / 2 + np.arange(nx * f)[None, :] * hp
    tissue = np.zeros(shape, np.uint8)
    side = np.zeros(shape, np.uint8)
    ff = np.zeros(shape, np.float32)
    pd = np.zeros(shape, np.float32)
    mfrac = np.zeros(shape, np.float32)
    mff = np.zeros(shape, np.float32)
    w_true = np.zeros(shape, np.float64)
    f_true = np.zeros(shape, np.float64)
    if region is Region.THIGH:
        fascia = (62.0, 56.0)
        bones = [((6.0, 8.0), 14.0, 8.0)]          # (offset from leg centre), outer radius, marrow radius
    else:
        fascia = (46.0, 42.0)
        bones = [((-10.0, -14.0), 12.0, 6.5), ((16.0, 8.0), 6.5, 3.0)]
    s = np.sqrt(muscle_scale)
    # smooth FF texture in muscle (zero mean over the field of view), in voxel units
    yy, xx = (y - origin[1]) / pixel_mm, (x - origin[0]) / pixel_mm
    texture = 0.02 * np.sin(xx / 7.0) * np.cos(yy / 9.0)
    patches = 0.5 + 0.5 * np.sin(xx / 5.0 + 1.0) * np.sin(yy / 4.0)      # 0..1, patchy infiltration
    for k in range(nz):
        t = k / max(nz - 1, 1)
        taper = 1.0 - 0.12 * t
        fx, fy = fascia[0] * taper * s, fascia[1] * taper * s
        sat_t = 11.0 + 3.0 * t
        outer_x = fx + sat_t
        h_tissue = np.zeros((ny * f, nx * f), np.uint8)
        h_side = np.zeros_like(h_tissue)
        h_ff = np.zeros((ny * f, nx * f), np.float64)
        h_pd = np.zeros_like(h_ff)
        for sgn, code in ((-1, SideLabel.RIGHT), (+1, SideLabel.LEFT)):
            # the legs' skin is leg_gap_mm apart at x = 0 when outer_x is the nominal size
            cx = sgn * (fascia[0] * taper + 14.0 + leg_gap_mm / 2)
            cy = 0.0
            skin = _ellipse(x, y, cx, cy, outer_x, fy + sat_t, 0.0)
            inner = _ellipse(x, y, cx, cy, fx, fy, 0.0)
            leg = skin & ~(h_side > 0)
            h_side[leg] = code
            h_tissue[leg & ~inner] = Tissue.SUBCUTANEOUS_FAT
            h_ff[leg & ~inner] = SAT_FF
            h_pd[leg & ~inner] = PD
            mus = leg & inner
            h_tissue[mus] = Tissue.MUSCLE
            ffm = muscle_ff + (right_ff_offset if code == SideLabel.RIGHT else 0.0) + texture
            if infiltration > 0:  # one muscle group (a sector between two septa) infiltrated in patches
                ang = np.mod(np.arctan2(y - cy, (x - cx) * sgn), 2 * np.pi)
                group = (ang > 0.6) & (ang < 2.3)
                ffm = ffm + np.where(group, infiltration * patches, 0.0)
            h_ff[mus] = np.clip(ffm, 0, 1)[mus]
            h_pd[mus] = PD
            if fascia_mm > 0:  # dark connective tissue between SAT and muscle
                band = leg & ~inner & _ellipse(x, y, cx, cy, fx + fascia_mm, fy + fascia_mm, 0.0)
                h_tissue[band] = Tissue.SUBCUTANEOUS_FAT
                h_ff[band] = 0.1
                h_pd[band] = CORTEX_PD
            # septa: thin pure-fat lines from the fascia towards the centre
            for ang in (0.6, 2.3, 4.1):
                px, py = cx + np.cos(ang) * fx * 0.55, cy + np.sin(ang) * fy * 0.55
                sep = _ellipse(x, y, px, py, fx * 0.42, pixel_mm * 0.6, ang) & mus
                h_tissue[sep] = Tissue.INTERMUSCULAR_FAT
                h_ff[sep] = SEPTUM_FF
            for (ox, oy), r_out, r_marrow in bones:
                bx, by = cx + sgn * ox, cy + oy
                cortex = _ellipse(x, y, bx, by, r_out, r_out) & leg
                marrow = _ellipse(x, y, bx, by, r_marrow, r_marrow) & leg
                h_tissue[cortex] = Tissue.BONE
                h_ff[cortex] = 0.3
                h_pd[cortex] = CORTEX_PD
                h_ff[marrow] = MARROW_FF
                h_pd[marrow] = PD
        # to the voxel grid: signals and tissue fractions are block means
        w_true[k] = _block_mean(h_pd * (1 - h_ff), f)
        f_true[k] = _block_mean(h_pd * h_ff, f)
        pd[k] = _block_mean(h_pd, f)
        is_m = (h_tissue == Tissue.MUSCLE).astype(np.float64)
        mfrac[k] = _block_mean(is_m, f)
        with np.errstate(invalid="ignore", divide="ignore"):
            mff[k] = np.nan_to_num(_block_mean(is_m * h_ff, f) / mfrac[k])
            ff[k] = np.nan_to_num(f_true[k] / (w_true[k] + f_true[k]))
        fractions = np.stack([_block_mean((h_tissue == c).astype(np.float64), f) for c in range(5)])
        tissue[k] = np.argmax(fractions, axis=0)
        side_frac = np.stack([_block_mean((h_side == c).astype(np.float64), f) for c in range(3)])
        side_frac[0] *= 0.0  # a voxel touched by a leg belongs to it
        side[k] = np.where(side_frac.max(axis=0) > 0, np.argmax(side_frac, axis=0), 0)
    if bias_field:
        yn = np.linspace(-1, 1, ny)[:, None]
        xn = np.linspace(-1, 1, nx)[None, :]
        b = 1.0 + bias_field * (0.7 * xn + 0.3 * (2 * yn ** 2 - 1)) / 1.0
        w_true = w_true * b[None]
        f_true = f_true * b[None]
    sigma = PD / snr

    def mag(a):
        return np.abs(a + rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)).astype(np.float32)

    spacing = (slice_mm, pixel_mm, pixel_mm)
    if f == 1:
        truth = truth_metrics(tissue, side, ff, spacing)
    else:
        truth = truth_metrics(tissue, side, ff, spacing, muscle_fraction=mfrac, muscle_ff=mff)
    return LegPhantom(water=mag(w_true), fat=mag(f_true), in_phase=mag(w_true + f_true),
                      opposed_phase=mag(w_true - f_true), tissue=tissue, side=side, ff=ff, region=region,
                      spacing_mm=spacing, origin_mm=origin, truth=truth, snr=snr,
                      pd=pd / PD, muscle_fraction=mfrac)


# --- the phantom as a scanner would send it ------------------------------------------

_SIEMENS_DIXON = (
    ("water", "t1_vibe_dixon_tra_W", ["DERIVED", "PRIMARY", "DIXON", "WATER"]),
    ("fat", "t1_vibe_dixon_tra_F", ["DERIVED", "PRIMARY", "DIXON", "FAT"]),
    ("in_phase", "t1_vibe_dixon_tra_in", ["DERIVED", "PRIMARY", "DIXON", "IN_PHASE"]),
    ("opposed_phase", "t1_vibe_dixon_tra_opp", ["DERIVED", "PRIMARY", "DIXON", "OPP_PHASE"]),
)


def phantom_datasets(phantom: LegPhantom, *, patient_id: str = "MN-0001", patient_name: str = "Phantom^Leg",
                     issuer: str = "MUSCLENODE-DEMO", study_uid: str | None = None, study_date: str = "20260101",
                     accession: str = "", body_part: str | None = None, uid_seed: str = "",
                     series_number_base: int = 10) -> list:
    """The phantom as classic single-frame MR Image Storage datasets of a Siemens-style
    Dixon exam (water, fat, in-phase, opposed-phase series), 16-bit unsigned.

    UIDs are derived deterministically from ``uid_seed``, patient and study date, so
    the same call gives the same instances. ``body_part`` None writes the region's
    Body Part Examined; "" leaves it out (the node then tells the level from anatomy).
    """
    from pydicom.dataset import Dataset
    from pydicom.uid import MRImageStorage

    def uid(*parts) -> str:  # 2.25.<UUID from a name>: the same inputs give the same UID
        return derive_uid("synthetic", uid_seed, patient_id, study_date, *map(str, parts))

    study_uid = study_uid or uid("study")
    for_uid = uid("frame-of-reference")
    nz, ny, nx = phantom.water.shape
    dz, dy, dx = phantom.spacing_mm
    part = phantom.region.value.upper() if body_part is None else body_part
    out = []
    for n, (kind, desc, image_type) in enumerate(_SIEMENS_DIXON):
        series_uid = uid("series", kind)
        pixels = getattr(phantom, kind)
        data = np.clip(np.rint(pixels), 0, 65535).astype(np.uint16)
        for k in range(nz):
            ds = Dataset()
            ds.file_meta = file_meta(MRImageStorage, uid("instance", kind, k))
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = image_type
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "090000"
            ds.AccessionNumber = accession
            ds.Modality = "MR"
            ds.Manufacturer = "SIEMENS"
            ds.ManufacturerModelName = "Phantom"
            ds.InstitutionName = "musclenode"
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = "MSK^Muscle quantification"
            ds.SeriesDescription = desc
            ds.PatientName = patient_name
            ds.PatientID = patient_id
            ds.IssuerOfPatientID = issuer
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "O"
            if part:
                ds.BodyPartExamined = part
            ds.Laterality = ""  # both legs in one image: no single laterality
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.SliceThickness = f"{dz:g}"
            ds.SpacingBetweenSlices = f"{dz:g}"
            ds.RepetitionTime = "6.8"
            ds.EchoTime = "2.39"
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "3"
            ds.FlipAngle = "9"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = "1"
            ds.SeriesNumber = series_number_base + n
            ds.InstanceNumber = k + 1
            ds.PatientPosition = "FFS"
            ds.ImagePositionPatient = [f"{v:.4f}" for v in (phantom.origin_mm[0], phantom.origin_mm[1],
                                                             phantom.origin_mm[2] + k * dz)]
            ds.ImageOrientationPatient = [f"{v:g}" for v in phantom.orientation]
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = f"{phantom.origin_mm[2] + k * dz:.4f}"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ny, nx
            ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 0
            ds.WindowCenter = "500"
            ds.WindowWidth = "1200"
            ds.PixelData = data[k].tobytes()
            out.append(ds)
    return out
