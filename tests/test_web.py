"""The coordinators' web API, against a real node: phantom visits of two subjects pushed
over DICOM, then the API with bearer tokens (401, 403), pseudonymised subjects, a timeline
whose changes match the phantom's truth, CSV and Parquet exports matching the node's SRs,
and no patient identifier anywhere in a coordinator's response or export."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import httpx
import pytest
from conftest import WEB_SUBJECTS as SUBJECTS
from conftest import wait_until
from sqlalchemy import select

from node import db
from quant.enums import Side

ROOT = Path(__file__).resolve().parents[1]


def _token(node, name, role):
    from node.web.tokens import create_token
    return create_token(node.engine, name, role)


def _client(node, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=f"http://127.0.0.1:{node.web.port}", headers=headers, timeout=60)


def test_tokens_and_roles(web_node):
    node, *_ = web_node
    with _client(node) as anon:
        assert anon.get("/api/v1/health").json()["status"] == "ok"
        assert anon.get("/api/v1/subjects").status_code == 401
        assert anon.get("/api/v1/openapi.json").status_code == 200
    with _client(node, "mn_not-a-token") as bad:
        assert bad.get("/api/v1/subjects").status_code == 401
    coord = _token(node, "coord-roles", "coordinator")
    admin = _token(node, "admin-roles", "admin")
    with _client(node, coord) as c, _client(node, admin) as a:
        subject = c.get("/api/v1/subjects").json()[0]["subject"]
        assert c.get(f"/api/v1/admin/subjects/{subject}").status_code == 403
        who = a.get(f"/api/v1/admin/subjects/{subject}").json()
        assert who["id"] in {s[0] for s in SUBJECTS}
    with node.engine.begin() as conn:
        looks = conn.execute(select(db.audit).where(db.audit.c.event == "identity-look")).all()
    assert any("token=admin-roles" in r.detail and subject in r.detail for r in looks)
    from node.web.tokens import revoke_token
    assert revoke_token(node.engine, "coord-roles")
    with _client(node, coord) as c:
        assert c.get("/api/v1/subjects").status_code == 401


def test_subjects_timeline_and_exports(web_node):
    node, truths, phi, _ = web_node
    token = _token(node, "coord-main", "coordinator")
    texts = []
    with _client(node, token) as c:
        r = c.get("/api/v1/subjects")
        texts.append(r.text)
        subjects = r.json()
        assert len(subjects) == 2 and all(s["subject"].startswith("S-") for s in subjects)
        assert all(s["visits"] == 2 and s["first_visit_days"] == 0 and s["last_visit_days"] == 182 for s in subjects)
        assert all(s["regions"] == ["thigh"] for s in subjects)
        # which subject is which: via the admin look-up (the coordinator never sees it)
        admin = _token(node, "admin-main", "admin")
        with _client(node, admin) as a:
            pid = {s["subject"]: a.get(f"/api/v1/admin/subjects/{s['subject']}").json()["id"] for s in subjects}
        for code, patient in pid.items():
            r = c.get(f"/api/v1/subjects/{code}")
            texts.append(r.text)
            tl = r.json()
            assert [v["visit"] for v in tl["visits"]] == ["baseline", "month 6"]
            assert [v["state"] for v in tl["visits"]] == ["done", "done"]
            follow = {(m["side"], m["metric"]): m for m in tl["visits"][1]["measurements"] if m["roi"] is None}
            for side in (Side.RIGHT, Side.LEFT):
                truth_change = truths[(patient, 1)][(side, "csa_mm2")] - truths[(patient, 0)][(side, "csa_mm2")]
                m = follow[(side.value, "csa_mm2")]
                assert m["change_from_baseline"] == pytest.approx(truth_change, rel=0.1, abs=30)
                assert m["annualised_change"] == pytest.approx(m["change_from_baseline"] * 365.25 / 182)
                ff_change = truths[(patient, 1)][(side, "ff_percent")] - truths[(patient, 0)][(side, "ff_percent")]
                assert follow[(side.value, "ff_percent")]["change_from_baseline"] == pytest.approx(ff_change, abs=1.0)
            assert all(m["change_from_baseline"] is None for m in tl["visits"][0]["measurements"])
        assert c.get("/api/v1/subjects/S-NOSUCH").status_code == 404
        stats = c.get("/api/v1/stats", params={"metric": "csa_mm2", "region": "thigh", "side": "right"})
        assert stats.status_code == 200 and stats.json()["n"] == 2
        texts.append(stats.text)
        csv_text = c.get("/api/v1/measurements", params={"format": "csv"}).text
        parquet = c.get("/api/v1/measurements", params={"format": "parquet"}).content
        rows = c.get("/api/v1/measurements", params={"metric": "csa_mm2", "roi": ""}).json()
        texts += [csv_text, str(rows)]
    assert len(rows) == 8 and {r["metric"] for r in rows} == {"csa_mm2"} and all(r["roi"] is None for r in rows)
    import pyarrow.parquet as pq
    table = pq.read_table(io.BytesIO(parquet))
    assert table.num_rows == csv_text.count("\n") - 1 and "algorithm_version" in table.column_names
    # the export's values are those of the SRs in PACS (Orthanc), else of the node's own SR files
    sr_files = []
    if getattr(node, "pacs", None) is not None:
        pacs = node.pacs
        with node.engine.begin() as conn:
            study_uids = conn.execute(select(db.studies.c.study_uid)).scalars().all()

        def srs_in_pacs():
            found = []
            for uid in study_uids:
                for inst in pacs.instances_of_study(uid):
                    tags = pacs.get(f"/instances/{inst['ID']}/simplified-tags")
                    if tags.get("Modality") == "SR":
                        found.append(inst["ID"])
            return found if len(found) == len(study_uids) else None
        for iid in wait_until(srs_in_pacs, timeout=120, what="the SRs in Orthanc"):
            path = tmp_path_for_sr(node, iid)
            path.write_bytes(pacs.file(iid))
            sr_files.append(path)
    else:
        with node.engine.begin() as conn:
            sr_files = [Path(o.path) for o in conn.execute(select(db.outputs).where(db.outputs.c.kind == "sr")).all()]
    sr_values = []
    for path in sr_files:
        for g in hd.sr.srread(path).content.get_volumetric_roi_measurement_groups():
            if g.tracking_identifier.endswith("thigh muscle"):
                sr_values += [m.value for m in g.get_measurements() if m.name.meaning == "Area"]
    export_csa = sorted(r["value"] for r in table.to_pylist() if r["metric"] == "csa_mm2" and r["roi"] is None)
    # the SR writes area to 1 mm2 (reports.precision), the export keeps the measured value
    assert sorted(float(v) for v in sr_values) == pytest.approx(sorted(round(v) for v in export_csa), abs=1e-9)
    # no patient identifier in anything a coordinator got
    blob = "\n".join(texts) + str(table.to_pylist())
    for word in phi:
        assert word not in blob, word


def tmp_path_for_sr(node, instance_id: str) -> Path:
    folder = Path(node.config.node.data_dir).parent / "from-pacs"
    folder.mkdir(exist_ok=True)
    return folder / f"{instance_id}.dcm"


def test_token_and_export_commands(web_node):
    node, _, phi, tmp = web_node
    cfg = tmp / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{node.config.node.data_dir}"\n'
                   f'[database]\nurl = "{node.config.database_url}"\n')

    def run(*args):
        return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(cfg)], capture_output=True,
                              text=True, timeout=120, cwd=ROOT)
    r = run("token", "create", "cli-coord", "--role", "coordinator")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip().splitlines()[-1]
    with _client(node, token) as c:
        assert c.get("/api/v1/subjects").status_code == 200
    assert "cli-coord" in run("token", "list").stdout and token not in run("token", "list").stdout
    assert run("token", "create", "cli-coord", "--role", "admin").returncode == 1
    out = tmp / "export.csv"
    r = run("export", str(out), "--metric", "ff_percent")
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.splitlines()[0].startswith("subject,group,visit,days_since_baseline")
    assert {line.split(",")[9] for line in text.splitlines()[1:]} == {"ff_percent"}
    assert not any(word in text for word in phi)
    r = run("export", str(tmp / "late.parquet"), "--format", "parquet", "--since", "2026-07-01")
    assert r.returncode == 0 and "rows written" in r.stdout
    import pyarrow.parquet as pq
    assert set(pq.read_table(tmp / "late.parquet").column("days_since_baseline").to_pylist()) == {182}
    assert run("token", "revoke", "cli-coord").returncode == 0


def test_score_upload_and_groups(web_node):
    node, *_ = web_node
    coord = _token(node, "coord-scores", "coordinator")
    admin = _token(node, "admin-scores", "admin")
    with _client(node, coord) as c, _client(node, admin) as a:
        codes = sorted(s["subject"] for s in c.get("/api/v1/subjects").json())
        upload = ("subject,visit,date,group,alsfrs_r,knee_extension[N]\n"
                  f"{codes[0]},baseline,,fast,44,300\n"
                  f"{codes[0]},,2026-07-08,fast,40,250\n"          # by date, 2 days off
                  f"{codes[1]},baseline,,slow,46,320\n"
                  f"{codes[1]},month 12,,slow,45,310\n"            # no such visit
                  "S-NOBODY,baseline,,,40,200\n"                   # no such subject
                  f"{codes[1]},month 6,,slow,n/a,305\n")           # not a number: reported, the rest kept
        r = c.post("/api/v1/scores", files={"file": ("scores.csv", upload, "text/csv")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["stored"] == 7 and body["groups"] == 5
        reasons = sorted(x["reason"] for x in body["rejected"])
        assert reasons == ["alsfrs_r: not a number ('n/a')", "no visit 'month 12' for this subject", "unknown subject"]
        bad = c.post("/api/v1/scores", files={"file": ("x.csv", "who,when\n1,2\n", "text/csv")})
        assert bad.status_code == 400 and "subject" in bad.json()["detail"]
        groups = {s["subject"]: s["group"] for s in c.get("/api/v1/subjects").json()}
        assert groups == {codes[0]: "fast", codes[1]: "slow"}
        assert c.put(f"/api/v1/admin/groups/{codes[1]}", params={"group": "arm B"}).status_code == 403
        assert a.put(f"/api/v1/admin/groups/{codes[1]}", params={"group": "arm B"}).json()["group"] == "arm B"
        rows = c.get("/api/v1/measurements", params={"metric": "csa_mm2", "roi": ""}).json()
        assert {r["group"] for r in rows if r["subject"] == codes[1]} == {"arm B"}
    with node.engine.begin() as conn:
        stored = conn.execute(select(db.scores)).all()
    assert {(s.name, s.unit) for s in stored} == {("alsfrs_r", "points"), ("knee_extension", "N")}
