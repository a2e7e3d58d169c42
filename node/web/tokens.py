"""Bearer tokens of the web API: ``musclenode token create NAME --role coordinator|admin``
prints a new token once; the database keeps only its SHA-256 hash.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from enum import StrEnum

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Engine

from .. import db


class Role(StrEnum):
    """What a token may see: a coordinator pseudonymised data only; an admin also the
    mapping from subject code to patient (each look audited).
    """

    COORDINATOR = "coordinator"
    ADMIN = "admin"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, name: str, role: Role | str) -> str:
    """Create a token called ``name`` with ``role``; returns the token (shown once).

    Raises
    ------
    ValueError
        An unknown role, an empty name, or a name already in use (revoked names too).
    """
    role = Role(role)
    if not name or len(name) > 64:
        raise ValueError("a token name must be 1 to 64 characters")
    token = "mn_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        if conn.execute(select(db.tokens.c.id).where(db.tokens.c.name == name)).first() is not None:
            raise ValueError(f"a token called {name!r} exists already")
        conn.execute(insert(db.tokens).values(name=name, role=role.value, token_hash=_hash(token),
                                              created_at=time.time()))
        db.record_audit(conn, "token-created", f"name={name} role={role.value}")
    return token


def list_tokens(engine: Engine) -> list[dict]:
    """Every token: name, role, created and revoked times (never the token)."""
    with engine.begin() as conn:
        rows = conn.execute(select(db.tokens.c.name, db.tokens.c.role, db.tokens.c.created_at,
                                   db.tokens.c.revoked_at).order_by(db.tokens.c.id)).all()
    return [dict(r._mapping) for r in rows]


def revoke_token(engine: Engine, name: str) -> bool:
    """Revoke the token called ``name``; False if there is no such active token."""
    with engine.begin() as conn:
        res = conn.execute(update(db.tokens).where(and_(db.tokens.c.name == name, db.tokens.c.revoked_at.is_(None)))
                           .values(revoked_at=time.time()))
        if res.rowcount:
            db.record_audit(conn, "token-revoked", f"name={name}")
    return bool(res.rowcount)


def check_token(engine: Engine, token: str) -> tuple[str, Role] | None:
    """(name, role) of an active token, or None."""
    with engine.begin() as conn:
        row = conn.execute(select(db.tokens.c.name, db.tokens.c.role)
                           .where(and_(db.tokens.c.token_hash == _hash(token),
                                       db.tokens.c.revoked_at.is_(None)))).first()
    return None if row is None else (row.name, Role(row.role))
