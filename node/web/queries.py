"""What the web API and ``musclenode export`` show: the node's studies and measurements,
pseudonymised (subject codes, visit labels, days and months since the subject's baseline;
no patient name, patient ID, birth date, accession number or study date), with the change
of each value since the subject's baseline and previous visit and its annualised rate.

A value is compared only with values of the same region, ROI, side, metric and ROI lineage
(a reader's drawn or carried ROIs; automatic; atlas), as in the SR.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.engine import Connection

from quant.enums import RoiSource

from .. import db
from ..db import JobState, StudyState
from .pseudonym import subject_code, visit_label

DAYS_PER_YEAR = 365.25

#: Columns of the long-format export, in order.
EXPORT_COLUMNS = ("subject", "group", "visit", "days_since_baseline", "months_since_baseline", "state", "region", "roi",
                  "side", "metric", "value", "unit", "model", "source", "algorithm_version",
                  "change_from_baseline", "change_from_previous", "annualised_change")

_STATES = {StudyState.RECEIVING: "received", StudyState.COMPLETE: "received", StudyState.PROCESSING: "processing",
           StudyState.DONE: "done", StudyState.FAILED: "failed", StudyState.WAITING_FOR_ROIS: "waiting for ROIs"}


@dataclass(frozen=True)
class Visit:
    """One study of a subject, as a coordinator may see it."""

    study_uid: str          # internal: never in a coordinator's response
    subject_key: str        # internal
    subject: str
    label: str
    days: int
    state: str


def _date(value: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value)[:8], "%Y%m%d").date()
    except ValueError:
        return None


def visits(conn: Connection, secret: bytes, subject_keys: Iterable[str] | None = None) -> list[Visit]:
    """Every study (of ``subject_keys``, default all) as a visit, ordered by subject and date."""
    q = select(db.studies.c.study_uid, db.studies.c.subject_key, db.studies.c.study_date, db.studies.c.state,
               db.studies.c.time_point)
    if subject_keys is not None:
        q = q.where(db.studies.c.subject_key.in_(list(subject_keys)))
    rows = conn.execute(q).all()
    jobs = select(db.jobs.c.study_uid, db.jobs.c.state).order_by(db.jobs.c.id)
    if subject_keys is not None:
        jobs = jobs.where(db.jobs.c.study_uid.in_([r.study_uid for r in rows]))
    last = {r.study_uid: r.state for r in conn.execute(jobs)}   # each study's latest job
    skipped = {uid for uid, state in last.items() if state == JobState.SKIPPED}
    first: dict[str, dt.date] = {}
    for r in rows:
        d = _date(r.study_date)
        if d is not None and (r.subject_key not in first or d < first[r.subject_key]):
            first[r.subject_key] = d
    out = []
    for r in rows:
        d, base = _date(r.study_date), first.get(r.subject_key)
        days = (d - base).days if d is not None and base is not None else 0
        state = _STATES.get(StudyState(r.state), str(r.state))
        if state == "done" and r.study_uid in skipped:
            state = "skipped"
        out.append(Visit(r.study_uid, r.subject_key, subject_code(r.subject_key, secret),
                         visit_label(r.time_point or "", days), days, state))
    return sorted(out, key=lambda v: (v.subject, v.days, v.study_uid))


def subject_keys_by_code(conn: Connection, secret: bytes) -> dict[str, str]:
    """Subject code -> subject key of every subject the node holds."""
    keys = conn.execute(select(db.studies.c.subject_key).distinct()).scalars().all()
    return {subject_code(k, secret): k for k in keys}


_LINEAGE = {s.value: s.lineage for s in RoiSource}


def _lineage(roi: str, source: str) -> str:
    return _LINEAGE.get(source, source) if roi and source else ""


def measurement_table(conn: Connection, secret: bytes, *, subject_keys: Iterable[str] | None = None,
                      metric: str | None = None, region: str | None = None, roi: str | None = None,
                      side: str | None = None, since: str | None = None) -> list[tuple]:
    """The long-format rows as tuples in :data:`EXPORT_COLUMNS` order: one per subject, visit
    and measurement, with the change since the subject's baseline and previous visit (same
    region, ROI, side, metric, lineage and algorithm version) and the annualised change since baseline (per
    year of 365.25 days). ``roi=""`` selects the whole-leg values; None, every row.
    ``since`` (YYYYMMDD): only visits on or after that date (changes are still computed
    from the subject's baseline).
    """
    vs = {v.study_uid: v for v in visits(conn, secret, subject_keys)}
    groups = groups_by_key(conn)
    shown = set(vs)
    if since:
        shown = set(conn.execute(select(db.studies.c.study_uid).where(db.studies.c.study_date >= since)).scalars())
    c = db.measurements.c
    q = select(c.study_uid, c.region, c.roi, c.side, c.metric, c.value, c.unit, c.model, c.source,
               c.algorithm_version)
    if subject_keys is not None:
        q = q.where(c.subject_key.in_(list(subject_keys)))
    for column, value in (("metric", metric), ("region", region), ("roi", roi), ("side", side)):
        if value is not None:
            q = q.where(getattr(c, column) == value)
    series: dict[tuple, list] = defaultdict(list)
    for study_uid, reg, r_roi, r_side, r_metric, value, unit, model, source, version in conn.execute(q):
        v = vs.get(study_uid)
        if v is None:
            continue
        # the algorithm version is part of the key: changes never mix versions (a trial half reprocessed)
        series[(v.subject_key, reg, r_roi, r_side, r_metric, _lineage(r_roi, source), version)].append(
            (v.days, study_uid, v, reg, r_roi, r_side, r_metric, value, unit, model, source, version))
    rows = []
    month = DAYS_PER_YEAR / 12
    for items in series.values():
        items.sort(key=lambda t: (t[0], t[1]))
        base_days, base_value = items[0][0], items[0][7]
        prev = None
        for k, (days, study_uid, v, reg, r_roi, r_side, r_metric, value, unit, model, source, version) \
                in enumerate(items):
            change = None if k == 0 else value - base_value
            years = (days - base_days) / DAYS_PER_YEAR
            if study_uid in shown:
                rows.append((v.subject, groups.get(v.subject_key), v.label, days, round(days / month, 1), v.state,
                             reg, r_roi or None, r_side, r_metric, value, unit, model,
                             (source or "automatic") if r_roi else "automatic", version, change,
                             None if prev is None else value - prev,
                             change / years if change is not None and years > 0 else None))
            prev = value
    rows.sort(key=lambda t: (t[0], t[3], t[6], t[7] or "", t[8], t[9]))
    return rows


def measurement_rows(conn: Connection, secret: bytes, **filters) -> Iterator[dict]:
    """The rows of :func:`measurement_table` as dicts keyed by :data:`EXPORT_COLUMNS`."""
    return (dict(zip(EXPORT_COLUMNS, t, strict=True)) for t in measurement_table(conn, secret, **filters))


def regions_by_subject(conn: Connection, secret: bytes) -> dict[str, list[str]]:
    """Subject code -> the regions measured (sorted)."""
    rows = conn.execute(select(db.measurements.c.subject_key, db.measurements.c.region).distinct()).all()
    out: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        out[subject_code(r.subject_key, secret)].add(r.region)
    return {k: sorted(v) for k, v in out.items()}


def groups_by_key(conn: Connection) -> dict[str, str]:
    """Subject key -> group name (trial arm, fast or slow progressor)."""
    return {r.subject_key: r.name for r in conn.execute(select(db.subject_groups))}
