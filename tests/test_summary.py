"""The one-page study summary (reports.summary): a valid Secondary Capture (RGB) and
Encapsulated PDF (dciodvfy), the table's numbers equal to the SR's as the SR writes them
(reports.precision), trends over the subject's visits, and a node that stores the SC in
Orthanc everywhere and the PDF only where a destination has pdf = true."""

import datetime
import io
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import Orthanc, node_config, wait_until, write_datasets
from PIL import Image
from sqlalchemy import select
from validators import dciodvfy_errors

from node import db
from node.config import Destination
from node.processing import build_outputs, encode, parse_date, prior_key
from node.worker import PDF_KIND, JobContext
from quant.enums import Side
from reports import codes
from reports.longitudinal import PriorValue
from reports.precision import formatted
from reports.summary import (
    ENCAPSULATED_PDF_STORAGE,
    PAGE_PX,
    ROW_KINDS,
    TABLE_METRICS,
    build_summary,
    key_slice,
)


def priors_of(outputs) -> dict:
    """The node's priors (keyed by prior_key) from one earlier visit's outputs."""
    out: dict = {}
    for m in outputs.analysis.measurements:
        out.setdefault(prior_key(m.region, m.side.value, m.metric, m.roi, m.source), []).append(
            PriorValue(outputs.study_uid, parse_date(outputs.study_date), m.value, m.algorithm_version))
    return out


@pytest.fixture(scope="module")
def visits(thigh_visits):
    """Both visits built as the node builds them; visit 2 compared with visit 1."""
    (_, d1), (_, d2) = thigh_visits
    o1 = build_outputs(d1, compartments=True)
    o2 = build_outputs(d2, priors_of(o1), compartments=True)
    return (d1, o1), (d2, o2)


def test_sc_and_pdf_are_valid_dicom(visits, tmp_path):
    (_, o1), (d2, o2) = visits
    for n, out in enumerate((o1, o2), start=1):
        s = out.summary
        assert s is not None, f"visit {n}: no summary"
        sc_path, pdf_path = tmp_path / f"sc{n}.dcm", tmp_path / f"pdf{n}.dcm"
        sc_path.write_bytes(encode(s.sc))
        pdf_path.write_bytes(encode(s.pdf))
        assert dciodvfy_errors(sc_path) == [], f"visit {n} SC"
        assert dciodvfy_errors(pdf_path) == [], f"visit {n} PDF"
        sc, pdf = pydicom.dcmread(sc_path), pydicom.dcmread(pdf_path)
        # Secondary Capture, true colour, 8 bit, the page's size
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert (sc.Rows, sc.Columns, sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == \
            (PAGE_PX[1], PAGE_PX[0], 3, "RGB", 8)
        assert np.array_equal(sc.pixel_array, s.rgb)
        png = Image.open(io.BytesIO(s.png))
        assert png.mode == "RGB" and png.size == PAGE_PX
        assert np.array_equal(np.asarray(png), s.rgb)
        # the page is not blank: white paper, black text, colours of the images and plots
        assert (s.rgb == 255).all(axis=2).mean() > 0.4 and len(np.unique(s.rgb.reshape(-1, 3), axis=0)) > 1000
        # Encapsulated PDF of the same page
        assert pdf.SOPClassUID == ENCAPSULATED_PDF_STORAGE and pdf.Modality == "DOC"
        assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
        document = bytes(pdf.EncapsulatedDocument)[: int(pdf.EncapsulatedDocumentLength)]
        assert document == s.pdf_bytes and document.startswith(b"%PDF-") and b"%%EOF" in document[-32:]
        # own series, musclenode, the source's study and patient, the SR referenced
        assert (int(sc.SeriesNumber), int(pdf.SeriesNumber)) == (907, 908)
        assert sc.SeriesInstanceUID != pdf.SeriesInstanceUID != out.sr.SeriesInstanceUID
        for ds in (sc, pdf):
            assert ds.Manufacturer == "musclenode"
            assert ds.StudyInstanceUID == out.study_uid
            assert ds.PatientID == "T-0001" and ds.PatientName == out.sr.PatientName
            assert ds.BurnedInAnnotation == "NO"
            ref = ds.SourceInstanceSequence[0]
            assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == \
                (out.sr.SOPClassUID, out.sr.SOPInstanceUID)
    # deterministic: the same inputs give the same objects' UIDs
    (_, o2) = visits[1]
    water = [d for d in d2 if str(d.SeriesInstanceUID) == o2.analysis.anatomy.series_instance_uid]
    again = build_summary(o2.analysis, water, o2.sr)
    assert again.sc.SOPInstanceUID != o2.summary.sc.SOPInstanceUID   # no trend history: another page
    assert build_summary(o2.analysis, water, o2.sr).sc.SOPInstanceUID == again.sc.SOPInstanceUID


def _sr_metric(item: hd.sr.Measurement) -> str | None:
    """The metric key of a current-value NUM of the SR (None: a comparison or another item)."""
    name = item.name
    for metric, (concept, _) in codes.METRIC_CONCEPTS.items():
        if name != concept:
            continue
        derivation = codes.METRIC_DERIVATIONS.get(metric)
        if (item.derivation is None) != (derivation is None) or (derivation is not None
                                                                 and item.derivation != derivation):
            continue
        if metric in ("ff_percent", "ff_t2_percent"):
            spin_echo = item.method is not None and "spin echo" in item.method.meaning
            if spin_echo != (metric == "ff_t2_percent"):
                continue
        return metric
    return None


def sr_values(sr) -> dict[tuple[str, str, str], float]:
    """(tracking identifier, metric, kind or "") -> value of every NUM of the SR, read back
    through highdicom."""
    kinds = {codes.comparison_concept(m, k)[0].value: (m, k)
             for m in codes.METRIC_CONCEPTS for k in codes.COMPARISON_KINDS}
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True)
    out = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        words = group.tracking_identifier
        for item in group.get_measurements():
            if item.name.value in kinds:
                metric, kind = kinds[item.name.value]
            else:
                metric, kind = _sr_metric(item), ""
                if metric is None:
                    continue
            assert (words, metric, kind) not in out
            out[(words, metric, kind)] = float(item.value)
    return out


