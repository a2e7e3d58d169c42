"""When a series is complete, and when a study is ready for its protocol.

A series is complete when the number of instances (or frames) that arrived matches what
its headers declare, as recorded per instance at store time (:func:`node.instances.instance_facts`):

1. Enhanced MR Image Storage: every instance carries all its frames (Number of Frames;
   :func:`node.instances.check_instance` refuses a truncated one). A multi-echo series
   (multi-echo spin or gradient echo) that declares Echo Train Length E is complete when E
   distinct echo times have arrived (Siemens XA writes one instance per echo); any other
   Enhanced MR series is complete with its instance, and so is a Segmentation (a reader's
   ROIs: every segment in the one multi-frame instance).
2. Images in Acquisition (0020,1002) N: complete when N instances arrived.
3. Number of Temporal Positions (0020,0105) T > 1: complete when every slice has T
   temporal positions (T x slices instances).
4. A multi-echo series (by its recognised kind): E echoes (Echo Train Length, else the
   distinct Echo Numbers) x slices, every (echo, slice) present.
5. Otherwise nothing declares a count, and the series is never complete by count.

Rules 3 and 4 count the slices that arrived: a scanner that sends all echoes of one slice
before the next slice would look complete early. Images in Acquisition, where written,
is used first. A series is multi-echo once three echo times have arrived (as
:func:`quant.series.classify_series` decides); before that it counts by rules 1, 2 or 5.

A study is ready for a protocol (:class:`node.config.Protocol`) when its Study
Description, a Series Description or Body Part Examined matches the first protocol that
matches, a complete series of every kind the protocol expects has arrived, and no series
that declares a count is still short of it. A study re-opened by a late series (processed
before) is ready again when every series that arrived since is complete by count (a
reader's SEG at once); one that declares nothing waits for the quiet time, as before.
Series are recognised from the recorded headers by :func:`quant.series.classify_series`
itself, so the node and quantification agree on what each series is.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage, SegmentationStorage

from quant.enums import SeriesKind
from quant.series import classify_series

from .config import PROTOCOL_SERIES_KINDS, Protocol
from .instances import HEADER_KEYWORDS

_MULTI_ECHO = {SeriesKind.MESE, SeriesKind.MEGRE_MAGNITUDE, SeriesKind.MEGRE_PHASE}


@dataclass(frozen=True)
class SeriesProgress:
    """How far one series of a study has arrived.

    ``received`` and ``expected`` count what ``rule`` counts (instances, echoes or
    (echo, slice) pairs); ``expected`` is None when nothing in the headers declares a count.
    """

    series_uid: str
    kind: SeriesKind
    received: int
    expected: int | None
    rule: str

    @property
    def complete(self) -> bool:
        """True when the series declares a count and exactly that much has arrived."""
        return self.expected is not None and self.received == self.expected

    @property
    def short(self) -> bool:
        """True when the series declares a count that has not been reached yet (still arriving)."""
        return self.expected is not None and self.received < self.expected


@dataclass(frozen=True)
class Readiness:
    """Whether a study is ready by protocol: the protocol it matched (None: none), and why."""

    protocol: Protocol | None
    ready: bool
    reason: str


def header_dataset(rows: Sequence[Mapping[str, Any]]) -> Dataset:
    """A header-only dataset of one series for :func:`quant.series.classify_series`: the
    recorded header of its first instance, with the echo times of all its instances as MR
    Echo functional groups (where classify_series reads Enhanced MR echo times).
    """
    ds = Dataset()
    for row in rows:
        header = _header(row)
        if header:
            for keyword, value in header.items():
                try:
                    setattr(ds, keyword, value)
                except (ValueError, TypeError, OverflowError):   # a hostile value: left out
                    continue
            break
    tes = sorted({t for row in rows for t in _echo_times(row)})
    groups = []
    for te in tes:
        echo, group = Dataset(), Dataset()
        echo.EffectiveEchoTime = te
        group.MREchoSequence = DicomSequence([echo])
        groups.append(group)
    if groups:
        ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    return ds


def _header(row: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded header of an instance row (keyword -> value), {} when none or unreadable."""
    try:
        header = json.loads(row["header"] or "{}")
    except ValueError:
        return {}
    if not isinstance(header, dict):
        return {}
    return {k: v for k, v in header.items() if k in HEADER_KEYWORDS}


def _echo_times(row: Mapping[str, Any]) -> list[float]:
    out = []
    for part in str(row["echo_times"] or "").split(";"):
        try:
            out.append(float(part))
        except ValueError:
            continue
    return out


