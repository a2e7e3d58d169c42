"""GET /api/v1/stats on a small table whose changes are known: annualised change, SRM,
sample sizes (statsmodels) and the correlation with an uploaded score (scipy), per group."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats
from sqlalchemy import insert

from node import db
from node.web.app import create_app
from node.web.tokens import create_token

SLOPES = [500.0, 700.0, 900.0, 600.0, 800.0]      # fRMA loss, mm2 per year
SCORE_SLOPES = [30.0, 80.0, 70.0, 50.0, 90.0]     # knee extension loss, N per year
GROUPS = ["fast", "fast", "fast", "slow", "slow"]
DAYS = [0, 182, 365]
DATES = ["20260105", "20260706", "20270105"]


@pytest.fixture()
def client(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'stats.db'}")
    with engine.begin() as conn:
        for s, slope in enumerate(SLOPES):
            key = f"trial:STATS:P{s}"
            for v, (days, date) in enumerate(zip(DAYS, DATES, strict=True)):
                uid = f"1.2.3.{s}.{v}"
                conn.execute(insert(db.studies).values(study_uid=uid, subject_key=key, study_date=date, state="done",
                                                       revision=1, n_instances=1, first_received_at=0,
                                                       last_received_at=0, message=""))
                job = conn.execute(insert(db.jobs).values(study_uid=uid, revision=1, state="done", attempts=1,
                                                          created_at=0, message="")).inserted_primary_key[0]
                conn.execute(insert(db.measurements).values(
                    subject_key=key, study_uid=uid, study_date=date, region="thigh", side="right",
                    metric="frma_mm2", value=7000.0 - slope * days / 365.25, unit="mm2", algorithm_version="v",
                    model="", job_id=job, roi="anterior_compartment", source="carried" if v else "reader"))
    token = create_token(engine, "stats", "coordinator")
    return TestClient(create_app(engine, tmp_path), headers={"Authorization": f"Bearer {token}"})


def _upload_scores(client):
    lines = ["subject,visit,group,knee_extension[N]"]
    for s, slope in enumerate(SCORE_SLOPES):
        for days, label in zip(DAYS, ("baseline", "month 6", "month 12"), strict=True):
            lines.append(f"P{s},{label},{GROUPS[s]},{300.0 - slope * days / 365.25}")
    r = client.post("/api/v1/scores", files={"file": ("s.csv", "\n".join(lines) + "\n", "text/csv")})
    assert r.status_code == 200 and r.json()["stored"] == 15 and not r.json()["rejected"], r.text


def test_scores_with_any_line_ends_and_bad_csv(client):
    """CR, LF and CRLF line ends all read (a bare CR, as the API fuzz sent, was a server error
    when the text was split into lines before the csv module saw it); what the csv module cannot
    read (a field over its limit) is a 400 with the reason, never a server error."""
    for end in ("\r", "\n", "\r\n"):
        body = end.join(["subject,visit,knee_extension[N]", "P0,baseline,301", "P1,baseline,302"]) + end
        r = client.post("/api/v1/scores", files={"file": ("s.csv", body, "text/csv")})
        assert r.status_code == 200 and r.json()["stored"] == 2, (repr(end), r.text)
    r = client.post("/api/v1/scores", files={"file": ("s.csv", "\r0\r\n", "text/csv")})
    assert r.status_code == 400 and "empty" in r.text
    r = client.post("/api/v1/scores", files={"file": ("s.csv", "subject,visit\n" + "P" * 140_000 + ",baseline\n",
                                                      "text/csv")})
    assert r.status_code == 400 and "not CSV" in r.text, r.text


def test_cohort_statistics_match_the_known_changes(client):
    from statsmodels.stats.power import TTestIndPower
    params = {"metric": "frma_mm2", "region": "thigh", "side": "right", "roi": "anterior_compartment"}
    body = client.get("/api/v1/stats", params=params).json()
    changes = -np.array(SLOPES)
    mean, sd = changes.mean(), changes.std(ddof=1)
    assert body["n"] == 5 and body["mean"] == pytest.approx(mean) and body["sd"] == pytest.approx(sd)
    srm = mean / sd
    se = math.sqrt(1 / 5 + srm ** 2 / 10)
    assert body["srm"] == pytest.approx(srm)
    assert body["srm_ci"] == pytest.approx([srm - 1.959964 * se, srm + 1.959964 * se], rel=1e-5)
    for slowing in (25, 50):
        d = abs(mean) * slowing / 100 / sd
        expect = math.ceil(TTestIndPower().solve_power(effect_size=d, alpha=0.05, power=0.8) - 1e-9)
        assert body[f"n_per_arm_{slowing}"] == expect
    assert body["unit_per_year"] == "mm2/year"
    rel = client.get("/api/v1/stats", params=dict(params, relative="true")).json()
    assert rel["mean"] == pytest.approx(mean / 7000 * 100) and rel["unit_per_year"] == "%/year"
    bad = client.get("/api/v1/stats", params=dict(params, side="middle"))
    assert bad.status_code == 422


def test_groups_and_correlation_with_a_score(client):
    _upload_scores(client)
    params = {"metric": "frma_mm2", "region": "thigh", "side": "right", "roi": "anterior_compartment",
              "score": "knee_extension", "relative": "true", "relative_score": "true"}
    body = client.get("/api/v1/stats", params=params).json()
    assert set(body["groups"]) == {"all", "fast", "slow"}
    assert body["groups"]["fast"]["n"] == 3 and body["groups"]["slow"]["n"] == 2
    assert body["groups"]["slow"]["srm"] is None and body["groups"]["slow"]["reason"]
    mri = [-s * 365 / 365.25 / 7000 * 100 for s in SLOPES]
    knee = [-s * 365 / 365.25 / 300 * 100 for s in SCORE_SLOPES]
    corr = body["correlation"]
    assert corr["n"] == 5
    assert corr["pearson_r"] == pytest.approx(stats.pearsonr(mri, knee).statistic)
    assert corr["pearson_p"] == pytest.approx(stats.pearsonr(mri, knee).pvalue)
    assert corr["spearman_rho"] == pytest.approx(stats.spearmanr(mri, knee).statistic)
    fast = client.get("/api/v1/stats", params=dict(params, group="fast")).json()
    assert fast["n"] == 3 and fast["correlation"]["n"] == 3 and {s["group"] for s in fast["subjects"]} == {"fast"}