@pytest.mark.parametrize("visit", [0, 1])
def test_table_numbers_equal_the_sr(visits, visit):
    _, out = visits[visit]
    sr = pydicom.dcmread(io.BytesIO(encode(out.sr)))
    values = sr_values(sr)
    rows = out.summary.rows
    assert len(rows) == len({(r.group, r.metric) for r in rows}) > 0
    assert out.summary.truncated == 0
    for r in rows:
        assert r.value == formatted(values[(r.group, r.metric, "")], r.metric), r
        for kind in ROW_KINDS:
            want = values.get((r.group, r.metric, kind))
            assert getattr(r, kind) == ("" if want is None else formatted(want, r.metric, kind, sign=True)), \
                (r, kind)
    # every value of the table's metrics in the SR is on the page
    shown = {(r.group, r.metric) for r in rows}
    assert {(g, m) for g, m, k in values if not k and m in TABLE_METRICS} == shown
    assert {"right thigh muscle", "left thigh muscle"} <= {r.group for r in rows}
    assert any(r.roi for r in rows)   # the automatic compartments
    changes = [r for r in rows if r.change_since_baseline]
    if visit == 0:
        assert not changes
    else:   # visit 2: every value compared with visit 1 (baseline and previous are the same visit)
        assert len(changes) == len(rows)
        assert all(r.change_since_previous == r.change_since_baseline for r in rows)
        ff = next(r for r in rows if r.group == "right thigh muscle" and r.metric == "ff_percent")
        assert ff.change_since_baseline.startswith("+") and ff.model == "Dixon ML"


def test_trends_over_the_visits(visits):
    (_, o1), (_, o2) = visits
    first = {(m.roi, m.side, m.metric): m.value for m in o1.analysis.measurements}
    now = {(m.roi, m.side, m.metric): m.value for m in o2.analysis.measurements}
    lines = o2.summary.trends
    assert {t.metric for t in lines} == {"frma_mm2", "ff_percent", "csa_mm2", "t2w_ms"}
    for t in lines:
        (d1, v1), (d2, v2) = t.points
        assert (d1, d2) == (datetime.date(2026, 1, 10), datetime.date(2026, 7, 11))
        assert v1 == first[(t.roi, t.side, t.metric)] and v2 == now[(t.roi, t.side, t.metric)]
    assert all(len(t.points) == 1 for t in o1.summary.trends)


def test_key_slice_has_the_largest_muscle_area(visits):
    _, out = visits[1]
    a = out.analysis
    k = key_slice(a)
    areas = [(a.segmentation.tissue[i] == 1).sum() for i in range(a.segmentation.tissue.shape[0])]
    assert areas[k] >= 0.95 * max(areas)   # the largest, or within 5 % of it and nearer the middle
    assert abs(k - (len(areas) - 1) / 2) == min(abs(i - (len(areas) - 1) / 2) for i, a in enumerate(areas)
                                                if a >= 0.95 * max(areas))


