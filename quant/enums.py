"""Defined terms used across musclenode (stable names: exports and the API use the values)."""

from enum import Enum, IntEnum


class SeriesKind(str, Enum):
    """What a series is to the quantification pipeline."""

    WATER = "water"
    FAT = "fat"
    IN_PHASE = "in_phase"
    OPPOSED_PHASE = "opposed_phase"
    MESE = "mese"  # multi-echo spin echo (water T2)
    MEGRE_MAGNITUDE = "megre_magnitude"  # multi-echo gradient echo, magnitude (MEGRE PDFF)
    MEGRE_PHASE = "megre_phase"          # multi-echo gradient echo, phase
    UNKNOWN = "unknown"


class Region(str, Enum):
    """Body region of a measurement (``measurements.csv`` column ``region``)."""

    THIGH = "thigh"
    CALF = "calf"
    HAND = "hand"
    HEAD_NECK = "head_neck"
    LEG = "leg"  # a leg whose level (thigh or calf) could not be told


class Side(str, Enum):
    """Side of the patient (from patient coordinates, never from image columns)."""

    RIGHT = "right"
    LEFT = "left"
    NONE = "none"


class Tissue(IntEnum):
    """Values of a tissue label map."""

    BACKGROUND = 0
    MUSCLE = 1
    SUBCUTANEOUS_FAT = 2
    BONE = 3  # cortical bone and marrow
    INTERMUSCULAR_FAT = 4


class SideLabel(IntEnum):
    """Values of a side label map."""

    NONE = 0
    RIGHT = 1
    LEFT = 2

    @property
    def side(self) -> Side:
        """The :class:`Side` this label stands for."""
        return {0: Side.NONE, 1: Side.RIGHT, 2: Side.LEFT}[int(self)]


class Metric(str, Enum):
    """A measured quantity: the key in ``measurements.csv``, the database and the API,
    from :mod:`quant` to the SR (never renamed at a boundary). :attr:`unit` is its UCUM unit.
    """

    CSA_MM2 = "csa_mm2"              # mean muscle cross-sectional area over the slices with muscle
    VOL_ML = "vol_ml"                # muscle volume
    FF_PERCENT = "ff_percent"        # fat fraction (Dixon or MEGRE PDFF)
    FRMA_MM2 = "frma_mm2"            # functional remaining muscle area: sum of area x (1 - FF), mean over slices
    T2W_MS = "t2w_ms"                # water T2, median over the region
    T2W_MEAN_MS = "t2w_mean_ms"      # water T2, mean
    T2W_IQR_MS = "t2w_iqr_ms"        # water T2, interquartile range
    B1 = "b1"                        # relative refocusing B1, median
    FF_T2_PERCENT = "ff_t2_percent"  # fat fraction of the T2 fit (PD, T1-weighted unless TR is known)

    @property
    def unit(self) -> str:
        """UCUM unit of the metric."""
        return METRIC_UNITS[self]


METRIC_UNITS: dict[Metric, str] = {
    Metric.CSA_MM2: "mm2", Metric.VOL_ML: "ml", Metric.FF_PERCENT: "%", Metric.FRMA_MM2: "mm2",
    Metric.T2W_MS: "ms", Metric.T2W_MEAN_MS: "ms", Metric.T2W_IQR_MS: "ms", Metric.B1: "1",
    Metric.FF_T2_PERCENT: "%",
}


class Model(str, Enum):
    """The model that made a value (``measurements.csv`` column ``model``; the SR's Measurement Method)."""

    DIXON_RICIAN_ML = "dixon-rician-ml"      # magnitude Dixon, Rician maximum likelihood
    MEGRE_PDFF = "megre-pdff-6peak"          # multi-echo gradient echo: 6-peak fat, R2*, field map
    EPG_BICOMPONENT = "epg-bicomponent"      # MESE: bi-component slice-profile EPG dictionary fit
    BIEXP_FIXED_FAT = "biexp-fixed-fat"      # MESE: bi-exponential, fixed fat T2 (the UCL fallback)


class Roi(str, Enum):
    """A muscle or compartment below a region (``measurements.csv`` column ``roi``; empty
    for the whole-region value). The values are the stable names exports and the API use.
    """

    # thigh
    ANTERIOR_COMPARTMENT = "anterior_compartment"      # quadriceps with sartorius
    MEDIAL_COMPARTMENT = "medial_compartment"          # adductors with gracilis
    POSTERIOR_COMPARTMENT = "posterior_compartment"    # hamstrings
    # calf (anterior_compartment as for the thigh)
    LATERAL_COMPARTMENT = "lateral_compartment"        # peronei
    TRICEPS_SURAE = "triceps_surae"                    # superficial posterior: gastrocnemius and soleus
    DEEP_POSTERIOR_COMPARTMENT = "deep_posterior_compartment"


#: The compartments of each region, in label order (label k + 1 in a compartment map).
COMPARTMENTS: dict[Region, tuple[Roi, ...]] = {
    Region.THIGH: (Roi.ANTERIOR_COMPARTMENT, Roi.MEDIAL_COMPARTMENT, Roi.POSTERIOR_COMPARTMENT),
    Region.CALF: (Roi.ANTERIOR_COMPARTMENT, Roi.LATERAL_COMPARTMENT, Roi.TRICEPS_SURAE,
                  Roi.DEEP_POSTERIOR_COMPARTMENT),
}


class RoiSource(str, Enum):
    """Where an ROI came from (``measurements.csv`` column ``source``)."""

    AUTOMATIC = "automatic"   # the node's own segmentation (whole region, automatic compartments)
    READER = "reader"         # drawn by a reader on this visit
    CARRIED = "carried"       # a reader's ROIs carried from another visit by registration
    ATLAS = "atlas"           # fused from other subjects' reader ROIs

    @property
    def lineage(self) -> str:
        """What values of this source may be compared with across visits: a reader's ROIs
        and the same ROIs carried to other visits are one lineage ("reader"); automatic
        and atlas ROIs are each their own, never mixed with a reader's.
        """
        return "reader" if self in (RoiSource.READER, RoiSource.CARRIED) else self.value
