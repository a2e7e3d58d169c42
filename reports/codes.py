"""Every coded concept musclenode writes into DICOM SEG and SR objects, in one place.

Sources (each constant says which):

- ``pydicom.sr.codedict`` (DICOM PS3.16 content, SNOMED CT "SCT", DICOM "DCM", LOINC
  "LN", UCUM) wherever the concept is there;
- SNOMED CT codes not in pydicom's dictionary, with where they were checked;
- the private coding scheme ``99MUSCLENODE`` (:data:`PRIVATE_SCHEME`) for concepts that
  no standard scheme has (fRMA, and the longitudinal comparison values). SR documents
  that use it declare it in the Coding Scheme Identification Sequence
  (:data:`PRIVATE_SCHEME_IDENTIFICATION`).

Units are UCUM (``UCUM`` designator, code value = the UCUM expression).

The constants are shared ``CodedConcept`` datasets and highdicom embeds them as they are
(no copy) in the objects it builds: never modify one in place; ``copy.deepcopy`` it first
(as :func:`reports.seg.build_seg` does before adding a laterality modifier).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from quant import muscles
from quant.enums import Region, Side


def _cc(code) -> CodedConcept:
    """A pydicom ``Code`` as a highdicom ``CodedConcept``."""
    return CodedConcept(value=code.value, scheme_designator=code.scheme_designator, meaning=code.meaning)


# --- private coding scheme -------------------------------------------------------------

#: Coding Scheme Designator of musclenode's private concepts ("99" prefix: private, PS3.3
#: 8.2.2 / PS3.16 8).
PRIVATE_SCHEME = "99MUSCLENODE"

#: Declaration of the private scheme for the SR's Coding Scheme Identification Sequence.
PRIVATE_SCHEME_IDENTIFICATION = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="musclenode private codes for quantitative muscle MRI",
    version="1",
    responsible_organization="musclenode",
)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# --- SEG: segmented property categories and types (CID 7150 / CID 7151) ----------------

TISSUE = _cc(codes.SCT.Tissue)                              # SCT 85756007, codedict (CID 7150)
ANATOMICAL_STRUCTURE = _cc(codes.SCT.AnatomicalStructure)   # SCT 91723000, codedict (CID 7150)
SKELETAL_MUSCLE = _cc(codes.SCT.SkeletalMuscle)             # SCT 127954009, codedict
BONE = _cc(codes.SCT.Bone)                                  # SCT 272673000, codedict (CID 7166)
# SCT 67769002 is not in pydicom's codedict. It is SNOMED CT's subcutaneous fatty (adipose)
# tissue body structure, as used for "adipose subcutaneous" by the dicom3tools/IDC
# conversion scripts; pydicom has only the broader 71966008 "Subcutaneous tissue".
SUBCUTANEOUS_FAT = CodedConcept(value="67769002", scheme_designator="SCT",
                                meaning="Subcutaneous fatty tissue")

#: Algorithm family of the segmentation (CID 7162): thresholds on the signal histogram
#: (Otsu) and on the fat fraction, plus morphology. DCM 123105, codedict.
ALGORITHM_FAMILY = _cc(codes.cid7162.HistogramAnalysis)

# --- anatomy and laterality ------------------------------------------------------------

THIGH = _cc(codes.SCT.Thigh)                  # SCT 68367000, codedict (CID 4031)
LOWER_LEG = _cc(codes.SCT.LowerLeg)           # SCT 30021000, codedict (CID 4031)
LOWER_LIMB = _cc(codes.SCT.LowerLimb)         # SCT 61685007, codedict (CID 4031): the leg, level unknown
HAND = _cc(codes.SCT.Hand)                    # SCT 85562004, codedict (CID 4031; Body Part Examined HAND)
HEAD_AND_NECK = _cc(codes.SCT.HeadAndNeck)    # SCT 774007, codedict (CID 4031; Body Part Examined HEADNECK)
RIGHT = _cc(codes.SCT.Right)                  # SCT 24028007, codedict (CID 244)
LEFT = _cc(codes.SCT.Left)                    # SCT 7771000, codedict (CID 244)

# --- SR: document, procedure, measurement names ----------------------------------------

IMAGING_MEASUREMENT_REPORT = _cc(codes.DCM.ImagingMeasurementReport)  # DCM 126000, codedict (CID 7021)
#: Procedure reported (TID 1500 row 4) where no body-region code fits: LOINC 25056-3,
#: codedict (CID 100).
MRI_PROCEDURE = _cc(codes.cid100.MRIUnspecifiedBodyRegion)
# SNOMED CT procedure codes of MRI by body region (not in pydicom's codedict; checked
# against a published SNOMED CT procedure value set; CID 100 is extensible). The calf
# and a leg of unknown level take "lower extremity": SNOMED CT has no plain "MRI of lower
# leg" procedure (only "with contrast"). Head and neck has none that fits: unspecified.
MRI_OF_THIGH = CodedConcept(value="241640003", scheme_designator="SCT",
                            meaning="Magnetic resonance imaging of thigh")
MRI_OF_LOWER_EXTREMITY = CodedConcept(value="113109007", scheme_designator="SCT",
                                      meaning="Magnetic resonance imaging of lower extremity")
MRI_OF_HAND = CodedConcept(value="241638008", scheme_designator="SCT",
                           meaning="Magnetic resonance imaging of hand")


def procedure_concept(region: Region | str) -> CodedConcept:
    """Procedure Reported of a study of ``region``: the MRI procedure of that body region
    where SNOMED CT has one (thigh, lower extremity, hand), else :data:`MRI_PROCEDURE`.
    """
    value = getattr(region, "value", region)
    return {"thigh": MRI_OF_THIGH, "calf": MRI_OF_LOWER_EXTREMITY, "leg": MRI_OF_LOWER_EXTREMITY,
            "hand": MRI_OF_HAND}.get(value, MRI_PROCEDURE)


AREA = _cc(codes.SCT.Area)                    # SCT 42798000, codedict (CID 7469)
VOLUME = _cc(codes.SCT.Volume)                # SCT 118565006, codedict (CID 7469)
FAT_FRACTION = _cc(codes.DCM.FatFraction)     # DCM 129100, codedict (CID 7180, CID 7469)
MEAN = _cc(codes.SCT.Mean)                    # SCT 373098007, codedict (CID 7464): derivation
#: Functional remaining muscle area: sum over the muscle of pixel area x (1 - fat fraction),
#: averaged over the slices. No standard code exists.
FRMA = _private("FRMA", "Functional remaining muscle area")
T2 = _cc(codes.DCM.T2)                        # DCM 113065 "T2", codedict (CID 7180): water T2 of muscle
MEDIAN = _cc(codes.DCM.Median)                # DCM 130290, codedict: derivation
INTERQUARTILE_RANGE = _cc(codes.DCM.InterquartileRangeOfPopulation)  # DCM 130614, codedict: derivation
#: Relative transmit field (actual / nominal flip angle) fitted with water T2. No standard code.
B1_RELATIVE = _private("B1REL", "Relative transmit field (B1)")

#: Fat-water swap check of the Dixon series (a qualitative evaluation in every group).
FAT_WATER_SWAP = _private("FWSWAP", "Fat-water swap")
SWAP_FINDINGS = MappingProxyType({
    "": _private("FWSWAP-NONE", "No fat-water swap detected"),
    "fat-water-swap-corrected-whole-series": _private("FWSWAP-WHOLE", "Whole-series fat-water swap corrected"),
    "fat-water-swap-corrected-regional": _private("FWSWAP-REGION", "Regional fat-water swap corrected"),
    "fat-water-swap-ambiguous": _private("FWSWAP-AMBIG", "Fat-water swap check ambiguous, not corrected"),
})

#: A muscle or compartment of the leg without a verified code of its own (see
#: :func:`roi_property_type`), named by its segment label and tracking identifier.
SKELETAL_MUSCLE_OF_LOWER_LIMB = _cc(codes.SCT.SkeletalMuscleStructureOfLowerLimb)   # SCT 102292000, codedict
SKELETAL_MUSCLE_OF_UPPER_LIMB = _cc(codes.SCT.SkeletalMuscleStructureOfUpperLimb)   # SCT 30608006, codedict


def generic_roi_type(region: Region | str) -> CodedConcept:
    """Generic segmented property type of an ROI (a muscle or group named by its label) in
    ``region``: skeletal muscle of the lower limb (thigh, calf, leg), of the upper limb (hand
    with forearm), else skeletal muscle (head and neck: no code covers both head and neck muscles).
    """
    value = getattr(region, "value", region)
    if value == "hand":
        return SKELETAL_MUSCLE_OF_UPPER_LIMB
    if value == "head_neck":
        return SKELETAL_MUSCLE
    return SKELETAL_MUSCLE_OF_LOWER_LIMB


def roi_concept(name: str) -> CodedConcept | None:
    """The SNOMED CT code of an ROI name, where one was verified (:data:`quant.muscles.PROPERTY_TYPES`,
    sources cited there): e.g. ``vastus_lateralis`` -> SCT 1403006 "Vastus lateralis muscle".

    Returns
    -------
    CodedConcept or None
        A new concept (free to modify); None for a compartment or any muscle without a
        verified code.
    """
    code = muscles.property_type(name)
    if code is None:
        return None
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def roi_property_type(name: str, region: Region | str = "thigh") -> CodedConcept:
    """Segmented Property Type of an ROI's SEG segment: :func:`roi_concept` where known, else
    the region's generic type (:func:`generic_roi_type`; the label then names the ROI).
    """
    return roi_concept(name) or generic_roi_type(region)


#: Where an ROI came from (:class:`quant.enums.RoiSource`): a qualitative evaluation of each ROI group.
ROI_SOURCE = _private("ROISRC", "Region of interest source")
REGISTRATION_DICE = _private("REGDICE", "Dice of carried regions with the visit's muscle")
REGISTRATION_MISMATCH = _private("REGMISMATCH", "Residual image mismatch after registration")
ATLAS_AGREEMENT = _private("ATLASAGREE", "Mean agreement of fused atlases")
REGISTRATION_REVIEW = _private("REGREVIEW", "Registration of carried regions")
REGISTRATION_REVIEWS = MappingProxyType({
    True: _private("REGREVIEW-YES", "Needs review"),
    False: _private("REGREVIEW-NO", "Within quality thresholds"),
})
ROI_SOURCES = MappingProxyType({
    "automatic": _private("ROISRC-AUTO", "Automatic segmentation"),
    "reader": _private("ROISRC-READER", "Drawn by a reader"),
    "carried": _private("ROISRC-CARRIED", "Reader's regions carried from another visit by registration"),
    "atlas": _private("ROISRC-ATLAS", "Fused from other subjects' reader regions"),
})


def roi_words(name: str) -> str:
    """An ROI name in words: ``"anterior_compartment"`` -> ``"anterior compartment"``."""
    return name.replace("_", " ").strip()


#: Measurement method of each quantification model (``Measurement.model``), so that two
#: values of one concept (the Dixon and the T2-derived fat fraction) stay distinguishable.
MODEL_METHODS = MappingProxyType({
    "dixon-magnitude": _private("DIXON-MAG", "Magnitude Dixon fat fraction"),
    "dixon-rician-ml": _private("DIXON-ML", "Magnitude Dixon fat fraction, Rician maximum likelihood"),
    "megre-pdff-6peak": _private("PDFF-6PEAK", "Proton-density fat fraction, multi-echo, 6-peak fat model"),
    "epg-bicomponent": _private("EPG-BICOMP", "Bi-component extended phase graph fit of multi-echo spin echo"),
    "biexp-fixed-fat": _private("BIEXP-FIXFAT", "Bi-exponential fit with fixed fat T2, first echo discarded"),
})

# --- UCUM units ------------------------------------------------------------------------

UNIT_MM2 = _cc(codes.UCUM.SquareMillimeter)   # UCUM mm2, codedict
# UCUM "mL" (case-sensitive UCUM); not in codedict, which has only cm3
UNIT_ML = CodedConcept(value="mL", scheme_designator="UCUM", meaning="milliliter")
UNIT_PERCENT = _cc(codes.UCUM.Percent)        # UCUM %, codedict
UNIT_DAY = _cc(codes.UCUM.Day)                # UCUM d, codedict
UNIT_MS = CodedConcept(value="ms", scheme_designator="UCUM", meaning="millisecond")
UNIT_ONE = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

#: metric name (``Measurement.metric``) -> (concept name, UCUM unit) of the SR NUM item.
#: ``csa_mm2`` is the *mean* cross-sectional area over the slices (hence Area with the
#: derivation :data:`MEAN`, see :data:`METRIC_DERIVATIONS`).
METRIC_CONCEPTS: Mapping[str, tuple[CodedConcept, CodedConcept]] = MappingProxyType({
    "csa_mm2": (AREA, UNIT_MM2),
    "vol_ml": (VOLUME, UNIT_ML),
    "ff_percent": (FAT_FRACTION, UNIT_PERCENT),
    "frma_mm2": (FRMA, UNIT_MM2),
    "t2w_ms": (T2, UNIT_MS),
    "t2w_mean_ms": (T2, UNIT_MS),
    "t2w_iqr_ms": (T2, UNIT_MS),
    "b1": (B1_RELATIVE, UNIT_ONE),
    "ff_t2_percent": (FAT_FRACTION, UNIT_PERCENT),
})

#: metric name -> Derivation (TID 300 "Derivation", CID 7464) of the metric's NUM item,
#: for metrics that are means (of slice areas, or of voxel fat fractions).
METRIC_DERIVATIONS: Mapping[str, CodedConcept] = MappingProxyType({
    "csa_mm2": MEAN,
    "ff_percent": MEAN,
    "frma_mm2": MEAN,
    "t2w_ms": MEDIAN,
    "t2w_mean_ms": MEAN,
    "t2w_iqr_ms": INTERQUARTILE_RANGE,
    "b1": MEDIAN,
    "ff_t2_percent": MEAN,
})

#: Words naming each metric inside the meanings of the comparison concepts.
METRIC_WORDS: Mapping[str, str] = MappingProxyType({
    "csa_mm2": "area",
    "vol_ml": "volume",
    "ff_percent": "fat fraction",
    "frma_mm2": "fRMA",
    "t2w_ms": "water T2",
    "t2w_mean_ms": "mean water T2",
    "t2w_iqr_ms": "water T2 IQR",
    "b1": "B1",
    "ff_t2_percent": "T2 fat fraction",
})
_METRIC_CODE_PREFIX = {"csa_mm2": "CSA", "vol_ml": "VOL", "ff_percent": "FF", "frma_mm2": "FRMA",
                       "t2w_ms": "T2W", "t2w_mean_ms": "T2WMEAN", "t2w_iqr_ms": "T2WIQR", "b1": "B1",
                       "ff_t2_percent": "FFT2"}

# --- longitudinal comparison concepts --------------------------------------------------
#
# Generic concepts (used as the Derivation of each comparison NUM item, so a reader can
# find e.g. every "change since baseline" whatever the metric) ...

VALUE_AT_BASELINE = _private("BL-VALUE", "Value at baseline")
VALUE_AT_PREVIOUS = _private("PV-VALUE", "Value at previous visit")
CHANGE_SINCE_BASELINE = _private("BL-CHANGE", "Change since baseline")
RELATIVE_CHANGE_SINCE_BASELINE = _private("BL-RELCHANGE", "Relative change since baseline")
CHANGE_SINCE_PREVIOUS = _private("PV-CHANGE", "Change since previous visit")
RELATIVE_CHANGE_SINCE_PREVIOUS = _private("PV-RELCHANGE", "Relative change since previous visit")
INTERVAL_SINCE_BASELINE = _private("BL-INTERVAL", "Interval since baseline")
INTERVAL_SINCE_PREVIOUS = _private("PV-INTERVAL", "Interval since previous visit")
ANNUALISED_CHANGE_SINCE_BASELINE = _private("BL-RATE", "Annualised change since baseline")
#: A group whose earlier values were measured by another algorithm version: not compared.
VERSION_CHANGE = _private("VERSIONCHG", "Earlier values of another algorithm version")
VERSION_CHANGES = MappingProxyType({
    True: _private("VERSIONCHG-YES", "Not compared: measured by another algorithm version"),
})

#: Whether the subject's earlier visits could be looked up (a qualitative evaluation of each
#: whole-region group, written only when they could not): the node had none of its own and
#: asked PACS for the SRs it once sent (node.history), and PACS did not answer.
PRIOR_HISTORY = _private("PRIORHIST", "Earlier visits")
PRIOR_HISTORY_NOTES = MappingProxyType({
    "pacs-no-answer": _private("PRIORHIST-NOANSWER", "Not retrieved: PACS did not answer"),
})

#: comparison kind -> (generic concept, code suffix, meaning template, unit or None for
#: "the metric's own unit"). Kinds are the names used by :func:`comparison_concept`.
COMPARISON_KINDS: Mapping[str, tuple[CodedConcept, str, str, CodedConcept | None]] = MappingProxyType({
    "baseline_value": (VALUE_AT_BASELINE, "BL", "{M} at baseline", None),
    "previous_value": (VALUE_AT_PREVIOUS, "PV", "{M} at previous visit", None),
    "change_since_baseline": (CHANGE_SINCE_BASELINE, "BL-CHG", "Change in {m} since baseline", None),
    "relative_change_since_baseline": (RELATIVE_CHANGE_SINCE_BASELINE, "BL-REL",
                                       "Relative change in {m} since baseline", UNIT_PERCENT),
    "days_since_baseline": (INTERVAL_SINCE_BASELINE, "BL-DAYS",
                            "Interval since baseline ({m})", UNIT_DAY),
    "annualised_change_since_baseline": (ANNUALISED_CHANGE_SINCE_BASELINE, "BL-RATE",
                                         "Annualised change in {m} since baseline", None),
    "change_since_previous": (CHANGE_SINCE_PREVIOUS, "PV-CHG", "Change in {m} since previous visit", None),
    "relative_change_since_previous": (RELATIVE_CHANGE_SINCE_PREVIOUS, "PV-REL",
                                       "Relative change in {m} since previous visit", UNIT_PERCENT),
    "days_since_previous": (INTERVAL_SINCE_PREVIOUS, "PV-DAYS",
                            "Interval since previous visit ({m})", UNIT_DAY),
})


def comparison_concept(metric: str, kind: str) -> tuple[CodedConcept, CodedConcept]:
    """The private concept name and UCUM unit of one comparison value of one metric.

    Each (metric, kind) has its own code, e.g. ``(CSA-BL-CHG, 99MUSCLENODE, "Change in
    area since baseline")``, so that a reader pairs the value with its metric from the
    concept name alone and never mistakes it for the current value of the metric.

    Parameters
    ----------
    metric : str
        A key of :data:`METRIC_CONCEPTS`.
    kind : str
        A key of :data:`COMPARISON_KINDS`.

    Returns
    -------
    (CodedConcept, CodedConcept)
        Concept name and unit.

    Raises
    ------
    ValueError
        Unknown metric or kind.
    """
    if metric not in METRIC_CONCEPTS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRIC_CONCEPTS)})")
    if kind not in COMPARISON_KINDS:
        raise ValueError(f"unknown comparison kind {kind!r} (known: {', '.join(COMPARISON_KINDS)})")
    _, suffix, template, unit = COMPARISON_KINDS[kind]
    words = METRIC_WORDS[metric]
    capital = words[0].upper() + words[1:] if words.islower() else words  # "fRMA" stays
    meaning = template.format(m=words, M=capital)
    concept = _private(f"{_METRIC_CODE_PREFIX[metric]}-{suffix}", meaning)
    if kind == "annualised_change_since_baseline":   # the metric's unit per year (UCUM "a")
        own = METRIC_CONCEPTS[metric][1]
        return concept, CodedConcept(value=f"{own.value}/a", scheme_designator="UCUM",
                                     meaning=f"{own.meaning} per year")
    return concept, (unit if unit is not None else METRIC_CONCEPTS[metric][1])


def laterality(side: Side | str) -> CodedConcept:
    """Right or Left (SCT) for a :class:`quant.enums.Side` (or its value).

    Raises
    ------
    ValueError
        The side is neither right nor left.
    """
    value = getattr(side, "value", side)
    if value == "right":
        return RIGHT
    if value == "left":
        return LEFT
    raise ValueError(f"side must be right or left, got {side!r}")


def region_concept(region: Region | str) -> CodedConcept:
    """Anatomic region of a :class:`quant.enums.Region` (or its value): thigh -> Thigh,
    calf -> Lower leg, leg (level unknown) -> Lower limb, hand -> Hand, head_neck -> Head and Neck.

    Raises
    ------
    ValueError
        An unknown region.
    """
    value = getattr(region, "value", region)
    try:
        return {"thigh": THIGH, "calf": LOWER_LEG, "leg": LOWER_LIMB, "hand": HAND,
                "head_neck": HEAD_AND_NECK}[value]
    except (KeyError, TypeError):
        raise ValueError(f"region must be thigh, calf, leg, hand or head_neck, got {region!r}") from None


#: Words naming a region in labels and tracking identifiers.
REGION_WORDS: Mapping[str, str] = MappingProxyType({"thigh": "thigh", "calf": "lower leg", "leg": "leg",
                                                    "hand": "hand", "head_neck": "head and neck"})
