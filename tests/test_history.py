"""History rebuilt from PACS (issue 12, item 6): a node that has lost its database (or a new
node on the same PACS) asks a destination with ``query = true`` for the subject's earlier
musclenode SRs (C-FIND, C-GET from a real Orthanc), reads their values back, and reports the
change since the earlier visit as the node that measured it would have; a PACS that does not
answer never blocks a result; ``musclenode history rebuild`` does it on demand."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pytest
from conftest import Orthanc, free_port, node_config, wait_until
from sqlalchemy import select

from node import db
from node.config import Destination, load_config
from node.demo_peers import push
from reports import codes
from reports.sr_readback import metric_of, roi_name

pytestmark = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists(),
                                reason="needs Orthanc (apt-get install orthanc)")

ROOT = Path(__file__).resolve().parents[1]
#: Reported precision (reports.precision): FF to 0.1 pp, areas to 1 mm2; half of it for a rounded
#: value, a whole step for a difference of two.
TOLERANCE = {"csa_mm2": 1.0, "frma_mm2": 1.0, "vol_ml": 0.1, "ff_percent": 0.1, "ff_t2_percent": 0.1,
             "t2w_ms": 0.1, "t2w_mean_ms": 0.1, "t2w_iqr_ms": 0.1, "b1": 0.01}


def _pacs(workdir: Path) -> Orthanc:
    """Orthanc that answers C-FIND and C-GET from the node's AE (listed in DicomModalities: Orthanc
    refuses queries from an AE it does not know)."""
    return Orthanc(workdir).start(modalities={"MUSCLENODE": ["MUSCLENODE", "127.0.0.1", free_port()]})


def _rows(node, table):
    with node.engine.begin() as conn:
        return conn.execute(select(table).order_by(table.c.id)).all()


def _done(node, n_jobs: int) -> bool:
    jobs = _rows(node, db.jobs)
    return len(jobs) >= n_jobs and all(j.state in ("done", "skipped", "failed") for j in jobs)


def _sr_path(node, study_uid: str) -> str:
    return max((r for r in _rows(node, db.outputs) if r.study_uid == study_uid and r.kind == "sr"),
               key=lambda r: r.id).path


def _groups(path: str) -> dict:
    return {g.tracking_identifier: g for g in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()}


def _values(group) -> dict[str, float]:
    return {m.name.meaning: float(m.value) for m in group.get_measurements()}


def _evaluations(group) -> dict[str, str]:
    return {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}


def test_metric_of_tells_the_two_fat_fractions_and_the_t2_statistics_apart():
    dixon, epg = codes.MODEL_METHODS["dixon-rician-ml"], codes.MODEL_METHODS["epg-bicomponent"]
    ff, pct = codes.METRIC_CONCEPTS["ff_percent"]
    assert metric_of(ff, pct, codes.MEAN, dixon) == "ff_percent"
    assert metric_of(ff, pct, codes.MEAN, codes.MODEL_METHODS["megre-pdff-6peak"]) == "ff_percent"
    assert metric_of(ff, pct, codes.MEAN, epg) == "ff_t2_percent"
    assert metric_of(ff, pct, codes.MEAN, None) is None          # ambiguous without a method: not guessed
    t2, ms = codes.METRIC_CONCEPTS["t2w_ms"]
    assert [metric_of(t2, ms, d, epg) for d in (codes.MEDIAN, codes.MEAN, codes.INTERQUARTILE_RANGE)] == \
        ["t2w_ms", "t2w_mean_ms", "t2w_iqr_ms"]
    assert metric_of(*codes.METRIC_CONCEPTS["vol_ml"], None, None) == "vol_ml"
    change, unit = codes.comparison_concept("csa_mm2", "change_since_baseline")
    assert metric_of(change, unit, codes.CHANGE_SINCE_BASELINE, None) is None   # comparisons are skipped
    assert roi_name("anterior compartment") == "anterior_compartment" and roi_name("My ROI") == "My ROI"


def test_a_fresh_node_reports_the_change_since_a_visit_only_pacs_remembers(make_node, thigh_visits, tmp_path):
    (_, d1), (_, d2) = thigh_visits
    s1, s2 = str(d1[0].StudyInstanceUID), str(d2[0].StudyInstanceUID)
    pacs = _pacs(tmp_path / "orthanc")
    try:
        # visit 1 through the first node, which sends its SR to PACS and is then lost with its data
        first = make_node(node_config(tmp_path / "first", destinations=[
            Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)]))
        push(d1, "127.0.0.1", first.port, called_ae="MUSCLENODE")
        wait_until(lambda: _done(first, 1) and all(r.state == "sent" for r in _rows(first, db.outbox))
                   and _rows(first, db.outbox), timeout=240, what="visit 1 measured and sent")
        before = {(r.region, r.side, r.metric, r.roi, r.source): r.value for r in _rows(first, db.measurements)}
        first.stop()
        shutil.rmtree(tmp_path / "first")

        # a new node on the same PACS gets visit 2
        config = node_config(tmp_path / "second", destinations=[
            Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, query=True)])
        second = make_node(config)
        push(d2, "127.0.0.1", second.port, called_ae="MUSCLENODE")
        wait_until(lambda: _done(second, 1), timeout=240, what="visit 2 measured")
        assert [j.state for j in _rows(second, db.jobs)] == ["done"]

        # visit 1's values, read back from its SR, are the subject's history (within the SR's precision)
        history = _rows(second, db.pacs_history)
        assert {r.study_uid for r in history} == {s1} and {r.destination for r in history} == {"pacs"}
        assert {r.study_date for r in history} == {"20260110"}
        got = {(r.region, r.side, r.metric, r.roi, r.source): r.value for r in history}
        assert set(got) == set(before)   # every value: each leg and each automatic compartment, all metrics
        for key, v in before.items():
            assert abs(got[key] - v) <= TOLERANCE[key[2]] / 2 + 1e-9, key
        audits = [a.detail for a in _rows(second, db.audit) if a.event == "history-query"]
        assert len(audits) == 1 and "to=pacs" in audits[0] and "1 recorded with" in audits[0]
        assert "T-0001" not in audits[0]

        # the new SR carries the change since visit 1 as the first node would have reported it
        now = {(r.region, r.side, r.metric, r.roi, r.source): r.value for r in _rows(second, db.measurements)}
        groups = _groups(_sr_path(second, s2))
        checked = 0
        for side in ("right", "left"):
            for ident, roi, source in ((f"{side} thigh muscle", "", ""),
                                       (f"{side} thigh anterior compartment (automatic)", "anterior_compartment",
                                        "automatic")):
                vals = _values(groups[ident])
                for metric, words in (("csa_mm2", "area"), ("ff_percent", "fat fraction"), ("frma_mm2", "fRMA")):
                    key = ("thigh", side, metric, roi, source)
                    reported = vals[f"Change in {words} since baseline"]
                    assert abs(reported - (now[key] - before[key])) <= TOLERANCE[metric], (ident, metric)
                    checked += 1
                assert vals["Interval since baseline"] == 182   # once per group
                assert "Earlier visits" not in _evaluations(groups[ident])
        assert checked == 12
        print(f"history from PACS: {len(history)} values of visit 1; change since baseline within the "
              f"reported precision for {checked} values")
    finally:
        pacs.stop()


def test_a_pacs_that_does_not_answer_never_blocks_the_result(make_node, thigh_visits, tmp_path):
    (_, d1), (_, d2) = thigh_visits
    s2 = str(d2[0].StudyInstanceUID)
    pacs = _pacs(tmp_path / "orthanc")
    pacs_port = pacs.dicom_port
    pacs.stop()                                     # PACS down: connection refused
    silent = socket.socket()                        # a peer that takes the connection and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        config = node_config(tmp_path, destinations=[
            Destination("pacs", "ORTHANC", "127.0.0.1", pacs_port, query=True),
            Destination("silent", "SILENT", "127.0.0.1", silent.getsockname()[1], query=True)])
        config = dataclasses.replace(config, send=dataclasses.replace(config.send, query_timeout_seconds=2.0))
        node = make_node(config)
        push(d2, "127.0.0.1", node.port, called_ae="MUSCLENODE")
        wait_until(lambda: _done(node, 1), timeout=240, what="visit 2 measured")
        job = _rows(node, db.jobs)[0]
        assert job.state == "done" and "earlier visits not retrieved: PACS did not answer" in job.message
        assert job.finished_at - job.started_at < 120
        # its outputs wait in the outbox for the destinations to come back
        outbox = _rows(node, db.outbox)
        assert outbox and {r.state for r in outbox} == {"pending"}
        assert _rows(node, db.pacs_history) == []
        groups = _groups(_sr_path(node, s2))
        for side in ("right", "left"):
            g = groups[f"{side} thigh muscle"]
            assert _evaluations(g)["Earlier visits"] == "Not retrieved: PACS did not answer"
            assert not [n for n in _values(g) if "since baseline" in n]
        audits = [a.detail for a in _rows(node, db.audit) if a.event == "history-query"]
        assert len(audits) == 2 and all("no answer" in a for a in audits)
        assert any("to=pacs" in a for a in audits) and any("to=silent" in a for a in audits)
    finally:
        silent.close()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "node.cli", "-q", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def test_history_rebuild_cli(thigh_visits, tmp_path):
    from node.processing import build_outputs
    (_, d1), _ = thigh_visits
    out = build_outputs(d1, compartments=True)
    pacs = _pacs(tmp_path / "orthanc")
    try:
        assert push([out.sr], "127.0.0.1", pacs.dicom_port, called_ae=pacs.aet) == [0]
        cfg = tmp_path / "musclenode.toml"
        cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n\n[send]\nquery_timeout_seconds = 5.0\n\n'
                       f'[[destinations]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
                       f"port = {pacs.dicom_port}\nquery = true\n")
        assert load_config(cfg).destinations[0].query is True
        r = _cli("history", "rebuild", "--patient", "T-0001", "-c", str(cfg), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        n = len(out.analysis.measurements)
        assert f"pacs: 1 earlier studies, 1 musclenode SRs retrieved, 1 SRs recorded with {n} values" in r.stdout
        engine = db.make_engine(load_config(cfg).database_url)
        with engine.begin() as conn:
            rows = conn.execute(select(db.pacs_history)).all()
        assert {r.subject_key for r in rows} == {"patient::T-0001"} and len(rows) == n
        want = {(m.region, m.side.value, m.metric, m.roi, m.source if m.roi else ""): m.value
                for m in out.analysis.measurements}
        for row in rows:
            key = (row.region, row.side, row.metric, row.roi, row.source)
            assert abs(row.value - want[key]) <= TOLERANCE[row.metric] / 2 + 1e-9, key
        # again: the study's rows are replaced, not added
        assert _cli("history", "rebuild", "--patient", "T-0001", "-c", str(cfg), cwd=tmp_path).returncode == 0
        with engine.begin() as conn:
            assert len(conn.execute(select(db.pacs_history)).all()) == n
        engine.dispose()
    finally:
        pacs.stop()
    r = _cli("history", "rebuild", "--patient", "T-0001", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and "pacs: no answer" in r.stdout
