"""The precision each reported value is written with, in the SR, the summary page and the
text a reader sees: what the method supports, not what a float holds.

Area to 1 mm², volume to 0.1 mL, fat fraction to 0.1 percentage point, water T2 to
0.1 ms, B1 to 0.01; relative changes to 0.1 %, intervals to the day; quality figures
(Dice, mismatch, agreement) to 0.001. A change, a prior value or an annualised rate has
the precision of its metric.
"""

from __future__ import annotations

import math

#: metric (``Measurement.metric``) -> decimals of its value, of its prior values and of
#: its (annualised) change.
METRIC_DECIMALS: dict[str, int] = {
    "csa_mm2": 0, "frma_mm2": 0, "vol_ml": 1, "ff_percent": 1, "ff_t2_percent": 1,
    "t2w_ms": 1, "t2w_mean_ms": 1, "t2w_iqr_ms": 1, "b1": 2,
}
#: comparison kind -> decimals, where not the metric's own.
KIND_DECIMALS: dict[str, int] = {
    "relative_change_since_baseline": 1, "relative_change_since_previous": 1,
    "days_since_baseline": 0, "days_since_previous": 0,
}
#: Decimals of a quality figure (registration Dice and mismatch, atlas agreement).
QUALITY_DECIMALS = 3


def decimals(metric: str, kind: str = "") -> int:
    """Decimals of a metric's value (``kind`` ""), or of one of its comparison values."""
    if kind in KIND_DECIMALS:
        return KIND_DECIMALS[kind]
    return METRIC_DECIMALS.get(metric, 3)


def rounded(value: float, metric: str, kind: str = "") -> float:
    """``value`` rounded to the precision of the metric (or comparison kind): an ``int``
    where that is a whole number (so that DICOM text reads ``7273``, not ``7273.0``);
    ``-0.0`` is 0.
    """
    if not math.isfinite(value):
        return value
    d = decimals(metric, kind)
    if d == 0:
        return int(round(float(value)))
    return round(float(value), d) + 0.0   # -0.0 -> 0.0


def formatted(value: float, metric: str, kind: str = "", *, sign: bool = False) -> str:
    """``value`` as text at the metric's precision (``sign``: a leading + on a positive change)."""
    if not math.isfinite(value):
        return "n/a"
    d = decimals(metric, kind)
    return f"{rounded(value, metric, kind):{'+' if sign else ''}.{d}f}"
