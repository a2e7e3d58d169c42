"""Defined terms used across musclenode (stable names: exports and the API use the values)."""

from enum import Enum, IntEnum


class SeriesKind(str, Enum):
    """What a series is to the quantification pipeline."""

    WATER = "water"
    FAT = "fat"
    IN_PHASE = "in_phase"
    OPPOSED_PHASE = "opposed_phase"
    MESE = "mese"  # multi-echo spin echo (water T2)
    MEGRE_MAGNITUDE = "megre_magnitude"  # multi-echo gradient echo, magnitude (complex Dixon PDFF)
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
        return {0: Side.NONE, 1: Side.RIGHT, 2: Side.LEFT}[int(self)]
