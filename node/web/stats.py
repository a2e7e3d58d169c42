"""``GET /api/v1/stats``: the node's measurements (and uploaded scores) as inputs of
:mod:`reports.trialstats`, and its results as plain JSON.

One metric of one region, ROI and side: each subject's visits (days since the subject's
baseline) give its annualised change; the cohort (or each group) gives n, mean and SD, the
SRM with its 95 % CI and the patients per arm for a 25 % and a 50 % slowing. With
``score``, the correlation of the MRI change with the score's change. An ROI's values are
taken from one lineage per subject (a reader's drawn or carried ROIs where the subject has
them, else the automatic ones), never mixed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from reports import trialstats as ts

from .. import db
from .queries import _LINEAGE, EXPORT_COLUMNS, groups_by_key, measurement_table, visits

_PREFERENCE = {"reader": 0, "automatic": 1, "atlas": 2}


_COL = {name: i for i, name in enumerate(EXPORT_COLUMNS)}


def mri_visits(table: list[tuple], roi: str) -> list[ts.Visit]:
    """The subjects' values in ``table`` (:func:`measurement_table` of one metric, region, ROI
    and side) as :class:`reports.trialstats.Visit` records, one ROI lineage per subject.
    """
    subject, group, visit, days, value, source = (_COL[k] for k in ("subject", "group", "visit",
                                                                      "days_since_baseline", "value", "source"))
    by_subject: dict[tuple[str, str], list[tuple]] = defaultdict(list)
    for t in table:
        lineage = _LINEAGE.get(t[source], t[source]) if roi else ""
        by_subject[(t[subject], lineage)].append(t)
    chosen: dict[str, list[tuple]] = {}
    # per subject one lineage: the preferred among those with two visits or more, else the preferred
    order = sorted(by_subject.items(), key=lambda kv: (len(kv[1]) < 2, _PREFERENCE.get(kv[0][1], 9)))
    for (code, _), rows in order:
        chosen.setdefault(code, rows)
    return [ts.Visit(subject=t[subject], days=float(t[days]), value=float(t[value]), group=t[group], visit=t[visit])
            for rows in chosen.values() for t in rows]


def score_visits(conn: Connection, secret: bytes, score: str) -> list[ts.Visit]:
    """The subjects' values of one uploaded clinical score, at the days of their visits."""
    days = {v.study_uid: v for v in visits(conn, secret)}
    groups = groups_by_key(conn)
    out = []
    for r in conn.execute(select(db.scores).where(db.scores.c.name == score)):
        v = days.get(r.study_uid)
        if v is not None:
            out.append(ts.Visit(subject=v.subject, days=float(v.days), value=float(r.value),
                                group=groups.get(v.subject_key), visit=v.label))
    return out


def _plain(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:   # NaN is not JSON
        return None
    return obj


def cohort(stats: ts.CohortStats) -> dict:
    """A :class:`reports.trialstats.CohortStats` as the API shows it."""
    sizes: dict[str, int | None] = {f"n_per_arm_{round(x * 100)}": None for x in ts.SLOWINGS}
    sizes.update({f"n_per_arm_{round(s.slowing * 100)}": s.n_per_arm for s in stats.sample_sizes})
    return {"n": stats.n, "n_left_out": stats.n_left_out, "mean": stats.mean, "sd": stats.sd, "srm": stats.srm,
            "srm_ci": [stats.srm_ci_low, stats.srm_ci_high], **sizes,
            "sample_sizes": _plain(stats.sample_sizes), "reason": stats.reason}


def stats_response(conn: Connection, secret: bytes, *, metric: str, region: str, roi: str, side: str,
                   relative: bool, group: str | None, score: str | None, relative_score: bool) -> dict:
    """The answer of ``GET /api/v1/stats`` (module docstring)."""
    table = measurement_table(conn, secret, metric=metric, region=region, roi=roi, side=side)
    mri = mri_visits(table, roi)
    unit = table[0][_COL["unit"]] if table else ""
    changes = ts.annualised_changes(mri)
    per_group = ts.by_group(ts.cohort_stats, changes, relative=relative)
    if group is not None:
        per_group = {k: v for k, v in per_group.items() if k in (ts.ALL, group)}
    out: dict[str, Any] = {
        "metric": metric, "region": region, "roi": roi or None, "side": side, "relative": relative,
        "unit_per_year": "%/year" if relative else f"{unit}/year",
        "excluded": _plain(changes.excluded),
        "subjects": [{"subject": c.subject, "group": c.group, "change_per_year": c.change_per_year,
                      "relative_change_per_year": c.relative_change_per_year, "n_visits": c.n_visits}
                     for c in changes.changes if group is None or c.group == group],
        "groups": {k: cohort(v) for k, v in per_group.items()},
    }
    selected = per_group.get(group, per_group.get(ts.ALL)) if group else per_group.get(ts.ALL)
    if selected is not None:
        out.update(cohort(selected))
    if score:
        scores = score_visits(conn, secret, score)
        pairs_mri = [v for v in mri if group is None or v.group == group]
        corr = ts.correlation(pairs_mri, scores, relative_mri=relative, relative_score=relative_score)
        out["score"] = score
        out["correlation"] = {k: v for k, v in _plain(corr).items() if k not in ("pairs",)}
        out["correlation"]["pairs"] = [{"subject": p.subject, "mri_change": p.mri_change,
                                        "score_change": p.score_change, "group": p.group} for p in corr.pairs]
    return _plain(out)
