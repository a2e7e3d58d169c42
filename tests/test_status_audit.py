"""``musclenode status`` summarises (counts per state, the most recent studies, --state, --since,
--limit) and shows DICOM text cut and escaped; ``musclenode audit`` prints who sent which study,
what was made and where it went; no patient name, ID or birth date reaches the logs or the audit."""

import io
import logging
import re
import subprocess
import time
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import small_phantom, wait_until, write_datasets
from sqlalchemy import insert, select

from node import db
from node.cli import main, parse_since
from node.config import Destination
from node.demo_peers import MiniPACS, push
from node.text import SafeFormatter, printable
from quant.synthetic.phantom import phantom_datasets

needs_dcmtk = pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK is not installed")
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # anything but \t and \n in printed text


def _cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def _config_file(node, tmp_path) -> Path:
    cfg = tmp_path / "status.toml"
    cfg.write_text(f'[node]\ndata_dir = "{node.config.node.data_dir}"\n')
    return cfg


def _rows(node, table):
    with node.engine.begin() as conn:
        return conn.execute(select(table).order_by(table.c.id)).all()


def test_printable_cuts_and_escapes():
    assert printable("a\nb\rc\x1b[2Jd\x07\x9b") == "a\\nb\\rc\\e[2Jd\\x07\\x9b"
    assert printable("é" * 10) == "é" * 10
    long = printable("x" * 10_000)
    assert len(long) == 64 and long.endswith("…")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "series %s", ("A\nFORGED\x1b[31m",), None)
    assert SafeFormatter("%(message)s").format(record) == "series A\\nFORGED\\e[31m"


def test_since_accepts_a_date_or_a_time():
    assert parse_since("2026-11-26T10:00") - parse_since("2026-11-26") == 36000
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