def test_pdf_goes_only_where_accepted():
    ctx = JobContext("sqlite://", "/tmp", ("pacs", "docs"), pdf_destinations=("docs",))
    assert ctx.destinations_for("summary") == ("pacs", "docs")
    assert ctx.destinations_for("sr") == ("pacs", "docs")
    assert ctx.destinations_for(PDF_KIND) == ("docs",)
    assert JobContext("sqlite://", "/tmp", ("pacs",)).destinations_for(PDF_KIND) == ()


@pytest.mark.skipif(not Path("/usr/bin/storescu").exists() or not Path("/usr/sbin/Orthanc").exists(),
                    reason="needs DCMTK and Orthanc (apt-get install dcmtk orthanc)")
def test_node_stores_sc_everywhere_and_pdf_where_accepted(make_node, orthanc, thigh_visits, tmp_path):
    docs = Orthanc(tmp_path / "orthanc-docs", aet="DOCS").start()
    try:
        dests = [Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port),
                 Destination("docs", docs.aet, "127.0.0.1", docs.dicom_port, pdf=True)]
        node = make_node(node_config(tmp_path, destinations=dests, complete_after=0.5))
        (_, datasets), _ = thigh_visits
        files = write_datasets(datasets, tmp_path / "in")
        r = subprocess.run(["/usr/bin/storescu", "-aec", "MUSCLENODE", "-aet", "SCANNER", "127.0.0.1",
                            str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        study_uid = str(datasets[0].StudyInstanceUID)

        def classes(pacs):
            return {pacs.get(f"/instances/{i['ID']}/simplified-tags")["SOPClassUID"]: i["ID"]
                    for i in pacs.instances_of_study(study_uid)}

        def all_sent():
            with node.engine.begin() as conn:
                rows = conn.execute(select(db.outbox.c.state, db.outbox.c.destination, db.outputs.c.kind)
                                    .join(db.outputs, db.outputs.c.id == db.outbox.c.output_id)).all()
                done = conn.execute(select(db.jobs.c.state)).scalars().all()
            # maps and page are recorded after SEG and SR: the job's end says all its outputs are there
            return rows if rows and done and set(done) == {"done"} and all(r.state == "sent" for r in rows) else None
        t0 = time.time()
        rows = wait_until(all_sent, timeout=240, interval=0.5, what="every output sent")
        assert {(r.destination, r.kind) for r in rows if r.kind.startswith("summary")} == \
            {("pacs", "summary"), ("docs", "summary"), ("docs", "summary-pdf")}
        sc_uid = pydicom.uid.SecondaryCaptureImageStorage
        in_pacs = wait_until(lambda: (lambda c: c if sc_uid in c else None)(classes(orthanc)), timeout=30,
                             what="the SC in Orthanc")
        in_docs = wait_until(lambda: (lambda c: c if {sc_uid, ENCAPSULATED_PDF_STORAGE} <= set(c) else None)(
            classes(docs)), timeout=30, what="SC and PDF in the PDF-accepting Orthanc")
        assert ENCAPSULATED_PDF_STORAGE not in in_pacs
        sc = pydicom.dcmread(io.BytesIO(orthanc.file(in_pacs[sc_uid])))
        assert (sc.Rows, sc.Columns, sc.PhotometricInterpretation, int(sc.SeriesNumber)) == \
            (PAGE_PX[1], PAGE_PX[0], "RGB", 907)
        pdf = pydicom.dcmread(io.BytesIO(docs.file(in_docs[ENCAPSULATED_PDF_STORAGE])))
        assert bytes(pdf.EncapsulatedDocument).startswith(b"%PDF-") and int(pdf.SeriesNumber) == 908
        sr = next(pydicom.dcmread(io.BytesIO(orthanc.file(iid))) for cls, iid in in_pacs.items()
                  if cls == pydicom.uid.Comprehensive3DSRStorage)
        assert sc.SourceInstanceSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
        print(f"summary in Orthanc {time.time() - t0:.1f} s after the last instance")
    finally:
        docs.stop()


def test_a_summary_that_fails_never_fails_the_study(visits, monkeypatch):
    import reports.summary

    def broken(*args, **kwargs):
        raise ValueError("no page today")
    monkeypatch.setattr(reports.summary, "build_summary", broken)
    (d1, _), _ = visits
    out = build_outputs(d1, compartments=False)
    assert out.summary is None and out.sr is not None and out.seg is not None
    assert Side.RIGHT in {m.side for m in out.analysis.measurements}
