"""Trial statistics of longitudinal muscle MRI: annualised change, responsiveness, sample size, correlation.

Pure (no I/O, no database): the caller turns its rows into :class:`Visit` records and
gets frozen dataclasses back.

For the API (``GET /api/v1/stats?metric=&region=&roi=&side=&score=&group=``): the
statistics of one metric are computed from each subject's visits (days since the
subject's first visit and the value). :func:`annualised_changes` gives each subject's
change per year -- the least-squares slope over all visits, for two visits
(last - first) / years, with a year of 365.25 days -- in the metric's unit per year and
in % of the baseline value per year; subjects with a single visit or less than 30 days
of follow-up are left out and counted. :func:`cohort_stats` gives n, mean and SD of
these changes, the standardised response mean (SRM = mean / SD) with a 95 %
normal-approximation confidence interval (SE = sqrt(1/n + SRM²/(2n))), and the number
of patients per arm a two-arm trial needs to detect a 25 % or a 50 % slowing of the mean
change (two-sided two-sample t-test, alpha 0.05, power 0.8, solved exactly with the
noncentral t distribution). :func:`correlation` pairs each subject's change of the MRI
metric with the change of a clinical score from baseline to the last visit both have
(relative change in % of baseline, or absolute change) and gives Pearson r with a 95 %
Fisher-z confidence interval, Spearman rho with a 95 % Fisher-z interval using the
Bonett-Wright standard error, their p-values and n. :func:`by_group` repeats any of them
for each group label and for all subjects (``"all"``). A statistic that cannot be
computed (fewer than 3 subjects, an SD of 0, ...) is ``None`` with a ``reason``, never an
error.

The forms of Klickovic et al. (JNNP 2025;96:908-911) are, for example,
``correlation(fRMA anterior thigh, knee extension, relative_mri=True, relative_score=True)``
and ``correlation(fRMA calf, ALSFRS-R total, relative_mri=True, relative_score=False)``.
A correlation of two relative *decreases* equals that of the two relative changes (both
signs flip).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from scipy import stats

from .longitudinal import check_number as _check_number

DAYS_PER_YEAR = 365.25
"""Days of a year for annualising."""
MIN_FOLLOW_UP_DAYS = 30.0
"""Shortest follow-up (first to last visit) that gives an annualised change."""
MIN_N = 3
"""Fewest subjects (or pairs) for an SRM, a sample size or a correlation."""
ALPHA = 0.05
"""Two-sided significance level of the sample-size calculation."""
POWER = 0.8
"""Power of the sample-size calculation."""
SLOWINGS = (0.25, 0.5)
"""Treatment effects for the sample sizes, as fractions of the mean change that a treatment slows."""
ALL = "all"
"""Key of the result over all subjects in :func:`by_group`."""

_Z975 = float(stats.norm.ppf(0.975))
_SD_ZERO_RTOL = 1e-12  # an SD below this times the largest |value| is rounding noise: taken as 0

R = TypeVar("R")


def _check_label(value: Any, what: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty str{' or None' if optional else ''}, got {value!r}")
    return value


# --- inputs and results ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Visit:
    """One value of one subject at one visit.

    Parameters
    ----------
    subject : str
        The subject (any stable key, e.g. ``reports.uids.subject_key``).
    days : float
        Days since the subject's baseline (any origin works: the earliest visit of a
        subject is its baseline and follow-up is counted from it).
    value : float
        The value (an MRI metric or a clinical score), finite.
    group : str or None
        The subject's group (e.g. ``"ALS"``, ``"control"``, ``"fast progressor"``); all
        visits of a subject that carry one must carry the same.
    visit : str or None
        A visit label (e.g. ``"M0"``, ``"M6"``, ``"M12"``): :func:`correlation` pairs the MRI
        and the score visits of a subject on it where every visit of that subject has one.
    """

    subject: str
    days: float
    value: float
    group: str | None = None
    visit: str | None = None

    def __post_init__(self):
        _check_label(self.subject, "Visit.subject", optional=False)
        object.__setattr__(self, "days", _check_number(self.days, "Visit.days"))
        object.__setattr__(self, "value", _check_number(self.value, "Visit.value"))
        _check_label(self.group, "Visit.group")
        _check_label(self.visit, "Visit.visit")


@dataclass(frozen=True)
class Exclusion:
    """A subject left out of a statistic, and why.

    Parameters
    ----------
    subject : str
        The subject.
    group : str or None
        Its group.
    reason : str
        Why it was left out, in words.
    """

    subject: str
    group: str | None
    reason: str


@dataclass(frozen=True)
class SubjectChange:
    """The annualised change of one subject.

    Parameters
    ----------
    subject : str
        The subject.
    group : str or None
        Its group.
    n_visits : int
        Visits used (at least 2).
    follow_up_days : float
        Days from the first to the last visit (at least :data:`MIN_FOLLOW_UP_DAYS`).
    baseline : float
        The value at the first visit.
    change_per_year : float
        Change per year, in the unit of the value: the least-squares slope over all visits,
        for two visits (last - first) / years.
    relative_change_per_year : float or None
        ``change_per_year`` in % of ``|baseline|`` per year; None when the baseline is 0.
    method : str
        ``"two visits"`` or ``"least squares"``.
    """

    subject: str
    group: str | None
    n_visits: int
    follow_up_days: float
    baseline: float
    change_per_year: float
    relative_change_per_year: float | None
    method: str


@dataclass(frozen=True)
class AnnualisedChanges:
    """Annualised changes of a cohort (result of :func:`annualised_changes`).

    Parameters
    ----------
    changes : tuple of SubjectChange
        One per subject with enough follow-up, sorted by subject.
    excluded : tuple of Exclusion
        The subjects left out (one visit, or less than :data:`MIN_FOLLOW_UP_DAYS` of follow-up).
    """

    changes: tuple[SubjectChange, ...]
    excluded: tuple[Exclusion, ...]

    @property
    def n(self) -> int:
        """Subjects with an annualised change."""
        return len(self.changes)

    @property
    def n_excluded(self) -> int:
        """Subjects left out."""
        return len(self.excluded)

    def restrict(self, subjects: Iterable[str]) -> AnnualisedChanges:
        """The changes and exclusions of the given subjects only."""
        keep = set(subjects)
        return AnnualisedChanges(tuple(c for c in self.changes if c.subject in keep),
                                 tuple(e for e in self.excluded if e.subject in keep))


@dataclass(frozen=True)
class SampleSize:
    """Patients per arm for a two-arm trial that slows the mean change by a fraction.

    Parameters
    ----------
    slowing : float
        The fraction of the mean change a treatment is assumed to prevent (0.25, 0.5).
    effect : float or None
        The difference to detect, ``slowing * |mean|`` (unit of the change per year).
    effect_size : float or None
        Cohen's d, ``effect / SD``.
    n_per_arm : int or None
        The smallest n per arm with at least the requested power (rounded up); None with
        ``reason`` when it cannot be computed.
    power : float or None
        The power achieved with ``n_per_arm``.
    reason : str or None
        Why ``n_per_arm`` is None.
    """

    slowing: float
    effect: float | None
    effect_size: float | None
    n_per_arm: int | None
    power: float | None
    reason: str | None = None


@dataclass(frozen=True)
class CohortStats:
    """Responsiveness of an annualised change in a cohort (result of :func:`cohort_stats`).

    Parameters
    ----------
    relative : bool
        True: statistics of the relative change (%/year); False: of the absolute change
        (unit per year).
    n : int
        Subjects used.
    n_left_out : int
        Subjects given but not used (no relative change because the baseline is 0; for an
        :class:`AnnualisedChanges` also those it left out).
    mean : float or None
        Mean annualised change (None for n = 0).
    sd : float or None
        Its sample standard deviation (ddof 1; None for n < 2).
    srm : float or None
        Standardised response mean, ``mean / sd``.
    srm_se : float or None
        Its normal-approximation standard error, ``sqrt(1/n + srm**2 / (2 n))``.
    srm_ci_low, srm_ci_high : float or None
        95 % confidence interval of the SRM, ``srm -/+ 1.96 srm_se``.
    sample_sizes : tuple of SampleSize
        One per slowing in :data:`SLOWINGS` (empty when n < :data:`MIN_N`).
    reason : str or None
        Why some of the fields above are None.
    """

    relative: bool
    n: int
    n_left_out: int
    mean: float | None
    sd: float | None
    srm: float | None
    srm_se: float | None
    srm_ci_low: float | None
    srm_ci_high: float | None
    sample_sizes: tuple[SampleSize, ...]
    reason: str | None = None


@dataclass(frozen=True)
class Pair:
    """One subject's (and visit's) MRI change and score change, as correlated.

    Parameters
    ----------
    subject : str
        The subject.
    group : str or None
        Its group.
    visit : str or None
        The follow-up visit label both series share, or None when paired without labels.
    mri_days, score_days : float
        Days from each series' baseline to the paired follow-up visit.
    mri_change, score_change : float
        The changes from baseline, relative (%) or absolute as requested.
    """

    subject: str
    group: str | None
    visit: str | None
    mri_days: float
    score_days: float
    mri_change: float
    score_change: float


@dataclass(frozen=True)
class Correlation:
    """Correlation of an MRI change with a clinical-score change (result of :func:`correlation`).

    Parameters
    ----------
    relative_mri, relative_score : bool
        Whether each change is relative (% of baseline) or absolute.
    n : int
        Pairs correlated.
    pearson_r, pearson_p : float or None
        Pearson's r and its two-sided p (``scipy.stats.pearsonr``).
    pearson_ci_low, pearson_ci_high : float or None
        95 % CI of r by Fisher's z: ``tanh(atanh(r) -/+ 1.96 / sqrt(n - 3))`` (n >= 4).
    spearman_rho, spearman_p : float or None
        Spearman's rho and its two-sided p (``scipy.stats.spearmanr``, t approximation).
    spearman_ci_low, spearman_ci_high : float or None
        95 % CI of rho by Fisher's z with the Bonett-Wright standard error
        ``sqrt((1 + rho**2 / 2) / (n - 3))`` (n >= 4).
    pairs : tuple of Pair
        The pairs, sorted by subject and days.
    left_out : tuple of Exclusion
        Subjects without a pair.
    reason : str or None
        Why some of the fields above are None.
    """

    relative_mri: bool
    relative_score: bool
    n: int
    pearson_r: float | None
    pearson_ci_low: float | None
    pearson_ci_high: float | None
    pearson_p: float | None
    spearman_rho: float | None
    spearman_ci_low: float | None
    spearman_ci_high: float | None
    spearman_p: float | None
    pairs: tuple[Pair, ...]
    left_out: tuple[Exclusion, ...]
    reason: str | None = None


# --- helpers --------------------------------------------------------------------------------------------------------
def _by_subject(visits: Iterable[Visit], what: str = "visits") -> dict[str, list[Visit]]:
    """Visits per subject, each list sorted by days; checks types, duplicate days and labels."""
    if isinstance(visits, (str, bytes)) or not hasattr(visits, "__iter__"):
        raise ValueError(f"{what} must be an iterable of Visit, got {type(visits).__name__}")
    out: dict[str, list[Visit]] = {}
    for i, v in enumerate(visits):
        if not isinstance(v, Visit):
            raise ValueError(f"{what}[{i}] must be a Visit, got {type(v).__name__}")
        out.setdefault(v.subject, []).append(v)
    for subject, vs in out.items():
        vs.sort(key=lambda v: v.days)
        days = [v.days for v in vs]
        if len(set(days)) != len(days):
            raise ValueError(f"{what}: subject {subject!r} has two visits on the same day")
        labels = [v.visit for v in vs if v.visit is not None]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{what}: subject {subject!r} has two visits labelled alike")
        _group_of(subject, vs)
    return out


def _group_of(subject: str, items: Iterable[Any]) -> str | None:
    groups = {x.group for x in items if x.group is not None}
    if len(groups) > 1:
        raise ValueError(f"subject {subject!r} has more than one group: {sorted(groups)}")
    return groups.pop() if groups else None


def _sample_sd(x: np.ndarray) -> float:
    """Sample SD (ddof 1); exactly 0 when it is rounding noise of equal values."""
    sd = float(np.std(x, ddof=1))
    scale = float(np.max(np.abs(x)))
    return 0.0 if sd <= _SD_ZERO_RTOL * scale else sd


def _fisher_ci(r: float, se: float) -> tuple[float, float]:
    with np.errstate(divide="ignore"):
        z = float(np.arctanh(np.clip(r, -1.0, 1.0)))
    return math.tanh(z - _Z975 * se), math.tanh(z + _Z975 * se)


# --- 1. annualised change -------------------------------------------------------------------------------------------
def annualised_changes(visits: Iterable[Visit], min_follow_up_days: float = MIN_FOLLOW_UP_DAYS) -> AnnualisedChanges:
    """Annualised change of each subject, absolute and relative to baseline.

    Parameters
    ----------
    visits : iterable of Visit
        The visits of one metric (one region, ROI and side), of any number of subjects,
        in any order.
    min_follow_up_days : float
        Shortest follow-up from a subject's first to its last visit; shorter ones are
        left out (an annualised change over days is mostly noise).

    Returns
    -------
    AnnualisedChanges
        Per subject: with two visits ``(last - first) / years``, with more the ordinary
        least-squares slope of value on ``days / 365.25`` over all visits (equal for two
        visits); relative: that slope in % of ``|baseline|`` per year, where the
        baseline is the value at the first visit. Subjects with one visit or a follow-up
        below ``min_follow_up_days`` are in ``excluded`` with the reason.

    Raises
    ------
    ValueError
        An item is not a Visit, a subject has two visits on one day or two groups.
    """
    min_follow_up_days = _check_number(min_follow_up_days, "min_follow_up_days")
    changes: list[SubjectChange] = []
    excluded: list[Exclusion] = []
    for subject, vs in sorted(_by_subject(visits).items()):
        group = _group_of(subject, vs)
        if len(vs) < 2:
            excluded.append(Exclusion(subject, group, "one visit: no change"))
            continue
        follow_up = vs[-1].days - vs[0].days
        if follow_up < min_follow_up_days:
            excluded.append(Exclusion(subject, group, f"follow-up of {follow_up:g} days, "
                                                      f"less than {min_follow_up_days:g}"))
            continue
        baseline = vs[0].value
        if len(vs) == 2:
            slope = (vs[1].value - vs[0].value) / (follow_up / DAYS_PER_YEAR)
            method = "two visits"
        else:
            t = np.array([v.days for v in vs]) / DAYS_PER_YEAR
            y = np.array([v.value for v in vs])
            dt = t - t.mean()
            slope = float(np.sum(dt * (y - y.mean())) / np.sum(dt * dt))
            method = "least squares"
        relative = None if baseline == 0 else slope / abs(baseline) * 100.0
        changes.append(SubjectChange(subject, group, len(vs), follow_up, baseline, slope, relative, method))
    return AnnualisedChanges(tuple(changes), tuple(excluded))


# --- 2. cohort statistics and sample size ---------------------------------------------------------------------------
def _power(n: int, effect_size: float, alpha: float) -> float:
    """Power of the two-sided two-sample t-test, n per arm (both rejection tails)."""
    df = 2 * n - 2
    nc = effect_size * math.sqrt(n / 2.0)
    crit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def sample_size_per_arm(effect_size: float, alpha: float = ALPHA, power: float = POWER) -> tuple[int, float]:
    """Smallest n per arm for a two-sided two-sample t-test with equal arms.

    Parameters
    ----------
    effect_size : float
        Cohen's d (difference of means / common SD), > 0.
    alpha : float
        Two-sided significance level.
    power : float
        Required power.

    Returns
    -------
    tuple of (int, float)
        n per arm (at least 2) and the power it achieves. The power is computed exactly
        from the noncentral t distribution (df = 2n - 2, noncentrality d * sqrt(n/2),
        both rejection tails, as ``statsmodels.stats.power.TTestIndPower``); n is the
        smallest integer reaching ``power`` (the continuous solution rounded up).

    Raises
    ------
    ValueError
        ``effect_size`` is not a finite positive number, or alpha or power not in (0, 1).
    """
    d = _check_number(effect_size, "effect_size")
    if d <= 0:
        raise ValueError(f"effect_size must be > 0, got {d}")
    for name, p in (("alpha", alpha), ("power", power)):
        if not 0.0 < _check_number(p, name) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {p}")
    if _power(2, d, alpha) >= power:
        return 2, _power(2, d, alpha)
    lo, hi = 2, 4  # power(lo) < power <= power(hi) once hi is found; power rises with n
    while _power(hi, d, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > 2**40:
            raise ValueError(f"effect_size {d} too small: more than 2**40 per arm")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _power(mid, d, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi, _power(hi, d, alpha)


def cohort_stats(changes: AnnualisedChanges | Sequence[SubjectChange], relative: bool = False,
                 slowings: Sequence[float] = SLOWINGS, alpha: float = ALPHA, power: float = POWER) -> CohortStats:
    """Mean, SD, standardised response mean and trial sample sizes of annualised changes.

    Parameters
    ----------
    changes : AnnualisedChanges or sequence of SubjectChange
        From :func:`annualised_changes` (possibly of one group, see :func:`by_group`).
    relative : bool
        Use the relative change (% of baseline per year) instead of the absolute one.
        Subjects with a baseline of 0 have none and are counted in ``n_left_out``.
    slowings : sequence of float
        Treatment effects as fractions of the mean change (default 25 % and 50 %).
    alpha, power : float
        Two-sided significance level and power of the sample-size calculation.

    Returns
    -------
    CohortStats
        ``srm = mean / sd``. Its 95 % CI is the normal approximation ``srm -/+ 1.96 se``
        with ``se = sqrt(1/n + srm**2 / (2 n))``: the large-sample (delta-method)
        variance of a one-sample standardised mean, the one-sample counterpart of the
        variance of the standardised mean difference in Hedges & Olkin, *Statistical
        Methods for Meta-Analysis* (1985), ch. 5. Sample sizes: the effect to detect is
        ``slowing * |mean|`` with the observed SD, i.e. Cohen's
        ``d = slowing * |mean| / sd``, solved exactly by :func:`sample_size_per_arm`.
        With n < :data:`MIN_N`, an SD of 0 or a mean of 0 the affected fields are None and
        ``reason`` says why.

    Raises
    ------
    ValueError
        An item is not a SubjectChange, or a slowing is not in (0, 1].
    """
    left_out = 0
    if isinstance(changes, AnnualisedChanges):
        left_out, items = changes.n_excluded, list(changes.changes)
    else:
        items = list(changes)
    for i, c in enumerate(items):
        if not isinstance(c, SubjectChange):
            raise ValueError(f"changes[{i}] must be a SubjectChange, got {type(c).__name__}")
    slowings = tuple(_check_number(s, "slowing") for s in slowings)
    for s in slowings:
        if not 0.0 < s <= 1.0:
            raise ValueError(f"a slowing must be in (0, 1], got {s}")
    values = [c.relative_change_per_year if relative else c.change_per_year for c in items]
    x = np.array([v for v in values if v is not None], dtype=float)
    left_out += len(values) - len(x)
    n = len(x)

    def result(reason: str, mean: float | None = None, sd: float | None = None) -> CohortStats:
        return CohortStats(relative, n, left_out, mean, sd, None, None, None, None, (), reason)

    if n == 0:
        return result("no subject with an annualised change")
    mean = float(np.mean(x))
    if n < 2:
        return result(f"n = {n}: an SD needs 2 subjects, an SRM and sample sizes {MIN_N}", mean)
    sd = _sample_sd(x)
    if n < MIN_N:
        return result(f"n = {n}: an SRM and sample sizes need at least {MIN_N} subjects", mean, sd)
    if sd == 0:
        return result("SD is 0 (all changes equal): SRM and sample sizes undefined", mean, sd)
    srm = mean / sd
    se = math.sqrt(1.0 / n + srm * srm / (2.0 * n))
    sizes = []
    for s in slowings:
        effect = s * abs(mean)
        if effect == 0:
            sizes.append(SampleSize(s, effect, 0.0, None, None, "mean change is 0: no slowing to detect"))
            continue
        d = effect / sd
        n_arm, achieved = sample_size_per_arm(d, alpha, power)
        sizes.append(SampleSize(s, effect, d, n_arm, achieved))
    return CohortStats(relative, n, left_out, mean, sd, srm, se, srm - _Z975 * se, srm + _Z975 * se, tuple(sizes))


# --- 3. correlation -------------------------------------------------------------------------------------------------
def _change(v: Visit, baseline: Visit, relative: bool) -> float:
    return (v.value - baseline.value) / abs(baseline.value) * 100.0 if relative else v.value - baseline.value


def _subject_pairs(subject: str, group: str | None, m: list[Visit], s: list[Visit], relative_mri: bool,
                   relative_score: bool, per_visit: bool) -> list[Pair] | str:
    """The pairs of one subject (MRI and score visits sorted by days), or why it has none."""
    labelled = all(v.visit is not None for v in m + s)
    if per_visit and not labelled:
        raise ValueError(f"per_visit pairing needs a visit label on every visit; subject {subject!r} lacks one")
    if not m or not s:
        return "no MRI visits" if not m else "no score visits"
    if relative_mri and m[0].value == 0:
        return "MRI baseline is 0: no relative change"
    if relative_score and s[0].value == 0:
        return "score baseline is 0: no relative change"
    if labelled:
        s_by_label = {v.visit: v for v in s[1:]}
        common = [(mv, s_by_label[mv.visit], mv.visit) for mv in m[1:] if mv.visit in s_by_label]
        if not common:
            return "no follow-up visit labelled alike in both series"
        chosen = common if per_visit else common[-1:]
    else:
        if len(m) < 2 or len(s) < 2:
            return "no MRI follow-up visit" if len(m) < 2 else "no score follow-up visit"
        chosen = [(m[-1], s[-1], None)]
    return [Pair(subject, group, label, mv.days - m[0].days, sv.days - s[0].days,
                 _change(mv, m[0], relative_mri), _change(sv, s[0], relative_score)) for mv, sv, label in chosen]


def correlation(mri_changes: Iterable[Visit], score_changes: Iterable[Visit], relative_mri: bool,
                relative_score: bool, per_visit: bool = False) -> Correlation:
    """Correlate the change of an MRI metric with the change of a clinical score.

    Parameters
    ----------
    mri_changes : iterable of Visit
        The MRI metric's values at each visit (baseline included): the changes are
        computed here from each subject's first visit.
    score_changes : iterable of Visit
        The clinical score's values (strength, ALSFRS-R, ...) likewise.
    relative_mri, relative_score : bool
        For each series, the relative change ``(value - baseline) / |baseline| * 100`` (%)
        or the absolute change ``value - baseline``. A subject whose baseline is 0 has no
        relative change and is left out.
    per_visit : bool
        False (default): one pair per subject, the change to the last follow-up visit
        both series have -- where every visit of the subject in both series has a
        ``visit`` label, the latest label both share (so both changes span the same
        visits), otherwise each series' own last visit. True: one pair per follow-up
        label both series share (labels required). Such pairs of one subject are not
        independent, so the p-values and CIs are then too optimistic.

    Returns
    -------
    Correlation
        Pearson r with its p (``scipy.stats.pearsonr``) and 95 % CI by Fisher's z
        (SE ``1/sqrt(n-3)``); Spearman rho with its p (``scipy.stats.spearmanr``) and a
        95 % CI by Fisher's z with the Bonett-Wright SE ``sqrt((1 + rho**2/2)/(n-3))``
        (Bonett & Wright, Psychometrika 2000;65:23-28). With n < :data:`MIN_N` or a
        constant series r and rho are None; with n = 3 the CIs are None; ``reason`` says
        why.

    Raises
    ------
    ValueError
        An item is not a Visit, a subject has two visits on a day, two visits with one
        label, or two groups, or ``per_visit`` is set and a visit has no label.
    """
    mri = _by_subject(mri_changes, "mri_changes")
    score = _by_subject(score_changes, "score_changes")
    pairs: list[Pair] = []
    left_out: list[Exclusion] = []
    for subject in sorted(set(mri) | set(score)):
        m, s = mri.get(subject, []), score.get(subject, [])
        group = _group_of(subject, m + s)
        got = _subject_pairs(subject, group, m, s, relative_mri, relative_score, per_visit)
        if isinstance(got, str):
            left_out.append(Exclusion(subject, group, got))
        else:
            pairs.extend(got)

    n = len(pairs)

    def result(reason: str | None, r: float | None = None, r_ci: tuple[float | None, float | None] = (None, None),
               r_p: float | None = None, rho: float | None = None,
               rho_ci: tuple[float | None, float | None] = (None, None), rho_p: float | None = None) -> Correlation:
        return Correlation(relative_mri, relative_score, n, r, r_ci[0], r_ci[1], r_p, rho, rho_ci[0], rho_ci[1],
                           rho_p, tuple(pairs), tuple(left_out), reason)

    if n < MIN_N:
        return result(f"n = {n} pairs: a correlation needs at least {MIN_N}")
    x = np.array([p.mri_change for p in pairs])
    y = np.array([p.score_change for p in pairs])
    for name, arr in (("MRI", x), ("score", y)):
        if np.all(arr == arr[0]):
            return result(f"all {name} changes are equal: correlation undefined")
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    r, r_p = float(pr.statistic), float(pr.pvalue)
    rho, rho_p = float(sr.statistic), float(sr.pvalue)
    if math.isnan(rho):  # spearmanr is NaN only for constant ranks, excluded above; kept defensive
        return result("Spearman rho undefined", r, (None, None), r_p)
    if n < 4:
        return result(f"n = {n}: a Fisher-z CI needs at least 4 pairs", r, (None, None), r_p, rho, (None, None), rho_p)
    r_ci = _fisher_ci(r, 1.0 / math.sqrt(n - 3))
    rho_ci = _fisher_ci(rho, math.sqrt((1.0 + rho * rho / 2.0) / (n - 3)))
    return result(None, r, r_ci, r_p, rho, rho_ci, rho_p)


# --- 4. grouping ----------------------------------------------------------------------------------------------------
def _subject_groups(data: Any) -> list[tuple[str, str | None]]:
    if isinstance(data, AnnualisedChanges):
        return [(c.subject, c.group) for c in data.changes] + [(e.subject, e.group) for e in data.excluded]
    if isinstance(data, (str, bytes, Mapping)) or not hasattr(data, "__iter__"):
        raise ValueError(f"by_group: data must be AnnualisedChanges or a sequence of Visit or SubjectChange, "
                         f"got {type(data).__name__}")
    out = []
    for i, x in enumerate(data):
        if not isinstance(x, (Visit, SubjectChange, Exclusion)):
            raise ValueError(f"by_group: item {i} must be a Visit, SubjectChange or Exclusion, got {type(x).__name__}")
        out.append((x.subject, x.group))
    return out


def by_group(fn: Callable[..., R], *data: Any, **options: Any) -> dict[str, R]:
    """Apply a statistic to all subjects and to each group.

    Parameters
    ----------
    fn : callable
        :func:`annualised_changes`, :func:`cohort_stats`, :func:`correlation` or any
        function whose leading positional arguments are the data.
    *data : AnnualisedChanges or sequence of Visit or SubjectChange
        The data arguments of ``fn``, in its order (e.g. the MRI and the score visits for
        :func:`correlation`). Each subject's group is the label its items carry in any of
        them (so the score visits need no labels when the MRI visits have them).
    **options
        Passed to ``fn`` unchanged (e.g. ``relative=True``, ``relative_mri=True``).

    Returns
    -------
    dict of str to the result of fn
        ``"all"`` (every subject, with or without a group) first, then each group label
        in sorted order, for the data restricted to that group's subjects.

    Raises
    ------
    ValueError
        No data, a subject with two group labels, a group named ``"all"``, or data of
        another type.
    """
    if not data:
        raise ValueError("by_group needs at least one data argument")
    data = tuple(d if isinstance(d, AnnualisedChanges) else list(d) for d in data)  # iterators are read twice
    group_of: dict[str, str] = {}
    for d in data:
        for subject, group in _subject_groups(d):
            if group is None:
                continue
            if group_of.setdefault(subject, group) != group:
                raise ValueError(f"subject {subject!r} has more than one group: "
                                 f"{sorted({group, group_of[subject]})}")
    groups = sorted(set(group_of.values()))
    if ALL in groups:
        raise ValueError(f"a group may not be named {ALL!r}: that key holds all subjects")
    out = {ALL: fn(*data, **options)}
    for g in groups:
        members = {s for s, gs in group_of.items() if gs == g}
        subset = [d.restrict(members) if isinstance(d, AnnualisedChanges) else [x for x in d if x.subject in members]
                  for d in data]
        out[g] = fn(*subset, **options)
    return out
