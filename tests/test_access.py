"""Who may associate with the node (``[node] allowed_calling_aes``, ``require_called_ae_title``),
tested with DCMTK's echoscu and storescu as real processes: an allowed AE stores; a wrong
calling AE, a wrong host and a wrong called AE title get an A-ASSOCIATE-RJ with the reason of
PS3.8 Table 9-21, and each refusal is an audit entry."""

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import node_config, small_phantom, write_datasets
from sqlalchemy import select

from node import db
from node.access import CALLED_AE_NOT_RECOGNISED, CALLING_AE_NOT_RECOGNISED, AccessPolicy
from node.config import AllowedCaller, ConfigError, config_from_dict, config_to_dict
from quant.synthetic.phantom import phantom_datasets

needs_dcmtk = pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="DCMTK is not installed")

ALLOWED = (AllowedCaller("SCANNER1"),
           AllowedCaller("SCANNER2", "192.0.2.10"),     # TEST-NET-1: never the loopback the tests call from
           AllowedCaller("LOCALSCAN", "localhost"))     # a host name, resolved


def _audit(node):
    with node.engine.begin() as conn:
        return conn.execute(select(db.audit).order_by(db.audit.c.id)).all()


def _echo(node, calling, called="MUSCLENODE"):
    return subprocess.run(["/usr/bin/echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def guarded_node(make_node, tmp_path):
    config = node_config(tmp_path, complete_after=3600)
    return make_node(replace(config, node=replace(config.node, allowed_calling_aes=ALLOWED)))


@needs_dcmtk
def test_allowed_calling_ae_stores(guarded_node, tmp_path):
    files = write_datasets(phantom_datasets(small_phantom(seed=5), patient_id="ACC-1", uid_seed="acc")[:3],
                           tmp_path / "scanner")
    for calling in ("SCANNER1", "LOCALSCAN"):
        assert _echo(guarded_node, calling).returncode == 0
    r = subprocess.run(["/usr/bin/storescu", "-aet", "SCANNER1", "-aec", "MUSCLENODE", "127.0.0.1",
                        str(guarded_node.port), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with guarded_node.engine.begin() as conn:
        assert len(conn.execute(select(db.instances)).all()) == 3
    assert not [a for a in _audit(guarded_node) if a.event == "association-rejected"]


@needs_dcmtk
@pytest.mark.parametrize("calling,called,reason,words", [
    ("INTRUDER", "MUSCLENODE", CALLING_AE_NOT_RECOGNISED, "Calling AE Title Not Recognized"),
    ("SCANNER2", "MUSCLENODE", CALLING_AE_NOT_RECOGNISED, "Calling AE Title Not Recognized"),   # wrong host
    ("SCANNER1", "NOTTHENODE", CALLED_AE_NOT_RECOGNISED, "Called AE Title Not Recognized"),
])
def test_refused_association_is_rejected_with_its_reason_and_audited(guarded_node, tmp_path, calling, called,
                                                                     reason, words):
    r = _echo(guarded_node, calling, called)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "Association Rejected" in out and "Rejected Permanent" in out and words in out, out
    files = write_datasets(phantom_datasets(small_phantom(seed=6), patient_id="ACC-2", uid_seed="acc2")[:1],
                           tmp_path / "scanner")
    r = subprocess.run(["/usr/bin/storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(guarded_node.port),
                        *map(str, files)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and words in r.stdout + r.stderr
    with guarded_node.engine.begin() as conn:
        assert conn.execute(select(db.instances)).all() == []
    refused = [a for a in _audit(guarded_node) if a.event == "association-rejected"]
    assert len(refused) == 2   # echoscu and storescu
    for a in refused:
        assert f"calling={calling}" in a.detail and f"called={called}" in a.detail
        assert "from=127.0.0.1" in a.detail and f"reason={reason}" in a.detail


@needs_dcmtk
def test_node_still_serves_after_refusals(guarded_node):
    for _ in range(3):
        assert _echo(guarded_node, "INTRUDER").returncode != 0
    assert _echo(guarded_node, "SCANNER1").returncode == 0


@needs_dcmtk
def test_any_calling_ae_when_the_list_is_empty_and_called_check_can_be_turned_off(make_node, tmp_path):
    config = node_config(tmp_path)
    node = make_node(config)
    assert _echo(node, "ANYONE").returncode == 0
    assert _echo(node, "ANYONE", "OTHER").returncode != 0   # the called AE title is checked by default
    lax = make_node(replace(config, node=replace(config.node, port=config.node.port + 1,
                                                 require_called_ae_title=False)))
    assert _echo(lax, "ANYONE", "OTHER").returncode == 0


def test_policy_decisions():
    policy = AccessPolicy("MUSCLENODE", ALLOWED)
    assert policy.check("SCANNER1", "MUSCLENODE", "10.1.2.3") is None
    assert policy.check("SCANNER2", "MUSCLENODE", "192.0.2.10") is None
    assert policy.check("SCANNER2", "MUSCLENODE", "::ffff:192.0.2.10") is None   # IPv4-mapped IPv6
    assert policy.check("SCANNER2", "MUSCLENODE", "192.0.2.11").reason == CALLING_AE_NOT_RECOGNISED
    assert policy.check("LOCALSCAN", "MUSCLENODE", "127.0.0.1") is None
    assert policy.check("OTHER", "MUSCLENODE", "127.0.0.1").reason == CALLING_AE_NOT_RECOGNISED
    assert policy.check("SCANNER1", "ELSEWHERE", "127.0.0.1").reason == CALLED_AE_NOT_RECOGNISED
    assert AccessPolicy("MUSCLENODE").check("ANY", "MUSCLENODE", "10.0.0.1") is None
    assert AccessPolicy("MUSCLENODE", require_called=False).check("ANY", "X", "10.0.0.1") is None


def test_allowed_calling_aes_config():
    config = config_from_dict({"node": {"allowed_calling_aes": ["SCANNER1", {"ae": "PACS", "host": "10.0.0.5"}]}})
    assert config.node.allowed_calling_aes == (AllowedCaller("SCANNER1"), AllowedCaller("PACS", "10.0.0.5"))
    assert config_from_dict(config_to_dict(config)) == config
    assert config_from_dict({}).node.allowed_calling_aes == ()
    for bad, key in [({"allowed_calling_aes": "SCANNER1"}, "node.allowed_calling_aes"),
                     ({"allowed_calling_aes": [{"ae": "A", "hots": "x"}]}, "node.allowed_calling_aes[0].hots"),
                     ({"allowed_calling_aes": ["OK", {"host": "x"}]}, "node.allowed_calling_aes[1].ae"),
                     ({"allowed_calling_aes": ["A" * 17]}, "node.allowed_calling_aes[0].ae"),
                     ({"allowed_calling_aes": [{"ae": "A", "host": ""}]}, "node.allowed_calling_aes[0].host")]:
        with pytest.raises(ConfigError) as err:
            config_from_dict({"node": bad})
        assert err.value.key == key, err.value
