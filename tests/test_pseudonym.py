"""Pseudonymised subject codes and visit labels (node/web/pseudonym.py)."""

from __future__ import annotations

import stat

from node.web.pseudonym import site_secret, subject_code, visit_label


def test_site_secret_is_made_once_and_private(tmp_path):
    a = site_secret(tmp_path)
    assert len(a) == 32 and site_secret(tmp_path) == a
    assert stat.S_IMODE((tmp_path / "site-secret").stat().st_mode) == 0o600


def test_subject_codes():
    s1, s2 = b"1" * 32, b"2" * 32
    assert subject_code("trial:SPONSOR:ALS-017", s1) == "ALS-017"          # the Clinical Trial Subject ID
    code = subject_code("patient:HOSP:12345", s1)
    assert code.startswith("S-") and len(code) == 14 and "12345" not in code
    assert subject_code("patient:HOSP:12345", s1) == code                  # stable
    assert subject_code("patient:HOSP:12345", s2) != code                  # another site, another code
    assert subject_code("patient:OTHER:12345", s1) != code                 # the issuer counts


def test_visit_labels():
    assert visit_label("V3", 365) == "V3"                                   # Clinical Trial Time Point ID
    assert visit_label("", 0) == "baseline"
    assert visit_label("", 182) == "month 6" and visit_label("", 365) == "month 12"