def test_hostile_descriptions_are_cut_and_escaped_in_status_and_logs(make_node, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    datasets = phantom_datasets(small_phantom(seed=31), patient_id="HOSTILE", uid_seed="hostile")
    huge, nasty = datasets[0], datasets[len(datasets) // 2]
    huge.SeriesDescription = "A" * 10_000
    nasty.SeriesDescription = "t1\x1b[2J\x1b[31mRED\nforged log line\r\x07"
    huge.ImageType = nasty.ImageType = ["ORIGINAL", "PRIMARY", "M", "NORM"]   # not Dixon: skipped
    node = make_node(complete_after=0.5)
    assert push([huge, nasty], "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0, 0]
    wait_until(lambda: [j for j in _rows(node, db.jobs) if j.state == "skipped"], timeout=60, what="skipped job")
    cfg = _config_file(node, tmp_path)
    rc, out = _cli("status", "--config", str(cfg))
    assert rc == 0
    assert max(len(line) for line in out.splitlines()) <= 200, out
    assert not RAW_CONTROL.search(out), out
    assert "A" * 200 not in out
    (line,) = [ln for ln in out.splitlines() if str(huge.StudyInstanceUID) in ln and "instances" in ln]
    assert " skipped " in line and "no Dixon" in line        # skipped, not done, with its reason
    assert "studies: 1 (skipped 1)" in out
    rc, out = _cli("audit", "--config", str(cfg))
    assert rc == 0 and not RAW_CONTROL.search(out) and max(len(ln) for ln in out.splitlines()) <= 500
    # what the node logged of it
    for rec in caplog.records:
        text = rec.getMessage()
        assert "\x1b" not in text and "forged log line\r" not in text, text
        assert len(text) < 2000, text[:200]
    # the web API still reads it as skipped
    from node.web.pseudonym import site_secret
    from node.web.queries import visits
    with node.engine.begin() as conn:
        assert [v.state for v in visits(conn, site_secret(Path(node.config.node.data_dir)))] == ["skipped"]


def test_status_of_many_studies_is_a_summary(make_node, tmp_path):
    node = make_node(complete_after=1e7)   # longer than the 60 hours of studies: none completes while looked at
    now = time.time()
    states = ["done"] * 30 + ["skipped"] * 15 + ["failed"] * 10 + ["receiving"] * 5
    with node.engine.begin() as conn:
        for i, state in enumerate(states):
            uid = f"1.2.826.0.1.3680043.10.999.{i}"
            received = now - (len(states) - i) * 3600   # one an hour, the last an hour ago
            conn.execute(insert(db.studies).values(
                study_uid=uid, subject_key=f"patient::P{i}", study_date="20260101",
                state="done" if state == "skipped" else state, revision=1, n_instances=3,
                first_received_at=received, last_received_at=received,
                message="no Dixon water and fat series" if state == "skipped" else ""))
            if state != "receiving":
                conn.execute(insert(db.jobs).values(study_uid=uid, revision=1, state=state, attempts=1,
                                                    created_at=received, message=f"{state} job of study {i}"))
    cfg = _config_file(node, tmp_path)
    rc, out = _cli("status", "--config", str(cfg))
    assert rc == 0
    assert "studies: 60 (done 30, failed 10, receiving 5, skipped 15)" in out
    study_lines = [ln for ln in out.splitlines() if "1.2.826.0.1.3680043.10.999." in ln and "instances" in ln]
    assert len(study_lines) == 20                                   # the default limit
    assert "1.2.826.0.1.3680043.10.999.59 " in study_lines[0]      # newest first
    assert "jobs: done 30, failed 10, skipped 15" in out
    rc, out = _cli("status", "--config", str(cfg), "--state", "skipped", "--limit", "5")
    lines = [ln for ln in out.splitlines() if "1.2.826.0.1.3680043.10.999." in ln and "instances" in ln]
    assert len(lines) == 5 and all(" skipped " in ln and "skipped job of study" in ln for ln in lines)
    assert "studies: 5 of 15" in out
    since = time.strftime("%Y-%m-%dT%H:%M", time.localtime(now - 10.5 * 3600))
    rc, out = _cli("status", "--config", str(cfg), "--since", since, "--limit", "50")
    lines = [ln for ln in out.splitlines() if "1.2.826.0.1.3680043.10.999." in ln and "instances" in ln]
    assert len(lines) == 10 and all(" receiving " in ln for ln in lines[:5])
    assert _cli("status", "--config", str(cfg), "--since", "last week")[0] == 2


def test_status_names_the_node_process_holding_a_running_job(make_node, tmp_path):
    """Several nodes on one database: a running job shows which node process holds it."""
    node = make_node(complete_after=3600)
    now = time.time()
    with node.engine.begin() as conn:
        conn.execute(insert(db.studies).values(
            study_uid="1.2.826.0.1.3680043.10.998.1", subject_key="patient::P1", study_date="20260101",
            state="processing", revision=1, n_instances=3, first_received_at=now, last_received_at=now, message=""))
        conn.execute(insert(db.jobs).values(study_uid="1.2.826.0.1.3680043.10.998.1", revision=1, state="running",
                                            attempts=2, lease_until=now + 3600, created_at=now, message="",
                                            claimed_by="worker-b.example:4242"))
    rc, out = _cli("status", "--config", str(_config_file(node, tmp_path)))
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("  #1 "))
    assert "running" in line and "attempts 2  by worker-b.example:4242  study 1.2.826.0.1.3680043.10.998.1" in line


@needs_dcmtk
def test_end_to_end_logs_and_audit_hold_no_patient_identity(make_node, tmp_path):
    name, pid, birth = "Identifiable^Jane", "PID-773100", "19600101"
    datasets = phantom_datasets(small_phantom(seed=41), patient_id=pid, patient_name=name, uid_seed="phi")
    assert all(str(d.PatientBirthDate) == birth for d in datasets)
    files = write_datasets(datasets, tmp_path / "scanner")
    pacs = MiniPACS(tmp_path / "pacs")
    pacs_port = pacs.start()
    log_file = tmp_path / "node.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        node = make_node(destinations=[Destination("pacs", "DEMOPACS", "127.0.0.1", pacs_port)], complete_after=0.5)
        r = subprocess.run(["/usr/bin/storescu", "-aec", "MUSCLENODE", "-aet", "SCANNER", "127.0.0.1",
                            str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: (_rows(node, db.jobs) and all(j.state == "done" for j in _rows(node, db.jobs))
                            and all(o.state == "sent" for o in _rows(node, db.outbox))),
                   timeout=240, what="results made and sent")   # maps and page are sent after SEG and SR
        cfg = _config_file(node, tmp_path)
        rc, audit_out = _cli("audit", "--config", str(cfg))
        rc2, status_out = _cli("status", "--config", str(cfg))
        node.stop()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        pacs.stop()
    assert rc == 0 and rc2 == 0
    study = str(datasets[0].StudyInstanceUID)
    events = [ln.split(" ", 2)[1] for ln in audit_out.splitlines()]
    assert {"received", "study-opened", "study-complete", "job-done", "made", "sent"} <= set(events), audit_out
    received = [ln for ln in audit_out.splitlines() if " received " in ln]
    assert received == [ln for ln in received if f"study={study} instances={len(files)} from=SCANNER@127.0.0.1"
                        in ln] and len(received) == 1
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ", audit_out)   # ISO time with offset
    assert any(" sent " in ln and "to=pacs (DEMOPACS@127.0.0.1" in ln for ln in audit_out.splitlines())
    with node.engine.begin() as conn:
        audit_rows = "\n".join(f"{a.event} {a.detail}" for a in conn.execute(select(db.audit)).all())
    logged = log_file.read_text()
    assert "job" in logged and study in logged                      # the log did capture the run
    secrets = [name, name.replace("^", " "), "Identifiable", pid, birth, "1960-01-01"]
    for where, text in (("log", logged), ("audit table", audit_rows), ("musclenode audit", audit_out),
                        ("musclenode status", status_out)):
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in the {where}"
    # and nowhere in the data directory but the stored DICOM (and the ingest journal, which holds the
    # received instances on their way to the store; and the database, whose subject key needs the ID)
    data_dir = Path(node.config.node.data_dir)
    for path in data_dir.rglob("*"):
        if path.is_file() and path.suffix not in (".dcm", ".db", ".db-wal", ".db-shm", ".journal") and \
                not path.name.startswith("musclenode.db"):
            body = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in body, f"{secret!r} found in {path}"
    # the DICOM the node stored still has them
    stored = next((data_dir / "store").rglob("*.dcm")).read_bytes()
    assert pid.encode() in stored and name.encode() in stored and birth.encode() in stored


def test_make_node_with_replace_keeps_called_check(make_node):
    node = make_node()
    assert node.config.node.require_called_ae_title is True
    assert replace(node.config.node, allowed_calling_aes=()).allowed_calling_aes == ()
