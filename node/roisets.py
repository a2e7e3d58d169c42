"""A subject's reader ROI sets, kept by the node: when a visit was measured in a reader's
SEG, the set with the anatomy it was drawn on (a :class:`quant.analysis.RoiReference`) is
written to ``rois/<SEG SOP Instance UID>.npz`` and recorded in ``roi_sets``; every other
visit of the subject is then measured in it, carried by registration.

The file holds arrays and JSON only (``numpy.load(..., allow_pickle=False)``).
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
from sqlalchemy import and_, delete, insert, select
from sqlalchemy.engine import Connection

from quant.analysis import RoiOrigin, RoiReference, RoiSet, StudyAnalysis
from quant.enums import RoiSource
from quant.volume import Volume

from . import db
from .store import Store, safe_uid

log = logging.getLogger(__name__)

_FORMAT = 1


def encode_reference(ref: RoiReference) -> bytes:
    """The bytes of a ``.npz`` holding ``ref`` (arrays, and its geometry and names as JSON)."""
    if ref.rois.origin is None:
        raise ValueError("an ROI reference needs the origin of its set (the reader's SEG)")
    v = ref.anatomy
    meta = {
        "format": _FORMAT, "region": ref.region,
        "names": {str(k): n for k, n in ref.rois.names.items()},
        "origin": [ref.rois.origin.sop_instance_uid, ref.rois.origin.series_instance_uid,
                   ref.rois.origin.study_instance_uid, ref.rois.origin.study_date],
        "spacing_mm": list(v.spacing_mm), "origin_mm": list(v.origin_mm), "orientation": list(v.orientation),
        "frame_of_reference_uid": v.frame_of_reference_uid, "series_instance_uid": v.series_instance_uid,
        "sop_instance_uids": list(v.sop_instance_uids),
        "frame_numbers": [f if f is None else int(f) for f in v.frame_numbers],
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, anatomy=np.asarray(v.array, np.float32), labels=np.asarray(ref.rois.labels, np.int32),
                        side=np.asarray(ref.side, np.uint8), meta=np.array(json.dumps(meta)))
    return buf.getvalue()


def decode_reference(data: bytes | Path) -> RoiReference:
    """The :class:`RoiReference` of :func:`encode_reference`'s bytes (or a file of them)."""
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with np.load(src, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"ROI reference format {meta.get('format')!r}, expected {_FORMAT}")
        anatomy = Volume(array=z["anatomy"], spacing_mm=tuple(meta["spacing_mm"]), origin_mm=tuple(meta["origin_mm"]),
                         orientation=tuple(meta["orientation"]), frame_of_reference_uid=meta["frame_of_reference_uid"],
                         series_instance_uid=meta["series_instance_uid"],
                         sop_instance_uids=tuple(meta["sop_instance_uids"]),
                         frame_numbers=tuple(meta["frame_numbers"]))
        rois = RoiSet(labels=z["labels"], names={int(k): n for k, n in meta["names"].items()},
                      source=RoiSource.READER, origin=RoiOrigin(*meta["origin"]))
        return RoiReference(anatomy=anatomy, rois=rois, side=z["side"], region=meta["region"])


def reference_of(analysis: StudyAnalysis) -> RoiReference | None:
    """The ROI reference of a visit measured in a reader's own SEG; None otherwise."""
    rois = analysis.rois
    if rois is None or rois.source is not RoiSource.READER or rois.origin is None:
        return None
    if analysis.anatomy.array.ndim != 3:
        return None
    return RoiReference(anatomy=analysis.anatomy, rois=rois, side=analysis.segmentation.side,
                        region=analysis.segmentation.region.value)


def keep_reference(store: Store, conn: Connection, subject_key: str, study_uid: str, study_date: str,
                   ref: RoiReference) -> bool:
    """Write a reader's ROI set to ``rois/`` and record it as the subject's newest; True if it is new."""
    assert ref.rois.origin is not None
    uid = ref.rois.origin.sop_instance_uid
    if conn.execute(select(db.roi_sets.c.id).where(db.roi_sets.c.seg_sop_uid == uid)).first() is not None:
        return False
    path = store.root / "rois" / f"{safe_uid(uid, 'SOPInstanceUID')}.npz"
    store.write_result(path, encode_reference(ref))
    conn.execute(insert(db.roi_sets).values(subject_key=subject_key, region=ref.region, study_uid=study_uid,
                                            study_date=study_date, seg_sop_uid=uid, n_rois=len(ref.rois.names),
                                            path=str(path), created_at=time.time()))
    db.record_audit(conn, "roi-set", f"study={study_uid} seg={uid} region={ref.region} rois={len(ref.rois.names)}")
    return True


def references_for(conn: Connection, subject_key: str, study_uid: str) -> list[RoiReference]:
    """The subject's newest reader ROI set of each region drawn on another visit (what this
    visit is measured in when it has no reader SEG of its own); unreadable files are skipped.
    """
    if not subject_key:
        return []
    rows = conn.execute(select(db.roi_sets).where(and_(db.roi_sets.c.subject_key == subject_key,
                                                       db.roi_sets.c.study_uid != study_uid))
                        .order_by(db.roi_sets.c.id.desc())).all()
    out: dict[str, RoiReference] = {}
    for r in rows:
        if r.region in out:
            continue
        try:
            out[r.region] = decode_reference(Path(r.path))
        except (OSError, ValueError, KeyError) as exc:
            log.error("ROI set %s not usable: %s", r.seg_sop_uid, exc)
    return list(out.values())


def atlases_for(conn: Connection, subject_key: str, limit: int) -> list[RoiReference]:
    """Up to ``limit`` reader ROI sets of each region from *other* subjects (the newest set of
    each subject, newest subjects first): the atlases of a visit without ROIs of its own.
    """
    if limit <= 0:
        return []
    rows = conn.execute(select(db.roi_sets).where(db.roi_sets.c.subject_key != subject_key)
                        .order_by(db.roi_sets.c.id.desc())).all()
    seen: set[tuple[str, str]] = set()
    count: dict[str, int] = {}
    out = []
    for r in rows:
        if (r.subject_key, r.region) in seen or count.get(r.region, 0) >= limit:
            continue
        seen.add((r.subject_key, r.region))
        try:
            out.append(decode_reference(Path(r.path)))
        except (OSError, ValueError, KeyError) as exc:
            log.error("ROI set %s not usable as an atlas: %s", r.seg_sop_uid, exc)
            continue
        count[r.region] = count.get(r.region, 0) + 1
    return out


def record_study_rois(conn: Connection, study_uid: str, analysis: StudyAnalysis) -> None:
    """Record which ROIs the study was measured in, with the quality of a carried set."""
    conn.execute(delete(db.study_rois).where(db.study_rois.c.study_uid == study_uid))
    rois = analysis.rois
    if rois is None:
        return
    carried, atlas = analysis.carried, analysis.atlas
    dice = None   # a carried set: its worst Dice; an atlas set: its lowest voter agreement
    if carried is not None and carried.dice_muscle is not None:
        dice = float(min([carried.dice_muscle, *carried.dice_by_side.values()]))
    elif atlas is not None and atlas.agreement:
        dice = float(min(atlas.agreement.values()))
    conn.execute(insert(db.study_rois).values(
        study_uid=study_uid, source=rois.source.value,
        seg_sop_uid=rois.origin.sop_instance_uid if rois.origin else "", n_rois=len(rois.names), dice=dice,
        mismatch=None if carried is None else float(carried.mismatch),
        needs_review=bool(carried is not None and carried.needs_review), updated_at=time.time()))
