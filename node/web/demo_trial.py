"""A synthetic trial in the node's database (no images): studies, jobs and measurements of
many subjects, for the API's benchmark and fuzz tests. Values follow an ALS-like course
(areas fall, fat fraction rises, with subject-to-subject spread), in the node's own tables.
"""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from reports.uids import derive_uid

from .. import db
from ..db import JobState, StudyState

METRICS = {   # metric -> (unit, baseline, change per year, spread)
    "csa_mm2": ("mm2", 8000.0, -600.0, 900.0), "vol_ml": ("ml", 800.0, -60.0, 90.0),
    "ff_percent": ("%", 6.0, 4.0, 1.5), "frma_mm2": ("mm2", 7500.0, -900.0, 800.0),
    "t2w_ms": ("ms", 32.0, 2.0, 1.0), "t2w_iqr_ms": ("ms", 4.0, 0.5, 0.5), "b1": ("1", 0.95, 0.0, 0.05),
    "ff_t2_percent": ("%", 6.0, 4.0, 1.5),
}
REGIONS = ("thigh", "calf", "hand", "head_neck")
ROIS = {"thigh": ("anterior_compartment", "medial_compartment", "posterior_compartment"),
        "calf": ("anterior_compartment", "lateral_compartment", "triceps_surae", "deep_posterior_compartment")}
VISIT_DAYS = (0, 182, 365)


def fill_trial(engine: Engine, n_subjects: int = 300, *, regions=REGIONS, visit_days=VISIT_DAYS, rois: bool = True,
               seed: int = 0) -> int:
    """Insert a synthetic trial; returns the number of measurement rows."""
    rng = np.random.default_rng(seed)
    now = time.time()
    n_rows = 0
    base_date = dt.date(2026, 1, 5)
    with engine.begin() as conn:
        for s in range(n_subjects):
            key = f"trial:SYNTH:{s:04d}"
            start = base_date + dt.timedelta(days=int(rng.integers(0, 300)))
            rate = rng.normal(1.0, 0.4)
            for v, days in enumerate(visit_days):
                uid = derive_uid("synthetic-trial", key, str(v))
                date = (start + dt.timedelta(days=days)).strftime("%Y%m%d")
                conn.execute(insert(db.studies).values(
                    study_uid=uid, subject_key=key, study_date=date, state=StudyState.DONE, revision=1,
                    n_instances=100, first_received_at=now, last_received_at=now, message="", time_point=""))
                key_row = conn.execute(insert(db.jobs).values(
                    study_uid=uid, revision=1, state=JobState.DONE, attempts=1, created_at=now, started_at=now,
                    finished_at=now, message="synthetic")).inserted_primary_key
                assert key_row is not None
                job = key_row[0]
                rows = []
                for region in regions:
                    parts = [("", "")] + ([(r, "automatic") for r in ROIS.get(region, ())] if rois else [])
                    for roi, source in parts:
                        scale = 1.0 if not roi else 1.0 / max(1, len(ROIS.get(region, ())))
                        for side in ("right", "left"):
                            for metric, (unit, base, slope, spread) in METRICS.items():
                                area = metric in ("csa_mm2", "vol_ml", "frma_mm2")
                                value = (base + slope * rate * days / 365.25) * (scale if area else 1.0) \
                                    + rng.normal(0, spread * 0.05)
                                rows.append(dict(subject_key=key, study_uid=uid, study_date=date, region=region,
                                                 side=side, metric=metric, value=float(value), unit=unit,
                                                 algorithm_version="synthetic", model="", job_id=job, roi=roi,
                                                 source=source))
                conn.execute(insert(db.measurements), rows)
                n_rows += len(rows)
    return n_rows