def series_progress(series_uid: str, rows: Sequence[Mapping[str, Any]]) -> SeriesProgress:
    """The :class:`SeriesProgress` of one series from its ``instances`` rows (one per instance)."""
    kind = classify_series([header_dataset(rows)]).kind if rows else SeriesKind.UNKNOWN
    received = len(rows)
    sop_classes = {str(r["sop_class_uid"]) for r in rows}
    etl = max((int(r["echo_train_length"] or 0) for r in rows), default=0)
    if sop_classes in ({EnhancedMRImageStorage}, {SegmentationStorage}):
        if kind in _MULTI_ECHO and etl > 1:
            echoes = len({t for r in rows for t in _echo_times(r)})
            return SeriesProgress(series_uid, kind, echoes, etl,
                                  f"Enhanced MR: {etl} echoes declared (Echo Train Length), {echoes} arrived")
        frames = sum(int(r["n_frames"] or 1) for r in rows)
        what = "Enhanced MR" if sop_classes == {EnhancedMRImageStorage} else "Segmentation"
        return SeriesProgress(series_uid, kind, frames, frames,
                              f"{what}: {frames} frames (Number of Frames), all in the instance")
    declared = {int(r["images_in_acquisition"] or 0) for r in rows} - {0}
    if declared:
        n = max(declared)
        return SeriesProgress(series_uid, kind, received, n, f"Images in Acquisition {n}")
    slices = {r["slice_key"] for r in rows if r["slice_key"]}
    temporal = max((int(r["temporal_positions"] or 0) for r in rows), default=0)
    if temporal > 1 and slices:
        if len({(r["temporal_position"], r["slice_key"]) for r in rows}) < received:
            return SeriesProgress(series_uid, kind, received, None, "a (temporal position, slice) repeated")
        return SeriesProgress(series_uid, kind, received, temporal * len(slices),
                              f"{temporal} temporal positions x {len(slices)} slices")
    if kind in _MULTI_ECHO and slices:
        keys = [(r["echo_number"] or r["echo_times"], r["slice_key"]) for r in rows]
        echoes = etl if etl > 1 else len({e for e, _ in keys})
        how = "Echo Train Length" if etl > 1 else "distinct Echo Numbers"
        if len(set(keys)) < received:
            return SeriesProgress(series_uid, kind, received, None, "an (echo, slice) repeated")
        return SeriesProgress(series_uid, kind, received, echoes * len(slices),
                              f"{echoes} echoes ({how}) x {len(slices)} slices")
    return SeriesProgress(series_uid, kind, received, None, "no count declared")


def study_progress(rows: Iterable[Mapping[str, Any]]) -> list[SeriesProgress]:
    """The :class:`SeriesProgress` of every series of a study, from its ``instances`` rows."""
    by_series: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_series[str(row["series_uid"])].append(row)
    return [series_progress(uid, series_rows) for uid, series_rows in by_series.items()]


def study_texts(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """Study Description, Series Descriptions and Body Part Examined of a study's recorded headers."""
    texts: set[str] = set()
    seen_series: set[str] = set()
    for row in rows:
        if not row["header"] or row["series_uid"] in seen_series:
            continue
        seen_series.add(row["series_uid"])
        header = _header(row)
        for keyword in ("StudyDescription", "SeriesDescription", "BodyPartExamined"):
            value = header.get(keyword)
            if isinstance(value, str) and value.strip():
                texts.add(value.strip())
    return texts


def matching_protocol(protocols: Sequence[Protocol], texts: Iterable[str]) -> Protocol | None:
    """The first protocol whose ``match`` is found in one of ``texts``, or None."""
    texts = list(texts)
    for protocol in protocols:
        pattern = protocol.pattern
        if any(pattern.search(t) for t in texts):
            return protocol
    return None


def readiness(protocols: Sequence[Protocol], rows: Sequence[Mapping[str, Any]],
              reopened_at: float | None = None) -> Readiness:
    """Whether the study whose ``instances`` rows are ``rows`` is ready by protocol.

    ``reopened_at``: for a study processed before (re-opened by a late series), the time its
    last job was queued. Every series with an instance received after it must then be
    complete by count (a reader's SEG is): a late series that declares nothing waits for the quiet time.
    """
    protocol = matching_protocol(protocols, study_texts(rows))
    if protocol is None:
        return Readiness(None, False, "no protocol matches (quiet time)")
    progress = study_progress(rows)
    missing = [name for name in protocol.expects
               if not any(p.complete and p.kind is PROTOCOL_SERIES_KINDS[name] for p in progress)]
    if missing:
        return Readiness(protocol, False, f"protocol {protocol.name}: waiting for {', '.join(missing)}")
    short = [p for p in progress if p.short]
    if reopened_at is not None:
        late = {str(r["series_uid"]) for r in rows if float(r["received_at"]) > reopened_at}
        short += [p for p in progress if p.series_uid in late and not p.complete and not p.short]
    if short:
        first = short[0]
        count = f"{first.received} of {first.expected}" if first.expected is not None else first.rule
        return Readiness(protocol, False, f"protocol {protocol.name}: series {first.series_uid} still arriving "
                         f"({count})")
    return Readiness(protocol, True, f"protocol {protocol.name}: {', '.join(protocol.expects)} complete")
