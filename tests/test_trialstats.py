"""reports.trialstats: annualised change, SRM, sample size and correlation on a hand-made
table of 5 subjects with visits at 0, 182 and 365 days, checked against arithmetic written
out here, statsmodels (sample size) and scipy.stats (correlations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestIndPower

from reports.trialstats import (
    ALL,
    AnnualisedChanges,
    SubjectChange,
    Visit,
    annualised_changes,
    by_group,
    cohort_stats,
    correlation,
    sample_size_per_arm,
)

DAYS = (0, 182, 365)
Z = 1.959963984540054  # the 97.5 % quantile of the standard normal
# fRMA (cm²) of the anterior thigh at 0, 182 and 365 days
FRMA = {"S1": (50, 48, 45), "S2": (60, 59, 57), "S3": (40, 37, 33), "S4": (55, 55, 52), "S5": (45, 44, 44)}
GROUP = {"S1": "fast", "S3": "fast", "S2": "slow", "S4": "slow", "S5": "slow"}
# knee extension (N) and ALSFRS-R total at 0 and 365 days
KNEE = {"S1": (200, 170), "S2": (180, 171), "S3": (150, 105), "S4": (210, 200), "S5": (190, 192)}
ALSFRS = {"S1": (40, 34), "S2": (42, 40), "S3": (38, 28), "S4": (44, 41), "S5": (45, 45)}


def frma_visits(groups: bool = True) -> list[Visit]:
    return [Visit(s, d, y, GROUP[s] if groups else None, f"M{m}")
            for s, ys in FRMA.items() for d, y, m in zip(DAYS, ys, (0, 6, 12), strict=True)]


def score_visits(table: dict[str, tuple[int, int]], labels: bool = True) -> list[Visit]:
    return [Visit(s, d, y, None, f"M{m}" if labels else None)
            for s, ys in table.items() for d, y, m in zip((0, 365), ys, (0, 12), strict=True)]


def hand_slope(y0: float, y1: float, y2: float) -> float:
    """Least-squares slope per year through (0, y0), (182, y1), (365, y2) days, written out.

    Mean day 547/3; deviations -547/3, -1/3, 548/3; Sxx = (547² + 1² + 548²)/9 = 599514/9;
    Sxy = (-547 y0 - y1 + 548 y2)/3; slope per day = Sxy/Sxx = 3 (-547 y0 - y1 + 548 y2)/599514.
    """
    return 3 * (-547 * y0 - y1 + 548 * y2) / 599514 * 365.25


# --- annualised change ----------------------------------------------------------------------------------------------
def test_annualised_changes_by_hand():
    extra = [Visit("S6", 0, 50.0),                           # one visit
             Visit("S7", 0, 50.0), Visit("S7", 20, 49.0),    # 20 days of follow-up
             Visit("S8", 0, 40.0), Visit("S8", 200, 36.0)]   # two visits
    res = annualised_changes(frma_visits() + extra[::-1])    # order does not matter
    assert [c.subject for c in res.changes] == ["S1", "S2", "S3", "S4", "S5", "S8"]
    assert res.n == 6 and res.n_excluded == 2
    assert [(e.subject, e.reason) for e in res.excluded] == [("S6", "one visit: no change"),
                                                             ("S7", "follow-up of 20 days, less than 30")]
    by = {c.subject: c for c in res.changes}
    # S1: -547*50 - 48 + 548*45 = -27350 - 48 + 24660 = -2738 -> 3*-2738/599514*365.25
    assert by["S1"].change_per_year == pytest.approx(-5.004326004063, rel=1e-12)
    assert by["S1"].relative_change_per_year == pytest.approx(-5.004326004063 / 50 * 100, rel=1e-12)
    for s, ys in FRMA.items():
        assert by[s].change_per_year == pytest.approx(hand_slope(*ys), rel=1e-12)
        assert by[s].relative_change_per_year == pytest.approx(hand_slope(*ys) / ys[0] * 100, rel=1e-12)
        assert by[s].method == "least squares" and by[s].n_visits == 3 and by[s].follow_up_days == 365
        assert by[s].group == GROUP[s] and by[s].baseline == ys[0]
    # S8: (36 - 40) / (200/365.25) = -4 * 1.82625 = -7.305 per year; -7.305/40*100 = -18.2625 %/year
    assert by["S8"].method == "two visits"
    assert by["S8"].change_per_year == pytest.approx(-7.305, rel=1e-12)
    assert by["S8"].relative_change_per_year == pytest.approx(-18.2625, rel=1e-12)


def test_annualised_change_least_squares_equals_polyfit_and_origin_free():
    vs = [Visit("A", 10, 3.0), Visit("A", 100, 2.0), Visit("A", 250, 2.5), Visit("A", 500, 1.0)]
    c, = annualised_changes(vs).changes
    assert c.change_per_year == pytest.approx(np.polyfit([10 / 365.25, 100 / 365.25, 250 / 365.25, 500 / 365.25],
                                                         [3.0, 2.0, 2.5, 1.0], 1)[0], rel=1e-12)
    assert c.baseline == 3.0 and c.follow_up_days == 490


def test_annualised_change_baseline_zero_has_no_relative_change():
    c, = annualised_changes([Visit("A", 0, 0.0), Visit("A", 365.25, 2.0)]).changes
    assert c.change_per_year == 2.0 and c.relative_change_per_year is None


@pytest.mark.parametrize("bad", [
    [Visit("A", 0, 1.0), Visit("A", 0, 2.0)],                                  # same day twice
    [Visit("A", 0, 1.0, "x"), Visit("A", 100, 2.0, "y")],                      # two groups
    [Visit("A", 0, 1.0, None, "M0"), Visit("A", 100, 2.0, None, "M0")],        # one label twice
    [(0, 1.0)],                                                                # not a Visit
])
def test_annualised_changes_rejects(bad):
    with pytest.raises(ValueError):
        annualised_changes(bad)


@pytest.mark.parametrize("kw", [dict(days=float("nan")), dict(value=float("inf")), dict(subject=""),
                                dict(value=True), dict(group="")])
def test_visit_validates(kw):
    with pytest.raises(ValueError):
        Visit(**{"subject": "A", "days": 0, "value": 1.0, **kw})


# --- cohort statistics ----------------------------------------------------------------------------------------------
def test_cohort_stats_by_hand():
    res = cohort_stats(annualised_changes(frma_visits() + [Visit("S6", 0, 50.0)]))
    x = [hand_slope(*ys) for ys in FRMA.values()]  # -5.00433, -3.00296, -7.00569, -3.00479, -0.99977
    mean = sum(x) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / 4)
    srm = mean / sd
    se = math.sqrt(1 / 5 + srm ** 2 / (2 * 5))
    assert res.n == 5 and res.n_left_out == 1 and res.reason is None and not res.relative
    assert res.mean == pytest.approx(mean, rel=1e-12) == pytest.approx(-3.8035070907, rel=1e-9)
    assert res.sd == pytest.approx(sd, rel=1e-12) == pytest.approx(2.2823081121, rel=1e-9)
    assert res.srm == pytest.approx(srm, rel=1e-12) == pytest.approx(-1.6665177986, rel=1e-9)
    assert res.srm_se == pytest.approx(se, rel=1e-12) == pytest.approx(0.6911788172, rel=1e-9)
    assert res.srm_ci_low == pytest.approx(srm - Z * se, rel=1e-12) == pytest.approx(-3.0212033872, rel=1e-9)
    assert res.srm_ci_high == pytest.approx(srm + Z * se, rel=1e-12) == pytest.approx(-0.3118322101, rel=1e-9)
    # effect sizes: 0.25*|mean|/sd and 0.5*|mean|/sd
    s25, s50 = res.sample_sizes
    assert (s25.slowing, s50.slowing) == (0.25, 0.5)
    assert s25.effect == pytest.approx(0.25 * abs(mean)) and s25.effect_size == pytest.approx(0.25 * abs(srm))
    assert s50.effect == pytest.approx(0.5 * abs(mean)) and s50.effect_size == pytest.approx(0.5 * abs(srm))
    assert (s25.n_per_arm, s50.n_per_arm) == (92, 24)
    for s in (s25, s50):
        solved = TTestIndPower().solve_power(effect_size=s.effect_size, alpha=0.05, power=0.8, ratio=1.0,
                                             alternative="two-sided")
        assert s.n_per_arm == math.ceil(solved)
        assert s.power == pytest.approx(TTestIndPower().power(effect_size=s.effect_size, nobs1=s.n_per_arm,
                                                              alpha=0.05, ratio=1.0), rel=1e-9)
        assert s.power >= 0.8


def test_cohort_stats_relative_by_hand():
    res = cohort_stats(annualised_changes(frma_visits()), relative=True)
    x = [hand_slope(*ys) / ys[0] * 100 for ys in FRMA.values()]  # -10.009, -5.005, -17.514, -5.463, -2.222 %/year
    mean = sum(x) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / 4)
    assert res.relative and res.mean == pytest.approx(mean, rel=1e-12) == pytest.approx(-8.0425549657, rel=1e-9)
    assert res.sd == pytest.approx(sd, rel=1e-12)
    assert res.srm == pytest.approx(mean / sd, rel=1e-12)
    assert [s.n_per_arm for s in res.sample_sizes] == [141, 36]


@pytest.mark.parametrize("d", [0.2, 0.3337, 0.5, 0.8, 1.0, 1.7, 2.5])
def test_sample_size_matches_statsmodels(d):
    n, achieved = sample_size_per_arm(d)
    solved = TTestIndPower().solve_power(effect_size=d, alpha=0.05, power=0.8, ratio=1.0, alternative="two-sided")
    assert n == math.ceil(solved)
    assert achieved >= 0.8 > TTestIndPower().power(effect_size=d, nobs1=n - 1, alpha=0.05, ratio=1.0)


def test_sample_size_textbook_values():
    # Cohen (1988), Table 2.4.1: d = 0.2, 0.5, 0.8 at two-sided alpha 0.05 and power 0.8 need 393, 64, 26 per group;
    # the exact noncentral-t solution for d = 0.2 is 393.4 -> 394
    assert [sample_size_per_arm(d)[0] for d in (0.2, 0.5, 0.8)] == [394, 64, 26]
    assert sample_size_per_arm(0.5, alpha=0.01, power=0.9)[0] == math.ceil(
        TTestIndPower().solve_power(effect_size=0.5, alpha=0.01, power=0.9))
    assert sample_size_per_arm(10.0) == (2, pytest.approx(sample_size_per_arm(10.0)[1]))
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError):
            sample_size_per_arm(bad)
    with pytest.raises(ValueError):
        sample_size_per_arm(0.5, power=1.0)


def _changes(values: list[float], baselines: list[float] | None = None) -> list[SubjectChange]:
    baselines = baselines or [10.0] * len(values)
    return [SubjectChange(f"S{i}", None, 2, 365.0, b, v, None if b == 0 else v / abs(b) * 100, "two visits")
            for i, (v, b) in enumerate(zip(values, baselines, strict=True))]


def test_cohort_stats_too_few():
    none = cohort_stats([])
    assert none.n == 0 and none.mean is None and none.sd is None and none.srm is None
    assert none.reason == "no subject with an annualised change"
    one = cohort_stats(_changes([-2.0]))
    assert one.n == 1 and one.mean == -2.0 and one.sd is None and one.srm is None and "n = 1" in one.reason
    two = cohort_stats(_changes([-2.0, -4.0]))
    # mean -3, SD sqrt(((-2+3)² + (-4+3)²)/1) = sqrt(2)
    assert two.mean == -3.0 and two.sd == pytest.approx(math.sqrt(2)) and two.srm is None
    assert two.srm_ci_low is None and two.sample_sizes == ()
    assert two.reason == "n = 2: an SRM and sample sizes need at least 3 subjects"


def test_cohort_stats_sd_zero():
    # equal slopes from different baselines: the SD is rounding noise at most and is reported as 0
    vs = [Visit(s, d, b - 0.1 * d / 365.25 * 7.3) for s, b in (("A", 40.1), ("B", 55.3), ("C", 61.7))
          for d in DAYS]
    res = cohort_stats(annualised_changes(vs))
    assert res.n == 3 and res.mean == pytest.approx(-0.73) and res.sd == 0.0
    assert res.srm is None and res.srm_ci_low is None and res.sample_sizes == ()
    assert res.reason == "SD is 0 (all changes equal): SRM and sample sizes undefined"


def test_cohort_stats_mean_zero_and_baseline_zero():
    res = cohort_stats(_changes([-1.0, 1.0, 0.0]))
    # mean 0, SD sqrt((1 + 1 + 0)/2) = 1, SRM 0, SE sqrt(1/3 + 0) -> CI -/+ 1.96*0.57735
    assert res.mean == 0.0 and res.sd == 1.0 and res.srm == 0.0
    assert res.srm_ci_high == pytest.approx(Z * math.sqrt(1 / 3)) == pytest.approx(1.1315857)
    assert all(s.n_per_arm is None and s.reason == "mean change is 0: no slowing to detect" for s in res.sample_sizes)
    rel = cohort_stats(_changes([-1.0, -2.0, -4.0, -3.0], baselines=[10.0, 0.0, 20.0, 30.0]), relative=True)
    # relative: -10, -20, -10 %/year (the subject with baseline 0 is left out)
    assert rel.n == 3 and rel.n_left_out == 1 and rel.mean == pytest.approx(-40 / 3)
    with pytest.raises(ValueError):
        cohort_stats(_changes([1.0, 2.0, 3.0]), slowings=(1.5,))
    with pytest.raises(ValueError):
        cohort_stats([1.0, 2.0, 3.0])  # type: ignore[list-item]


# --- correlation ----------------------------------------------------------------------------------------------------
def _hand_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_correlation_relative_thigh_vs_relative_knee_extension():
    res = correlation(frma_visits(), score_visits(KNEE), relative_mri=True, relative_score=True)
    # fRMA M0 -> M12 in %: (45-50)/50 = -10, (57-60)/60 = -5, (33-40)/40 = -17.5, (52-55)/55 = -5.4545,
    # (44-45)/45 = -2.2222
    x = [-10.0, -5.0, -17.5, -3 / 55 * 100, -1 / 45 * 100]
    # knee extension in %: -30/200 = -15, -9/180 = -5, -45/150 = -30, -10/210 = -4.7619, +2/190 = +1.0526
    y = [-15.0, -5.0, -30.0, -10 / 210 * 100, 2 / 190 * 100]
    assert res.n == 5 and res.reason is None and res.left_out == ()
    assert [p.mri_change for p in res.pairs] == pytest.approx(x, rel=1e-12)
    assert [p.score_change for p in res.pairs] == pytest.approx(y, rel=1e-12)
    assert all(p.visit == "M12" and p.mri_days == 365 and p.score_days == 365 for p in res.pairs)
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    assert res.pearson_r == pytest.approx(_hand_pearson(x, y), rel=1e-12) == pytest.approx(pr.statistic, rel=1e-12)
    assert res.pearson_r == pytest.approx(0.99934, abs=1e-5)
    assert res.pearson_p == pytest.approx(pr.pvalue, rel=1e-9)
    # Fisher z: tanh(atanh(r) -/+ 1.96/sqrt(5-3)); the same as scipy's own interval
    z = math.atanh(res.pearson_r)
    assert res.pearson_ci_low == pytest.approx(math.tanh(z - Z / math.sqrt(2)), rel=1e-12)
    assert res.pearson_ci_high == pytest.approx(math.tanh(z + Z / math.sqrt(2)), rel=1e-12)
    ci = pr.confidence_interval(0.95)
    assert (res.pearson_ci_low, res.pearson_ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    # ranks: x -> 2, 4, 1, 3, 5; y -> 2, 3, 1, 4, 5; sum d² = 0+1+0+1+0 = 2; rho = 1 - 6*2/(5*24) = 0.9
    assert res.spearman_rho == pytest.approx(0.9, rel=1e-12) == pytest.approx(sr.statistic, rel=1e-12)
    assert res.spearman_p == pytest.approx(sr.pvalue, rel=1e-9)
    # Bonett-Wright SE sqrt((1 + 0.9²/2)/(5-3)) = sqrt(1.405/2)
    se = math.sqrt((1 + 0.81 / 2) / 2)
    assert res.spearman_ci_low == pytest.approx(math.tanh(math.atanh(0.9) - Z * se), rel=1e-12)
    assert res.spearman_ci_high == pytest.approx(math.tanh(math.atanh(0.9) + Z * se), rel=1e-12)
    assert res.spearman_ci_low == pytest.approx(-0.16890, abs=1e-5)
    # the relative *decreases* (both negated) correlate alike
    neg = correlation([Visit(v.subject, v.days, -v.value, None, v.visit) for v in frma_visits()],
                      [Visit(v.subject, v.days, -v.value, None, v.visit) for v in score_visits(KNEE)], True, True)
    assert neg.pearson_r == pytest.approx(res.pearson_r, rel=1e-12)


def test_correlation_relative_calf_vs_absolute_alsfrs():
    res = correlation(frma_visits(), score_visits(ALSFRS, labels=False), relative_mri=True, relative_score=False)
    x = [-10.0, -5.0, -17.5, -3 / 55 * 100, -1 / 45 * 100]
    y = [-6.0, -2.0, -10.0, -3.0, 0.0]  # ALSFRS-R M12 - M0
    assert [p.score_change for p in res.pairs] == y and all(p.visit is None for p in res.pairs)
    pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
    assert res.pearson_r == pytest.approx(pr.statistic, rel=1e-12) == pytest.approx(0.99296, abs=1e-5)
    assert res.pearson_p == pytest.approx(pr.pvalue, rel=1e-9)
    assert res.spearman_rho == pytest.approx(sr.statistic, rel=1e-12) == 1.0
    assert res.spearman_p == pytest.approx(sr.pvalue, abs=1e-12)
    assert (res.spearman_ci_low, res.spearman_ci_high) == pytest.approx((1.0, 1.0), abs=1e-12)  # perfect ranks
    absolute = correlation(frma_visits(), score_visits(ALSFRS), relative_mri=False, relative_score=False)
    assert [p.mri_change for p in absolute.pairs] == [-5.0, -3.0, -7.0, -3.0, -1.0]
    assert absolute.pearson_r == pytest.approx(stats.pearsonr([-5, -3, -7, -3, -1], y).statistic, rel=1e-12)


def test_correlation_pairs_the_latest_common_visit_and_per_visit():
    mri = frma_visits()
    score = score_visits(KNEE) + [Visit(s, 180, v, None, "M6") for s, v in
                                  (("S1", 190), ("S2", 175), ("S3", 130), ("S4", 205), ("S5", 191))]
    # S5 has no M12 strength: its pair is at M6, for both series
    score = [v for v in score if not (v.subject == "S5" and v.visit == "M12")]
    res = correlation(mri, score, True, True)
    by = {p.subject: p for p in res.pairs}
    assert by["S5"].visit == "M6" and by["S5"].mri_days == 182 and by["S5"].score_days == 180
    assert by["S5"].mri_change == pytest.approx(-1 / 45 * 100) and by["S5"].score_change == pytest.approx(1 / 190 * 100)
    assert by["S1"].visit == "M12"
    per = correlation(mri, score, True, True, per_visit=True)
    assert per.n == 9 and [p.visit for p in per.pairs if p.subject == "S1"] == ["M6", "M12"]
    x, y = [p.mri_change for p in per.pairs], [p.score_change for p in per.pairs]
    assert per.pearson_r == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)
    with pytest.raises(ValueError, match="per_visit"):
        correlation(mri, score_visits(KNEE, labels=False), True, True, per_visit=True)


def test_correlation_left_out_and_too_few():
    mri = frma_visits() + [Visit("S9", 0, 0.0), Visit("S9", 365, 1.0)]   # no score, and baseline 0
    score = score_visits(KNEE, labels=False) + [Visit("S10", 0, 100.0), Visit("S10", 365, 90.0)]
    res = correlation(mri, score, True, True)
    assert res.n == 5
    assert [(e.subject, e.reason) for e in res.left_out] == [("S10", "no MRI visits"), ("S9", "no score visits")]
    both = correlation(mri, score + [Visit("S9", 0, 1.0), Visit("S9", 365, 1.0)], True, True)
    assert ("S9", "MRI baseline is 0: no relative change") in [(e.subject, e.reason) for e in both.left_out]
    one_visit = correlation(mri + [Visit("S11", 0, 3.0)], score + [Visit("S11", 0, 3.0), Visit("S11", 99, 2.0)],
                            False, False)
    assert ("S11", "no MRI follow-up visit") in [(e.subject, e.reason) for e in one_visit.left_out]

    keep = {"S1", "S2"}
    two = correlation([v for v in mri if v.subject in keep], [v for v in score if v.subject in keep], True, True)
    assert two.n == 2 and two.pearson_r is None and two.spearman_rho is None and two.pearson_p is None
    assert two.reason == "n = 2 pairs: a correlation needs at least 3"
    keep = {"S1", "S2", "S3"}
    three = correlation([v for v in mri if v.subject in keep], [v for v in score if v.subject in keep], True, True)
    x, y = [-10.0, -5.0, -17.5], [-15.0, -5.0, -30.0]
    assert three.n == 3 and three.pearson_r == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)
    assert three.pearson_ci_low is None and three.spearman_ci_high is None and three.spearman_rho == 1.0
    assert three.reason == "n = 3: a Fisher-z CI needs at least 4 pairs"
    flat = correlation(frma_visits(), score_visits({s: (40, 40) for s in FRMA}), True, False)
    assert flat.n == 5 and flat.pearson_r is None
    assert flat.reason == "all score changes are equal: correlation undefined"


# --- grouping -------------------------------------------------------------------------------------------------------
def test_by_group():
    changes = annualised_changes(frma_visits() + [Visit("S6", 0, 50.0, "slow")])
    per = by_group(annualised_changes, frma_visits() + [Visit("S6", 0, 50.0, "slow")])
    assert list(per) == [ALL, "fast", "slow"]
    assert per[ALL] == changes
    assert [c.subject for c in per["fast"].changes] == ["S1", "S3"] and per["fast"].excluded == ()
    assert [c.subject for c in per["slow"].changes] == ["S2", "S4", "S5"] and per["slow"].n_excluded == 1

    srm = by_group(cohort_stats, changes, relative=True)
    assert srm[ALL] == cohort_stats(changes, relative=True)
    assert srm["fast"].n == 2 and srm["fast"].srm is None and "n = 2" in srm["fast"].reason
    assert srm["fast"].mean == pytest.approx((hand_slope(*FRMA["S1"]) / 50 + hand_slope(*FRMA["S3"]) / 40) * 50)
    slow = [hand_slope(*FRMA[s]) / FRMA[s][0] * 100 for s in ("S2", "S4", "S5")]
    assert srm["slow"].n == 3 and srm["slow"].n_left_out == 1 and srm["slow"].mean == pytest.approx(sum(slow) / 3)
    # the same through a plain list of SubjectChange
    assert by_group(cohort_stats, list(changes.changes))["slow"].srm == pytest.approx(
        cohort_stats([c for c in changes.changes if c.group == "slow"]).srm)

    # the score visits carry no group: the MRI visits' labels decide
    corr = by_group(correlation, frma_visits(), score_visits(KNEE), relative_mri=True, relative_score=True)
    assert corr[ALL].n == 5 and corr["fast"].n == 2 and corr["slow"].n == 3
    assert corr["slow"].pearson_r == pytest.approx(stats.pearsonr(
        [-5.0, -3 / 55 * 100, -1 / 45 * 100], [-5.0, -10 / 210 * 100, 2 / 190 * 100]).statistic, rel=1e-12)
    assert corr["fast"].pearson_r is None


def test_by_group_rejects():
    with pytest.raises(ValueError, match="named 'all'"):
        by_group(annualised_changes, [Visit("A", 0, 1.0, "all")])
    with pytest.raises(ValueError, match="more than one group"):
        by_group(correlation, [Visit("A", 0, 1.0, "x")], [Visit("A", 0, 1.0, "y")], relative_mri=True,
                 relative_score=True)
    with pytest.raises(ValueError):
        by_group(cohort_stats)
    with pytest.raises(ValueError):
        by_group(cohort_stats, {"A": 1.0})
    assert isinstance(by_group(annualised_changes, iter(frma_visits()))["fast"], AnnualisedChanges)
