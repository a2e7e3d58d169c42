"""The web API (FastAPI) of the node: ``/api/v1/...`` for trial coordinators and admins,
and the dashboard at ``/``.

Every endpoint but ``/api/v1/health`` and the dashboard's static files needs
``Authorization: Bearer <token>`` (401 without a valid one, 403 with the wrong role). A
coordinator's responses are pseudonymised (:mod:`.pseudonym`); an admin may also look up
the patient behind a subject code, and each such look is written to the audit log.
"""

from __future__ import annotations

import csv
import io
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import Engine

from quant import __version__

from .. import db
from . import queries
from .pseudonym import site_secret
from .scores import set_group, upload_scores
from .tokens import Role, check_token

_bearer = HTTPBearer(auto_error=False)
#: The dashboard's page, script and style (package data: an installed wheel ships them).
STATIC_DIR = Path(__file__).resolve().parent / "static"


class Caller:
    """Who called: the token's name and role."""

    def __init__(self, name: str, role: Role):
        self.name = name
        self.role = role


def _caller(request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
    """The caller of a request with a valid bearer token; 401 otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "a bearer token is needed", headers={"WWW-Authenticate": "Bearer"})
    found = check_token(request.app.state.engine, credentials.credentials)
    if found is None:
        raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return Caller(*found)


def _admin(who: Annotated[Caller, Depends(_caller)]) -> Caller:
    """The caller, if an admin; 403 otherwise."""
    if who.role is not Role.ADMIN:
        raise HTTPException(403, "this needs an admin token")
    return who


AnyRole = Annotated[Caller, Depends(_caller)]
AdminRole = Annotated[Caller, Depends(_admin)]


def create_app(engine: Engine, data_dir: Path) -> FastAPI:
    """The web application over the node's database ``engine`` and data directory."""
    secret = site_secret(Path(data_dir))
    app = FastAPI(title="musclenode", version=__version__, openapi_url="/api/v1/openapi.json",
                  docs_url="/api/v1/docs", redoc_url=None,
                  description="Longitudinal muscle MRI measurements for trial coordinators (pseudonymised).")
    app.state.engine = engine
    app.state.secret = secret

    @app.get("/api/v1/health", tags=["service"])
    def health() -> dict:
        """Liveness for monitors (no token): the node's version and whether the database answers."""
        with engine.begin() as conn:
            conn.exec_driver_sql("SELECT 1")
        return {"status": "ok", "version": __version__}

    @app.get("/api/v1/subjects", tags=["subjects"])
    def subjects(who: AnyRole) -> list[dict]:
        """One entry per subject: its code, visits, first and last visit (days since baseline), regions."""
        with engine.begin() as conn:
            vs = queries.visits(conn, secret)
            regions = queries.regions_by_subject(conn, secret)
            groups = queries.groups_by_key(conn)
        out: dict[str, dict] = {}
        for v in vs:
            e = out.setdefault(v.subject, {"subject": v.subject, "group": groups.get(v.subject_key), "visits": 0,
                                           "first_visit_days": 0, "last_visit_days": 0,
                                           "regions": regions.get(v.subject, []), "states": []})
            e["visits"] += 1
            e["last_visit_days"] = max(e["last_visit_days"], v.days)
            e["states"].append({"visit": v.label, "days_since_baseline": v.days, "state": v.state})
        return list(out.values())

    @app.get("/api/v1/subjects/{subject}", tags=["subjects"])
    def timeline(subject: str, who: AnyRole) -> dict:
        """The subject's timeline: one entry per visit with its state and measurements."""
        with engine.begin() as conn:
            key = queries.subject_keys_by_code(conn, secret).get(subject)
            if key is None:
                raise HTTPException(404, f"no subject {subject!r}")
            vs = queries.visits(conn, secret, [key])
            rows = list(queries.measurement_rows(conn, secret, subject_keys=[key]))
        by_visit: dict[tuple[int, str], list[dict]] = {}
        for r in rows:
            by_visit.setdefault((r["days_since_baseline"], r["visit"]), []).append(
                {k: r[k] for k in ("region", "roi", "side", "metric", "value", "unit", "model", "source",
                                   "algorithm_version", "change_from_baseline", "change_from_previous",
                                   "annualised_change")})
        return {"subject": subject, "visits": [
            {"visit": v.label, "days_since_baseline": v.days, "state": v.state,
             "measurements": by_visit.get((v.days, v.label), [])} for v in vs]}

    @app.get("/api/v1/measurements", tags=["export"], response_model=None)
    def measurements(who: AnyRole, format: Literal["json", "csv", "parquet"] = "json",
                     metric: str | None = None, region: str | None = None,
                     roi: Annotated[str | None, Query(description='"" for whole-leg values')] = None,
                     side: str | None = None) -> Response | list[dict]:
        """The long-format export: one row per subject, visit and measurement."""
        with engine.begin() as conn:
            table = queries.measurement_table(conn, secret, metric=metric, region=region, roi=roi, side=side)
        if format == "csv":
            return Response(to_csv(table), media_type="text/csv",
                            headers={"Content-Disposition": 'attachment; filename="musclenode-measurements.csv"'})
        if format == "parquet":
            return Response(to_parquet(table), media_type="application/vnd.apache.parquet",
                            headers={"Content-Disposition": 'attachment; filename="musclenode-measurements.parquet"'})
        return [dict(zip(queries.EXPORT_COLUMNS, t, strict=True)) for t in table]

    @app.get("/api/v1/admin/subjects/{subject}", tags=["admin"])
    def identify(subject: str, who: AdminRole, request: Request) -> dict:
        """Admin only: the patient behind a subject code (Patient ID, issuer, trial ID); audited."""
        with engine.begin() as conn:
            key = queries.subject_keys_by_code(conn, secret).get(subject)
            if key is None:
                raise HTTPException(404, f"no subject {subject!r}")
            db.record_audit(conn, "identity-look", f"token={who.name} subject={subject} "
                                                    f"from={request.client.host if request.client else '?'}")
        kind, issuer, ident = (key.split(":", 2) + ["", ""])[:3]
        return {"subject": subject, "kind": kind, "issuer_or_sponsor": issuer, "id": ident}

    @app.get("/api/v1/stats", tags=["statistics"])
    def get_stats(who: AnyRole, metric: str, region: str, side: Literal["right", "left"],
                  roi: Annotated[str, Query(description='"" for the whole leg')] = "",
                  relative: Annotated[bool, Query(description="relative change (% of baseline per year)")] = False,
                  group: str | None = None,
                  score: Annotated[str | None, Query(description="an uploaded clinical score, e.g. alsfrs_r")] = None,
                  relative_score: bool = False) -> dict:
        """Cohort statistics of one metric (region, ROI, side): n, mean and SD of the annualised
        change, the SRM with its 95 % CI, patients per arm to detect a 25 % and a 50 % slowing
        (two-sided alpha 0.05, power 0.8), per group; with ``score``, the correlation of the MRI
        change with the score's change (Pearson and Spearman with n, 95 % CI and p).
        """
        from .stats import stats_response
        with engine.begin() as conn:
            return stats_response(conn, secret, metric=metric, region=region, roi=roi, side=side, relative=relative,
                                  group=group, score=score, relative_score=relative_score)

    @app.post("/api/v1/scores", tags=["scores"])
    async def post_scores(who: AnyRole, file: UploadFile) -> dict:
        """Upload clinical scores (CSV: subject, visit or date, optional group, then alsfrs_r, its
        subscores, knee_extension, plantar_flexion, grip, mrc_sum as name or name[unit]). Rows
        that match no subject or visit come back in ``rejected`` with the reason.
        """
        text = (await file.read()).decode("utf-8-sig", errors="replace")
        with engine.begin() as conn:
            report = upload_scores(conn, secret, text)
            db.record_audit(conn, "scores-uploaded", f"token={who.name} stored={report.stored} "
                                                      f"rejected={len(report.rejected)}")
        return {"stored": report.stored, "groups": report.groups, "rejected": report.rejected}

    @app.put("/api/v1/admin/groups/{subject}", tags=["admin"])
    def put_group(subject: str, who: AdminRole, group: Annotated[str, Query(max_length=64)] = "") -> dict:
        """Admin only: put a subject in a group (trial arm, fast or slow progressor); "" takes it out."""
        with engine.begin() as conn:
            key = queries.subject_keys_by_code(conn, secret).get(subject)
            if key is None:
                raise HTTPException(404, f"no subject {subject!r}")
            set_group(conn, key, group)
            db.record_audit(conn, "group-set", f"token={who.name} subject={subject} group={group}")
        return {"subject": subject, "group": group or None}

    _dashboard(app)

    @app.exception_handler(ValueError)
    def bad_value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return app


def plotly_js() -> Path:
    """The ``plotly.min.js`` that the installed :mod:`plotly` package ships (served, never copied)."""
    return Path(str(files("plotly") / "package_data" / "plotly.min.js"))


def _dashboard(app: FastAPI) -> None:
    """The dashboard: ``/`` (the page), ``/static/...`` (its script and style) and
    ``/static/plotly.min.js`` from the plotly package; no token needed, none in the OpenAPI document.
    """
    plotly = plotly_js()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_script() -> FileResponse:
        return FileResponse(plotly, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def to_csv(table: list[tuple]) -> str:
    """The rows of :func:`queries.measurement_table` as CSV under a header (empty cells for none)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(queries.EXPORT_COLUMNS)
    w.writerows(table)   # None is written as an empty cell
    return buf.getvalue()


def to_parquet(table: list[tuple]) -> bytes:
    """The rows of :func:`queries.measurement_table` as a Parquet file, one column each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = list(zip(*table, strict=True)) if table else [()] * len(queries.EXPORT_COLUMNS)
    table = pa.table({k: list(col) for k, col in zip(queries.EXPORT_COLUMNS, columns, strict=True)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
