"""Pseudonymised subject codes and visit labels.

A subject's code is its Clinical Trial Subject ID where the DICOM carries one (the node's
subject key ``trial:<sponsor>:<subject ID>``); otherwise a keyed hash, HMAC-SHA256 with the
site secret, of the key ``patient:<issuer>:<patient ID>``, written ``S-`` and 12 hex digits.
The site secret is 32 random bytes the node creates on first start in its data directory
(``site-secret``, mode 0600) and never shows; without it a code cannot be traced back to a
patient ID, and with another site's secret the same patient gets another code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "site-secret"


def site_secret(data_dir: Path) -> bytes:
    """The site secret of the node whose data directory is ``data_dir``, created on first use."""
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    return bytes.fromhex(path.read_text().strip())


def subject_code(subject_key: str, secret: bytes) -> str:
    """The pseudonymous code of a subject key (:func:`reports.uids.subject_key`)."""
    if subject_key.startswith("trial:"):
        trial_id = subject_key.split(":", 2)[2]
        if trial_id:
            return trial_id
    digest = hmac.new(secret, subject_key.encode(), hashlib.sha256).hexdigest()
    return f"S-{digest[:12].upper()}"


def visit_label(time_point: str, days: int) -> str:
    """A visit's label: its Clinical Trial Time Point ID, else the months since baseline
    (``baseline``, ``month 6``, ``month 12``; days / 30.44, rounded).
    """
    if time_point:
        return time_point
    if days <= 0:
        return "baseline"
    return f"month {round(days / 30.4375)}"
