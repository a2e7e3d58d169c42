"""Comparison of a current value with the values of earlier visits of the same subject.

Pure and small: the caller fetches the prior values (from its database), this module
picks the baseline and the previous visit and computes changes and intervals, and
:func:`reports.sr.build_sr` writes them into the SR.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

DAYS_PER_YEAR = 365.25


def _check_date(value, what: str) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if not isinstance(value, datetime.date):
        raise ValueError(f"{what} must be a datetime.date, got {type(value).__name__}: {value!r}")
    return value


def check_number(value, what: str) -> float:
    """``value`` as a finite float; ValueError naming ``what`` otherwise (a bool is not a number)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got a bool")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}: {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class PriorValue:
    """The value of one metric at one earlier visit.

    Parameters
    ----------
    study_instance_uid : str
        The study of that visit.
    study_date : datetime.date
        Its date (a ``datetime`` is reduced to its date).
    value : float
        The metric's value then, finite, in the same unit as the current value.
    """

    study_instance_uid: str
    study_date: datetime.date
    value: float
    algorithm_version: str = ""   # the version that measured it ("" unknown)

    def __post_init__(self):
        if not isinstance(self.study_instance_uid, str) or not self.study_instance_uid:
            raise ValueError(f"PriorValue.study_instance_uid must be a non-empty str, "
                             f"got {self.study_instance_uid!r}")
        object.__setattr__(self, "study_date", _check_date(self.study_date, "PriorValue.study_date"))
        object.__setattr__(self, "value", check_number(self.value, "PriorValue.value"))


@dataclass(frozen=True)
class Comparison:
    """A current value against its baseline and previous visit.

    Parameters
    ----------
    baseline : PriorValue or None
        The earliest earlier visit.
    previous : PriorValue or None
        The latest earlier visit (the same as ``baseline`` when there is one prior).
    current_date : datetime.date
        Date of the current visit.
    current_value : float or None
        The current value. ``None`` leaves it to be filled in (see :meth:`with_current`;
        :func:`reports.sr.build_sr` fills it from the analysis); the change properties
        are ``None`` until it is known.
    """

    baseline: PriorValue | None
    previous: PriorValue | None
    current_date: datetime.date
    current_value: float | None = None

    def __post_init__(self):
        for name in ("baseline", "previous"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, PriorValue):
                raise ValueError(f"Comparison.{name} must be a PriorValue or None, got {type(v).__name__}")
        object.__setattr__(self, "current_date", _check_date(self.current_date, "Comparison.current_date"))
        if self.current_value is not None:
            object.__setattr__(self, "current_value", check_number(self.current_value, "Comparison.current_value"))
        for name in ("baseline", "previous"):
            v = getattr(self, name)
            if v is not None and v.study_date >= self.current_date:
                raise ValueError(f"Comparison.{name} ({v.study_date}) is not before the current date "
                                 f"({self.current_date})")

    def with_current(self, value: float) -> Comparison:
        """The same comparison with ``current_value`` set."""
        return replace(self, current_value=value)

    # --- baseline -----------------------------------------------------------------------
    @property
    def change_since_baseline(self) -> float | None:
        """Current minus baseline value (unit of the metric), or None."""
        return _change(self.current_value, self.baseline)

    @property
    def relative_change_since_baseline(self) -> float | None:
        """Change since baseline in percent of the baseline value; None without a
        baseline or when the baseline value is 0.
        """
        return _relative(self.current_value, self.baseline)

    @property
    def annualised_change_since_baseline(self) -> float | None:
        """Change since baseline per year (365.25 days): the metric's unit per year, or None."""
        change, days = self.change_since_baseline, self.days_since_baseline
        if change is None or not days:
            return None
        return change / (days / DAYS_PER_YEAR)

    @property
    def days_since_baseline(self) -> int | None:
        """Days from the baseline visit to the current one, or None."""
        return None if self.baseline is None else (self.current_date - self.baseline.study_date).days

    # --- previous -----------------------------------------------------------------------
    @property
    def change_since_previous(self) -> float | None:
        """Current minus previous value (unit of the metric), or None."""
        return _change(self.current_value, self.previous)

    @property
    def relative_change_since_previous(self) -> float | None:
        """Change since the previous visit in percent of its value; None without a
        previous visit or when its value is 0.
        """
        return _relative(self.current_value, self.previous)

    @property
    def days_since_previous(self) -> int | None:
        """Days from the previous visit to the current one, or None."""
        return None if self.previous is None else (self.current_date - self.previous.study_date).days


def _change(current: float | None, prior: PriorValue | None) -> float | None:
    if current is None or prior is None:
        return None
    return current - prior.value


def _relative(current: float | None, prior: PriorValue | None) -> float | None:
    if current is None or prior is None or prior.value == 0:
        return None
    return (current - prior.value) / abs(prior.value) * 100.0


def compare(current_value: float, current_date: datetime.date, priors: Sequence[PriorValue]) -> Comparison:
    """Compare a current value with earlier visits.

    Parameters
    ----------
    current_value : float
        The value now.
    current_date : datetime.date
        The date of the current visit.
    priors : sequence of PriorValue
        Values of other visits of the same subject, region, side and metric, in any
        order. Those on or after ``current_date`` are ignored (a re-analysed older
        study must not compare with the future, nor with itself).

    Returns
    -------
    Comparison
        ``baseline`` is the earliest prior, ``previous`` the latest one before
        ``current_date`` (ties on a date are broken by Study Instance UID, so the result
        does not depend on the order of ``priors``); both None without usable priors.

    Raises
    ------
    ValueError
        A value or date is malformed, or an item of ``priors`` is not a PriorValue.
    """
    current_value = check_number(current_value, "current_value")
    current_date = _check_date(current_date, "current_date")
    if isinstance(priors, (str, bytes)) or not hasattr(priors, "__iter__"):
        raise ValueError(f"priors must be a sequence of PriorValue, got {type(priors).__name__}")
    priors = list(priors)
    for i, p in enumerate(priors):
        if not isinstance(p, PriorValue):
            raise ValueError(f"priors[{i}] must be a PriorValue, got {type(p).__name__}")
    earlier = sorted((p for p in priors if p.study_date < current_date),
                     key=lambda p: (p.study_date, p.study_instance_uid))
    if not earlier:
        return Comparison(None, None, current_date, current_value)
    return Comparison(earlier[0], earlier[-1], current_date, current_value)
