"""Clinical scores uploaded by a coordinator (``POST /api/v1/scores``, CSV), matched to the
subject's visits, and the subjects' groups.

Columns: ``subject`` (the code the API shows), ``visit`` (its label: ``baseline``,
``month 6``, a Clinical Trial Time Point ID) or ``date`` (YYYY-MM-DD; the visit within
:data:`DATE_TOLERANCE_DAYS` of it), optionally ``group``, then any of :data:`SCORES`, each
written ``name`` or ``name[unit]``; a value left empty is skipped. A row whose subject or
visit is not found, or whose value is not a number, is reported back with the reason;
nothing is dropped silently. A score uploaded again for the same visit replaces the old.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from dataclasses import dataclass, field

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from .. import db
from .queries import subject_keys_by_code, visits

#: Known scores and their default units.
SCORES = {
    "alsfrs_r": "points", "alsfrs_r_bulbar": "points", "alsfrs_r_fine_motor": "points",
    "alsfrs_r_gross_motor": "points", "alsfrs_r_respiratory": "points",
    "knee_extension": "N", "plantar_flexion": "N", "grip": "kg", "mrc_sum": "points",
}
DATE_TOLERANCE_DAYS = 14
_HEADER = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:\[\s*([^\]]*)\s*\])?\s*$")


@dataclass
class UploadReport:
    """What an upload did: scores stored, groups set, and each row not used with the reason."""

    stored: int = 0
    groups: int = 0
    rejected: list[dict] = field(default_factory=list)


def upload_scores(conn: Connection, secret: bytes, text: str) -> UploadReport:
    """Store the scores of a CSV upload (module docstring); returns the report.

    Raises
    ------
    ValueError
        Not CSV, no header, no ``subject`` column, neither ``visit`` nor ``date``, or an unknown column.
    """
    # newline="": the csv module reads the line ends itself (CR, LF or CRLF, and inside quotes)
    try:
        rows = list(csv.reader(io.StringIO(text.lstrip("\ufeff"), newline="")))
    except csv.Error as exc:   # e.g. a line end inside an unquoted field
        raise ValueError(f"the upload is not CSV: {exc}") from None
    header = rows[0] if rows else None
    if not header:
        raise ValueError("the upload is empty: a CSV with a header row is needed")
    columns: list[tuple[str, str]] = []
    for h in header:
        m = _HEADER.match(h)
        if not m:
            raise ValueError(f"column {h!r}: expected a name or name[unit]")
        columns.append((m.group(1).lower(), (m.group(2) or "").strip()))
    names = [c for c, _ in columns]
    if "subject" not in names or not ({"visit", "date"} & set(names)):
        raise ValueError("the upload needs a 'subject' column and a 'visit' or 'date' column")
    unknown = [c for c in names if c not in SCORES and c not in ("subject", "visit", "date", "group")]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; scores known: {', '.join(SCORES)}")
    keys = subject_keys_by_code(conn, secret)
    by_subject: dict[str, list] = {}
    for v in visits(conn, secret):
        by_subject.setdefault(v.subject_key, []).append(v)
    dates = {r.study_uid: r.study_date for r in conn.execute(select(db.studies.c.study_uid, db.studies.c.study_date))}
    report = UploadReport()
    now = time.time()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(names)}
        key = keys.get(cells["subject"])
        if key is None:
            report.rejected.append({"line": line, "subject": cells["subject"], "reason": "unknown subject"})
            continue
        if cells.get("group"):
            conn.execute(delete(db.subject_groups).where(db.subject_groups.c.subject_key == key))
            conn.execute(insert(db.subject_groups).values(subject_key=key, name=cells["group"][:64]))
            report.groups += 1
        visit, reason = _match(by_subject.get(key, []), dates, cells.get("visit", ""), cells.get("date", ""))
        if visit is None:
            report.rejected.append({"line": line, "subject": cells["subject"], "reason": reason})
            continue
        for (name, unit) in columns:
            if name not in SCORES or not cells[name]:
                continue
            try:
                value = float(cells[name])
            except ValueError:
                report.rejected.append({"line": line, "subject": cells["subject"],
                                        "reason": f"{name}: not a number ({cells[name]!r})"})
                continue
            conn.execute(delete(db.scores).where((db.scores.c.study_uid == visit.study_uid)
                                                 & (db.scores.c.name == name)))
            conn.execute(insert(db.scores).values(subject_key=key, study_uid=visit.study_uid, name=name, value=value,
                                                  unit=unit or SCORES[name], uploaded_at=now))
            report.stored += 1
    return report


def _match(vs, dates: dict[str, str], label: str, date: str):
    """The visit a row names (by label, else by date within the tolerance) and why not."""
    if label:
        hit = [v for v in vs if v.label == label]
        return (hit[0], "") if hit else (None, f"no visit {label!r} for this subject")
    try:
        day = dt.date.fromisoformat(date)
    except ValueError:
        return None, f"date {date!r} is not YYYY-MM-DD"
    best, gap = None, DATE_TOLERANCE_DAYS + 1
    for v in vs:
        try:
            d = dt.datetime.strptime(dates.get(v.study_uid, "")[:8], "%Y%m%d").date()
        except ValueError:
            continue
        if abs((d - day).days) < gap:
            best, gap = v, abs((d - day).days)
    if best is None:
        return None, f"no visit within {DATE_TOLERANCE_DAYS} days of the date"
    return best, ""


def set_group(conn: Connection, subject_key: str, group: str) -> None:
    """Put a subject in a group ("" takes it out of any)."""
    conn.execute(delete(db.subject_groups).where(db.subject_groups.c.subject_key == subject_key))
    if group:
        conn.execute(insert(db.subject_groups).values(subject_key=subject_key, name=group[:64]))
