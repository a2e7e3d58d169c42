"""Names of muscles and muscle groups, and their SNOMED CT codes (Segmented Property Type of
a SEG segment, finding site of an SR measurement group).

Pure data: no I/O. :mod:`quant.reader_rois` names a reader's segments from these codes;
:mod:`reports.codes` writes them into the node's SEG and SR.

ROI names are lower snake case (``vastus_lateralis``), the automatic compartments keep their
:class:`~quant.enums.Roi` values (``triceps_surae``). Every code below was checked against a
real source, cited next to it, and its SNOMED CT check digit (Verhoeff) is valid:

- :data:`PROPERTY_TYPES`: code *and* meaning confirmed (DICOM content in pydicom's concept
  dictionary, the DICOM terminology files of dcmqi and 3D Slicer, the SNOMED mappings of
  TotalSegmentator and MOOSE, the HL7 FHIR R4 value set of SNOMED CT anatomical structures),
  so the node writes them and reads them;
- :data:`READ_ONLY_CODES`: codes that only Uberon's bridge to SNOMED CT gives
  (``obophenotype/uberon`` ``src/ontology/bridge/uberon-bridge-to-sctid.owl``, "rough subclass
  axioms ... not verified to the same degree"), some of which other tools write
  (TotalSegmentator writes SCT 181674001 for the gluteus maximus). Their SNOMED CT meaning
  could not be confirmed, so the node reads them (a segment coded so is named by the muscle)
  but never writes them.

Not verified, so written with the generic code and the label: the compartments of the thigh
and calf (anterior, medial, posterior, lateral, deep posterior compartment), vastus medialis,
semimembranosus and the hamstrings as a group (no code found at all, none read either), and
every muscle of :data:`READ_ONLY_CODES` (rectus femoris, vastus intermedius, sartorius, the
adductors, gracilis, biceps femoris, semitendinosus, tibialis anterior and posterior,
peroneus longus, the gastrocnemius and its heads, soleus, quadriceps, thenar, hypothenar,
interossei, lumbricales, masseter, temporalis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

SCT = "SCT"


@dataclass(frozen=True)
class MuscleCode:
    """A coded concept naming a muscle or muscle group.

    Attributes
    ----------
    value : str
        Code value (a SNOMED CT concept id).
    meaning : str
        Code meaning, as the source gives it.
    scheme : str
        Coding scheme designator (``"SCT"``).
    """

    value: str
    meaning: str
    scheme: str = SCT


#: ROI name -> the code the node writes for it (and reads). Sources:
#:
#: - vastus lateralis, SCT 1403006 "Vastus lateralis muscle": HL7 FHIR R4 value set
#:   http://hl7.org/fhir/ValueSet/approach-site-codes (SNOMED CT anatomical structures), also
#:   quoted as "1403006 | Structure of vastus lateralis muscle (body structure)" in FHIR IGs;
#: - gluteus maximus, SCT 206007 "Gluteus maximus muscle": ENHANCE-PET/MOOSE
#:   ``moosez/mappings/moose_snomed_mapping.csv`` and the same FHIR R4 value set;
#: - gluteus medius SCT 78333006, gluteus minimus SCT 75297007, iliopsoas SCT 68455001:
#:   MOOSE's mapping and wasserth/TotalSegmentator
#:   ``totalsegmentator/resources/totalsegmentator_snomed_mapping.csv`` (both agree);
#: - triceps surae, SCT 53451005 "Triceps surae muscle structure": SNOMED International
#:   (http://snomed.info/id/53451005);
#: - tongue SCT 21974007, sternocleidomastoid SCT 22823000, trapezius SCT 31764008: DICOM
#:   PS3.16 content as in pydicom (``src/pydicom/sr/_concepts_dict.py``: CID 7151 and others)
#:   and QIICR/dcmqi ``doc/segContexts/SegmentationCategoryTypeModifier-DICOM-Master.json``
#:   (the file 3D Slicer ships in ``Modules/Loadable/Terminologies/Resources``).
PROPERTY_TYPES: Mapping[str, MuscleCode] = MappingProxyType({
    "vastus_lateralis": MuscleCode("1403006", "Vastus lateralis muscle"),
    "gluteus_maximus": MuscleCode("206007", "Gluteus maximus muscle"),
    "gluteus_medius": MuscleCode("78333006", "Gluteus medius muscle"),
    "gluteus_minimus": MuscleCode("75297007", "Gluteus minimus muscle"),
    "iliopsoas": MuscleCode("68455001", "Iliopsoas muscle"),
    "triceps_surae": MuscleCode("53451005", "Triceps surae muscle structure"),
    "tongue": MuscleCode("21974007", "Tongue"),
    "sternocleidomastoid": MuscleCode("22823000", "Sternocleidomastoid muscle"),
    "trapezius": MuscleCode("31764008", "Trapezius muscle"),
})

#: (scheme, code value) -> ROI name of codes that are read but never written: Uberon's
#: bridge to SNOMED CT (``obophenotype/uberon`` ``src/ontology/bridge/uberon-bridge-to-sctid.owl``;
#: the Uberon class in the comment). Their SNOMED CT meaning is not confirmed.
READ_ONLY_CODES: Mapping[tuple[str, str], str] = MappingProxyType({
    (SCT, "181669009"): "quadriceps",             # UBERON:0001377 quadriceps femoris
    (SCT, "181679006"): "rectus_femoris",         # UBERON:0001378 rectus femoris
    (SCT, "181682001"): "vastus_intermedius",     # UBERON:0014847 vastus intermedius
    (SCT, "181683006"): "sartorius",              # UBERON:0001373 sartorius muscle
    (SCT, "181670005"): "adductors",              # UBERON:0011144 adductor muscle of hip
    (SCT, "368101007"): "adductors",              # UBERON:0011144 adductor muscle of hip
    (SCT, "181686003"): "adductor_longus",        # UBERON:0000303 adductor longus
    (SCT, "181687007"): "adductor_brevis",        # UBERON:0000368 adductor brevis
    (SCT, "181688002"): "adductor_magnus",        # UBERON:0000370 adductor magnus
    (SCT, "181689005"): "gracilis",               # UBERON:0000950 gracilis
    (SCT, "181672002"): "biceps_femoris",         # UBERON:0001374 biceps femoris
    (SCT, "181685004"): "semitendinosus",         # UBERON:0001375 semitendinosus
    (SCT, "181696007"): "tibialis_anterior",      # UBERON:0001385 tibialis anterior
    (SCT, "361824007"): "tibialis_posterior",     # UBERON:0001667 tibialis posterior
    (SCT, "361825008"): "peroneus_longus",        # UBERON:0001387 fibularis longus
    (SCT, "181700004"): "gastrocnemius",          # UBERON:0001388 gastrocnemius
    (SCT, "213689008"): "medial_gastrocnemius",   # UBERON:0011907 gastrocnemius medialis
    (SCT, "213588009"): "lateral_gastrocnemius",  # UBERON:0011908 gastrocnemius lateralis
    (SCT, "181702007"): "soleus",                 # UBERON:0001389 soleus muscle
    (SCT, "181674001"): "gluteus_maximus",        # UBERON:0001370 gluteus maximus (also TotalSegmentator)
    (SCT, "181675000"): "gluteus_medius",         # UBERON:0001371 gluteus medius
    (SCT, "181676004"): "gluteus_minimus",        # UBERON:0008521 gluteus minimus
    (SCT, "181668001"): "iliopsoas",              # UBERON:0001999 iliopsoas
    (SCT, "181640000"): "thenar",                 # UBERON:0014376 thenar muscle
    (SCT, "181643003"): "hypothenar",             # UBERON:0014377 hypothenar muscle
    (SCT, "265804003"): "interossei",             # UBERON:0001502 interosseous muscle of manus
    (SCT, "181654008"): "lumbricales",            # UBERON:0001501 lumbrical muscle of manus
    (SCT, "181738000"): "masseter",               # UBERON:0001597 masseter muscle
    (SCT, "181739008"): "temporalis",             # UBERON:0001598 temporalis muscle
    (SCT, "181226008"): "tongue",                 # UBERON:0001723 tongue
    (SCT, "181741009"): "sternocleidomastoid",    # UBERON:0001128 sternocleidomastoid
})

#: Muscles and groups the seed study names for which no code was verified: a segment label
#: that spells one (any case, spaces or underscores) is named by it, like a coded one.
UNCODED_NAMES: tuple[str, ...] = ("vastus_medialis", "semimembranosus", "hamstrings", "peroneus_brevis",
                                  "extensor_digitorum_longus", "flexor_digitorum_longus")

#: Every code read: (scheme, code value) -> ROI name.
KNOWN_CODES: Mapping[tuple[str, str], str] = MappingProxyType(
    {(c.scheme, c.value): name for name, c in PROPERTY_TYPES.items()} | dict(READ_ONLY_CODES))


def _key(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())


def roi_of_code(scheme: str, value: str) -> str | None:
    """The ROI name a code stands for.

    Parameters
    ----------
    scheme, value : str
        Coding scheme designator and code value.

    Returns
    -------
    str or None
        A key of :data:`PROPERTY_TYPES` or a value of :data:`READ_ONLY_CODES`; None for a
        code not listed (a generic one, such as SCT 102292000).
    """
    return KNOWN_CODES.get((scheme.strip(), value.strip()))


def property_type(name: str) -> MuscleCode | None:
    """The code the node writes for an ROI name.

    Parameters
    ----------
    name : str
        An ROI name; case, spaces, hyphens and underscores do not matter
        (``"Vastus lateralis"`` is ``vastus_lateralis``).

    Returns
    -------
    MuscleCode or None
        From :data:`PROPERTY_TYPES`; None where no code was verified (the caller writes its
        generic code and the label).
    """
    return PROPERTY_TYPES.get(_key(name))
